"""Phase 1: Q-Former pretraining on CF tables and item text.

Each training example is one item-item co-occurrence pair (a, b) from the
train part of a user's sequence (ITC/ITM/ITG use item a and its text; II
contrasts a with b) plus one user-item positive pair (UI). The CF vectors
come from the phase-0 export and stay frozen (they are inputs, not params).
Outputs: `WORKDIR/qformer/export/params` (the trained Q-Former) and
`metrics/qformer_<split>.json` (retrieval and ITG evaluators). A
`qformer.variant` (e.g. the loss ablations) writes `WORKDIR/qformer_<variant>/`
and `metrics/qformer_<variant>_<split>.json` instead, beside the main run.
"""

import json
import pathlib

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from ilm_jax import checkpoint, data, layout, train
from ilm_jax.data import pipeline
from ilm_jax.evaluators import registry
from ilm_jax.models import qformer


def run(config: ml_collections.ConfigDict, workdir, mesh: Mesh) -> dict:
  """Pretrains the Q-Former and exports it; returns the summary."""
  workdir = pathlib.Path(workdir).absolute()
  model_config = config.qformer.model
  dataset = data.load_dataset(config.data)
  item_table, user_table = layout.read_cf_export(
    workdir, dataset, model_config.cf_dim, config.cf.tables
  )
  text_ids, text_mask, truncated = pipeline.tokenize_item_texts(
    dataset, model_config.max_text_len
  )
  logging.info(
    "Item texts: %d of %d truncated to %d WordPiece tokens.",
    truncated,
    dataset.num_items,
    model_config.max_text_len,
  )
  examples = pipeline.qformer_examples(
    dataset, item_table, user_table, text_ids, text_mask
  )
  iterator = pipeline.process_training_iterator(
    examples, config.qformer.train.batch_size, config.seed
  )

  def init_params(rng):
    return qformer.load(qformer.init_params(model_config, rng), model_config)

  def loss_fn(params, batch, rng):
    return qformer.phase1_losses(params, batch, rng, model_config)

  evaluators = registry.from_config(
    config.qformer.evals,
    dataset=dataset,
    model_config=model_config,
    item_table=item_table,
    text_ids=text_ids,
    text_mask=text_mask,
    seed=config.seed,
  )
  task = train.Task(
    name=layout.phase_name(config, "qformer"),
    init_params=init_params,
    loss_fn=loss_fn,
    train_iterator=iterator,
    evaluators=evaluators,
    dataset_record=dataset.record(),
  )
  result = train.train(
    task,
    config.qformer,
    mesh=mesh,
    mesh_config=config.mesh,
    workdir=workdir,
    seed=config.seed,
  )
  export = layout.qformer_export(config, workdir)
  checkpoint.save_params(export / "params", result.params)
  if jax.process_index() == 0:
    (export / "config.json").write_text(
      json.dumps(model_config.to_dict(), indent=1)
    )
    # Phase 2 checks that it feeds the Q-Former the tables it learned on.
    layout.write_cf_tables_record(export, config.cf.tables)
  return dict(
    result.metrics,
    steps=result.step,
    texts_truncated=truncated,
    export_dir=str(export),
  )
