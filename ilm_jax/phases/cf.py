"""Phase 0: the CF tables (matrix factorization) and the classic baselines.

Trains, with the trainer core and the same mesh as every phase:
  mf          matrix factorization (models/cf_encoder.py); its user and item
              tables are exported to WORKDIR/cf/export for later phases;
  popularity  item counts over the training parts, no trainable parameters
              (zero steps: the trainer only evaluates it);
  sasrec      SASRec with full softmax cross-entropy (models/sasrec.py).
`config.cf.baselines` picks the baselines. Every model is evaluated by the
plugins of `config.cf.evals` (full ranking, evaluators/ranking.py); metrics
go to WORKDIR/metrics/<model>_<split>.json. Params for the export and the
test metrics are the best on `config.cf.train.best_metric` (validation).

  python -m ilm_jax.main --config=configs/ml1m.py:cpu --config.phases=cf \
    --workdir=/tmp/ilm_ml1m
"""

import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ilm_jax import data, layout, train
from ilm_jax.data import pipeline, processing
from ilm_jax.evaluators import registry
from ilm_jax.models import cf_encoder, sasrec

BASELINES = ("popularity", "sasrec")


class _NoBatches:
  """The train iterator of a zero-step task (popularity)."""

  def __next__(self):
    raise RuntimeError("A zero-step task has no training batches.")

  def get_state(self) -> dict:
    return {}

  def set_state(self, state: dict) -> None:
    del state


def _evaluators(cf_config, dataset, score_fn, mesh, history_length=1):
  return registry.from_config(
    cf_config.evals,
    dataset=dataset,
    score_fn=score_fn,
    mesh=mesh,
    history_length=history_length,
  )


def mf_task(
  dataset: processing.ProcessedDataset,
  cf_config: ml_collections.ConfigDict,
  mesh: Mesh,
  seed: int,
) -> train.Task:
  """The matrix-factorization task (the CF tables)."""
  model_config = cf_config.model
  if model_config.type != "mf":
    raise ValueError(f"cf.model.type={model_config.type!r}: only 'mf'.")
  model = cf_encoder.MatrixFactorization(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    embed_dim=model_config.embed_dim,
    init_stddev=model_config.init_stddev,
  )
  examples = pipeline.mf_examples(dataset, model_config.interactions)

  def init_params(rng):
    return model.init(rng, jnp.zeros((1,), jnp.int32))["params"]

  def loss_fn(params, batch, rng):
    del rng  # deterministic model
    scores = model.apply({"params": params}, batch["user"])
    return cf_encoder.multinomial_loss(scores, batch["item_counts"])

  def score_fn(params, batch):
    return model.apply({"params": params}, batch["user"])

  return train.Task(
    name="mf",
    init_params=init_params,
    loss_fn=loss_fn,
    train_iterator=pipeline.process_training_iterator(
      examples, cf_config.train.batch_size, seed
    ),
    evaluators=_evaluators(cf_config, dataset, score_fn, mesh),
    dataset_record=dataset.record(),
  )


def popularity_task(dataset, cf_config, mesh) -> train.Task:
  """Scores every item by its count in the training parts items[:-2]."""
  train_items = np.concatenate(pipeline.training_item_lists(dataset, "all"))
  counts = np.bincount(train_items, minlength=dataset.num_items)
  counts = counts.astype(np.float32)

  def score_fn(params, batch):
    table = params["item_counts"]
    return jnp.broadcast_to(table, (batch["user"].shape[0], table.shape[0]))

  return train.Task(
    name="popularity",
    init_params=lambda rng: {"item_counts": jnp.asarray(counts)},
    loss_fn=lambda params, batch, rng: (jnp.zeros(()), {}),
    train_iterator=_NoBatches(),
    evaluators=_evaluators(cf_config, dataset, score_fn, mesh),
    dataset_record=dataset.record(),
  )


def sasrec_model(dataset, cf_config) -> sasrec.SASRec:
  """The SASRec of `cf.sasrec.model` over the dataset's items."""
  model_config = cf_config.sasrec.model
  return sasrec.SASRec(
    num_items=dataset.num_items,
    max_length=model_config.max_length,
    embed_dim=model_config.embed_dim,
    num_layers=model_config.num_layers,
    num_heads=model_config.num_heads,
    mlp_dim=model_config.mlp_dim,
    dropout_rate=model_config.dropout_rate,
  )


def export_sasrec_tables(workdir, dataset, cf_config, result) -> str:
  """Writes SASRec's item table and user sequence states as CF tables.

  Users' states are SASRec's hidden state after their training part
  items[:-2] (the valid split's histories): the information MF's user
  table has. `user . item` is SASRec's next-item score, so the export reads
  like MF's (`cf.tables=sasrec` makes phases 1 and 2 use it). With
  `cf.sasrec.export_sequence_states`, beside them the state before every
  interaction (`sasrec.sequence_states`), which
  `ilm.data.user_state='sequence'` puts in the `{user}` rows of phase 2.
  """
  model = sasrec_model(dataset, cf_config)
  histories = dataset.leave_one_out("valid")
  items, mask = histories.padded_histories(
    np.arange(len(histories)), cf_config.sasrec.model.max_length
  )
  states = sasrec.user_states(model, result.params, items, mask)
  item_table = result.params["item_embedding"]["embedding"]
  before = None
  if cf_config.sasrec.get("export_sequence_states", False):
    start = time.perf_counter()
    before = sasrec.sequence_states(
      model, result.params, dataset.sequence_offsets, dataset.sequence_items
    )
    logging.info(
      "SASRec states before all %d interactions in %.1f s.",
      len(before),
      time.perf_counter() - start,
    )
  return str(
    cf_encoder.export_cf_tables(
      layout.cf_export(workdir, "sasrec"),
      np.asarray(jax.device_get(item_table), np.float32),
      np.asarray(jax.device_get(states), np.float32),
      dataset,
      extra_metadata=dict(
        model="sasrec",
        config=cf_config.sasrec.model.to_dict(),
        trained_steps=result.step,
        metrics=result.metrics,
      ),
      sequence_states=before,
    )
  )


def sasrec_task(dataset, cf_config, mesh, seed) -> train.Task:
  """SASRec trained with full softmax cross-entropy."""
  model_config = cf_config.sasrec.model
  model = sasrec_model(dataset, cf_config)
  length = model_config.max_length
  examples = pipeline.sasrec_windows(dataset, length)

  def init_params(rng):
    items = jnp.zeros((1, length), jnp.int32)
    return model.init(rng, items, jnp.ones((1, length), bool))["params"]

  def loss_fn(params, batch, rng):
    return model.apply(
      {"params": params},
      batch["inputs"],
      batch["targets"],
      batch["target_mask"],
      deterministic=False,
      rngs={"dropout": rng},
      method=sasrec.SASRec.loss,
      target_fraction=model_config.target_fraction,
    )

  def score_fn(params, batch):
    return model.apply(
      {"params": params}, batch["history"], batch["history_mask"]
    )

  return train.Task(
    name="sasrec",
    init_params=init_params,
    loss_fn=loss_fn,
    train_iterator=pipeline.process_training_iterator(
      examples, cf_config.sasrec.train.batch_size, seed
    ),
    evaluators=_evaluators(cf_config, dataset, score_fn, mesh, length),
    dataset_record=dataset.record(),
  )


def selected_baselines(spec: str) -> list[str]:
  """Baseline names from `cf.baselines` (comma list, "" for none)."""
  names = [n.strip() for n in spec.split(",") if n.strip()]
  unknown = sorted(set(names) - set(BASELINES))
  if unknown:
    raise ValueError(
      f"cf.baselines={spec!r}: unknown {unknown}; allowed: {BASELINES}."
    )
  return [n for n in BASELINES if n in names]


def _summarise(name: str, result: train.TrainResult) -> dict[str, float]:
  summary = {f"{name}/{key}": value for key, value in result.metrics.items()}
  summary[f"{name}/wall_time_s"] = result.wall_time_s
  summary[f"{name}/steps"] = float(result.step)
  return summary


def run(config: ml_collections.ConfigDict, workdir, mesh: Mesh) -> dict:
  """Trains MF (exported) and the configured baselines.

  Args:
    config: the experiment config (uses `data`, `mesh`, `seed`, `cf`).
    workdir: the experiment's output directory.
    mesh: the device mesh.

  Returns:
    Flat summary: "<model>/<split>/<metric>", "<model>/wall_time_s", and
    "export_dir".
  """
  workdir = pathlib.Path(workdir).absolute()
  cf_config = config.cf
  dataset = data.load_dataset(config.data)
  logging.info(
    "CF phase on %s: %d users, %d items, %d interactions.",
    dataset.name,
    dataset.num_users,
    dataset.num_items,
    dataset.num_interactions,
  )
  fit = _trainer(config, workdir, mesh)
  summary: dict[str, Any] = {}

  result = fit(mf_task(dataset, cf_config, mesh, config.seed), cf_config)
  summary.update(_summarise("mf", result))
  item_table, user_table = cf_encoder.tables_from_params(result.params)
  export_dir = cf_encoder.export_cf_tables(
    layout.cf_export(workdir),
    item_table,
    user_table,
    dataset,
    extra_metadata=dict(
      model=cf_config.model.to_dict(),
      trained_steps=result.step,
      metrics=result.metrics,
    ),
  )
  summary["export_dir"] = str(export_dir)

  for name in selected_baselines(cf_config.baselines):
    if name == "popularity":
      task = popularity_task(dataset, cf_config, mesh)
      phase_config = cf_config.popularity
    else:
      task = sasrec_task(dataset, cf_config, mesh, config.seed)
      phase_config = cf_config.sasrec
    result = fit(task, phase_config)
    summary.update(_summarise(name, result))
    if name == "sasrec":
      summary["sasrec_export_dir"] = export_sasrec_tables(
        workdir, dataset, cf_config, result
      )
  return summary


def _trainer(config, workdir, mesh):
  def fit(task: train.Task, phase_config) -> train.TrainResult:
    start = time.perf_counter()
    result = train.train(
      task,
      phase_config,
      mesh=mesh,
      mesh_config=config.mesh,
      workdir=workdir,
      seed=config.seed,
    )
    logging.info(
      "%s: %s in %.1f s.",
      task.name,
      result.metrics,
      time.perf_counter() - start,
    )
    return result

  return fit
