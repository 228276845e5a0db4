"""Matrix factorization: the collaborative-filtering (CF) tables of ILM.

Users and items get vectors in one d-dimensional space and a user's score
for an item is their dot product; later phases treat a user vector as a
"special item" and feed `item_table[i]` / `user_table[u]` to the Q-Former.

Objective: full softmax over all items (a multinomial likelihood per user).
For a batch of users, each user's training items (items[:-2], with
multiplicity; batches from `data.pipeline.mf_examples`) are targets of one
softmax over the whole catalogue:
  loss = -sum_u sum_{i in train(u)} log softmax(user_u . item_*)_i / #pairs.
This is exactly pair-level softmax cross-entropy over every (user, item)
training pair, grouped by user, so one step scores each user against the
catalogue once instead of once per pair (about 160 times less work on
ML-1M). Full rather than sampled softmax: catalogues here have a few
thousand items, so the exact gradient is cheap and there is no sampling
bias to correct; item popularity is learned through the normaliser.

The exported tables (`export_cf_tables` / `load_cf_tables`) are a plain
orbax param directory plus a JSON file of index metadata, readable without
any training code.
"""

import json
import os
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ilm_jax import checkpoint
from ilm_jax.data import processing

EXPORT_FORMAT = "ilm_jax.cf_tables.v1"


class MatrixFactorization(nn.Module):
  """User and item embedding tables scored by dot product.

  Attributes:
    num_users: rows of the user table.
    num_items: rows of the item table.
    embed_dim: dimension d of both tables.
    init_stddev: standard deviation of the normal initialisation.
  """

  num_users: int
  num_items: int
  embed_dim: int
  init_stddev: float = 0.1

  def setup(self):
    init = nn.initializers.normal(self.init_stddev)
    self.user_embedding = nn.Embed(
      self.num_users, self.embed_dim, embedding_init=init
    )
    self.item_embedding = nn.Embed(
      self.num_items, self.embed_dim, embedding_init=init
    )

  def __call__(self, users: jax.Array) -> jax.Array:
    """Scores of `users` (int [batch]) against every item: [batch, items]."""
    return self.item_embedding.attend(self.user_embedding(users))


def multinomial_loss(
  scores: jax.Array, item_counts: jax.Array
) -> tuple[jax.Array, dict]:
  """Full-softmax cross-entropy of every (user, item) pair in a batch.

  Args:
    scores: float [batch, num_items].
    item_counts: float [batch, num_items], how often each item is a target
      of each row (0 for padding rows).

  Returns:
    (mean negative log-likelihood per pair, metrics dict).
  """
  log_probs = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  num_pairs = jnp.maximum(jnp.sum(item_counts), 1.0)
  loss = -jnp.sum(item_counts * log_probs) / num_pairs
  return loss, dict(pairs_per_batch=num_pairs)


def _to_host(array: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array as numpy."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def tables_from_params(params: Any) -> tuple[np.ndarray, np.ndarray]:
  """(item_table, user_table) as host arrays from MatrixFactorization params."""
  return (
    _to_host(params["item_embedding"]["embedding"]),
    _to_host(params["user_embedding"]["embedding"]),
  )


def export_cf_tables(
  path: os.PathLike,
  item_table: np.ndarray,
  user_table: np.ndarray,
  dataset: processing.ProcessedDataset,
  extra_metadata: dict | None = None,
  sequence_states: np.ndarray | None = None,
) -> pathlib.Path:
  """Writes the CF tables and their index metadata under `path`.

  Layout: `path/tables/` (orbax: {"item_table", "user_table"}),
  `path/sequence_states/` (orbax: {"states"}, when given) and
  `path/metadata.json` (format, sizes, raw ids by index, extras).

  Args:
    path: export directory (overwritten).
    item_table: float [num_items, d]; row i is item index i.
    user_table: float [num_users, d]; row u is user index u.
    dataset: the dataset the indices refer to.
    extra_metadata: JSON-serialisable extras (model config, metrics).
    sequence_states: optional float [num_interactions, d]; row p is the
      user vector before the interaction at position p of the dataset's
      `sequence_items` (SASRec's `sequence_states`).

  Returns:
    The export directory.
  """
  path = pathlib.Path(path).absolute()
  if item_table.shape != (dataset.num_items, user_table.shape[1]):
    raise ValueError(
      f"item_table {item_table.shape} does not fit {dataset.num_items} "
      f"items and user_table {user_table.shape}."
    )
  checkpoint.save_params(
    path / "tables", dict(item_table=item_table, user_table=user_table)
  )
  if sequence_states is not None:
    if sequence_states.shape != (dataset.num_interactions, item_table.shape[1]):
      raise ValueError(
        f"sequence_states {sequence_states.shape} does not fit "
        f"{dataset.num_interactions} interactions and d="
        f"{item_table.shape[1]}."
      )
    checkpoint.save_params(
      path / "sequence_states", dict(states=sequence_states)
    )
  elif jax.process_index() == 0:
    # No stale states from an earlier export beside the new tables.
    shutil.rmtree(path / "sequence_states", ignore_errors=True)
  if jax.process_index() == 0:
    metadata = dict(
      format=EXPORT_FORMAT,
      dataset=dataset.name,
      num_items=int(dataset.num_items),
      num_users=int(dataset.num_users),
      embed_dim=int(item_table.shape[1]),
      sequence_states=sequence_states is not None,
      score="dot",  # user . item, and item . item for item similarity
      item_ids=list(dataset.item_ids),
      user_ids=list(dataset.user_ids),
      **(extra_metadata or {}),
    )
    (path / "metadata.json").write_text(json.dumps(metadata, indent=1))
  return path


def load_cf_tables(
  path: os.PathLike,
) -> tuple[np.ndarray, np.ndarray, dict]:
  """Reads an export of `export_cf_tables`.

  Args:
    path: the export directory (e.g. WORKDIR/cf/export).

  Returns:
    (item_table [num_items, d], user_table [num_users, d], metadata dict),
    the tables as float numpy arrays exactly as saved.
  """
  path = pathlib.Path(path).absolute()
  metadata_path = path / "metadata.json"
  if not metadata_path.exists():
    raise checkpoint.CheckpointError(
      f"No CF export at {path} (missing metadata.json); run the cf phase "
      "with this workdir first."
    )
  metadata = json.loads(metadata_path.read_text())
  if metadata.get("format") != EXPORT_FORMAT:
    raise checkpoint.CheckpointError(
      f"{metadata_path}: format {metadata.get('format')!r}, expected "
      f"{EXPORT_FORMAT!r}."
    )
  tables = checkpoint.load_params(path / "tables")
  item_table = np.asarray(tables["item_table"])
  user_table = np.asarray(tables["user_table"])
  expected = {
    "item_table": (metadata["num_items"], metadata["embed_dim"]),
    "user_table": (metadata["num_users"], metadata["embed_dim"]),
  }
  for name, table in (("item_table", item_table), ("user_table", user_table)):
    if table.shape != expected[name]:
      raise checkpoint.CheckpointError(
        f"{path}: {name} has shape {table.shape}, metadata says "
        f"{expected[name]}."
      )
  return item_table, user_table, metadata


def load_sequence_states(
  path: os.PathLike, num_interactions: int
) -> np.ndarray:
  """The `sequence_states` of an export of `export_cf_tables`.

  Args:
    path: the export directory (e.g. WORKDIR/sasrec/export).
    num_interactions: the dataset's, to check the rows against.

  Returns:
    float numpy [num_interactions, d], exactly as saved.

  Raises:
    checkpoint.CheckpointError: the export has no sequence states (it was
      written without them, e.g. by MF or an older ilm_jax), or their rows
      do not fit the dataset.
  """
  path = pathlib.Path(path).absolute()
  if not (path / "sequence_states").exists():
    raise checkpoint.CheckpointError(
      f"{path} has no sequence_states/: only SASRec's export writes them, "
      "with cf.sasrec.export_sequence_states=True. To add them, run the cf "
      "phase again on this workdir with it (--config.phases=cf "
      "--config.cf.sasrec.export_sequence_states=True resumes the finished "
      "SASRec run and rewrites its export)."
    )
  states = np.asarray(
    checkpoint.load_params(path / "sequence_states")["states"]
  )
  if states.shape[0] != num_interactions:
    raise checkpoint.CheckpointError(
      f"{path}/sequence_states has {states.shape[0]} rows but the dataset "
      f"has {num_interactions} interactions: rerun the cf phase for this "
      "dataset."
    )
  return states
