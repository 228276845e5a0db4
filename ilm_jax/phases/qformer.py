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
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ilm_jax import checkpoint, data, train
from ilm_jax.data import pipeline, processing
from ilm_jax.evaluators import common
from ilm_jax.models import bert, cf_encoder, qformer
from ilm_jax.phases import cf


def phase_name(config: ml_collections.ConfigDict) -> str:
  """ "qformer" for the main run, "qformer_<variant>" for ablations."""
  variant = config.qformer.variant
  return f"qformer_{variant}" if variant else "qformer"


def export_dir(config: ml_collections.ConfigDict, workdir) -> pathlib.Path:
  """Where this config's phase-1 Q-Former is exported (and phase 2 reads)."""
  return pathlib.Path(workdir).absolute() / phase_name(config) / "export"


def tokenize_item_texts(
  dataset: processing.ProcessedDataset, max_text_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """WordPiece ids/mask [num_items, max_text_len] and the truncated count.

  Raises:
    ValueError: naming the item whose text is empty.
  """
  tokenizer = bert.WordPieceTokenizer.from_pretrained(max_length=max_text_len)
  for index, text in enumerate(dataset.item_texts):
    if not text.strip():
      raise ValueError(
        f"Item {dataset.item_ids[index]!r} (index {index}) has an empty "
        "text; every item needs a title or description for phase 1."
      )
  encoded = tokenizer.encode(dataset.item_texts)
  return encoded.ids, encoded.mask, encoded.num_truncated


def check_cf_tables(item_table, user_table, dataset, cf_dim: int) -> None:
  """Clear errors when the CF export does not fit the data or the model."""
  if item_table.shape[0] != dataset.num_items or (
    user_table.shape[0] != dataset.num_users
  ):
    raise ValueError(
      f"CF tables have {item_table.shape[0]} items / {user_table.shape[0]} "
      f"users but the dataset has {dataset.num_items} / "
      f"{dataset.num_users}: rerun the cf phase for this dataset."
    )
  if item_table.shape[1] != cf_dim:
    raise ValueError(
      f"CF tables have dimension {item_table.shape[1]} but "
      f"qformer.model.cf_dim={cf_dim}; set them equal."
    )


def pretraining_examples(
  dataset, item_table, user_table, text_ids, text_mask
) -> pipeline.ExampleDataset:
  """Phase-1 examples over the item-item pairs, each with a user-item pair."""
  ii_pairs, ui_pairs = dataset.item_item_pairs, dataset.user_item_pairs
  if not len(ii_pairs) or not len(ui_pairs):
    raise ValueError(
      f"{dataset.name}: phase 1 needs item-item and user-item "
      "pairs; the training split has none."
    )

  def gather(indices):
    a, b = ii_pairs[indices, 0], ii_pairs[indices, 1]
    # A fixed stride spreads the (smaller) user-item set over the examples.
    ui = ui_pairs[(indices * 7919) % len(ui_pairs)]
    return dict(
      item_cf=item_table[a],
      pair_cf=item_table[b],
      text_ids=text_ids[a],
      text_mask=text_mask[a],
      user_cf=user_table[ui[:, 0]],
      user_item_cf=item_table[ui[:, 1]],
    )

  return pipeline.ExampleDataset(
    len(ii_pairs), gather, f"{dataset.name}/qformer"
  )


def run(config: ml_collections.ConfigDict, workdir, mesh: Mesh) -> dict:
  """Pretrains the Q-Former and exports it; returns the summary."""
  workdir = pathlib.Path(workdir).absolute()
  model_config = config.qformer.model
  dataset = data.load_dataset(config.data)
  item_table, user_table, _ = cf_encoder.load_cf_tables(
    workdir.joinpath(*cf.EXPORT_DIR)
  )
  check_cf_tables(item_table, user_table, dataset, model_config.cf_dim)
  text_ids, text_mask, truncated = tokenize_item_texts(
    dataset, model_config.max_text_len
  )
  logging.info(
    "Item texts: %d of %d truncated to %d WordPiece tokens.",
    truncated,
    dataset.num_items,
    model_config.max_text_len,
  )
  examples = pretraining_examples(
    dataset, item_table, user_table, text_ids, text_mask
  )
  iterator = pipeline.training_iterator(
    examples,
    config.qformer.train.batch_size // jax.process_count(),
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  def init_params(rng):
    return qformer.load(qformer.init_params(model_config, rng), model_config)

  def loss_fn(params, batch, rng):
    return qformer.phase1_losses(params, batch, rng, model_config)

  evaluators = common.from_config(
    config.qformer.evals,
    dataset=dataset,
    model_config=model_config,
    item_table=item_table,
    text_ids=text_ids,
    text_mask=text_mask,
    seed=config.seed,
  )
  task = train.Task(
    name=phase_name(config),
    init_params=init_params,
    loss_fn=loss_fn,
    train_iterator=iterator,
    evaluators=evaluators,
  )
  result = train.train(
    task,
    config.qformer,
    mesh=mesh,
    mesh_config=config.mesh,
    workdir=workdir,
    seed=config.seed,
  )
  export = export_dir(config, workdir)
  checkpoint.save_params(export / "params", result.params)
  if jax.process_index() == 0:
    (export / "config.json").write_text(
      json.dumps(model_config.to_dict(), indent=1)
    )
  return dict(
    result.metrics,
    steps=result.step,
    texts_truncated=truncated,
    export_dir=str(export),
  )
