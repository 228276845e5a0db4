"""Full-ranking evaluator: every user's held-out item against all items.

Config (one entry of a phase's `evals`):
  type="ranking"
  split: "valid" (target items[-2], history items[:-2]; also runs during
    training, for best-params selection) or "test" (target items[-1],
    history items[:-1]). Files: metrics/<phase>_<split>.json.
  mask_history: if True, items of the user's history (all of it, not only
    the model's window) are removed from the candidates. OpenP5's protocol
    does not mask (False, the default). The target is always a candidate.
  prefix: prepended to every metric name, so a masked and an unmasked
    evaluator of one split share its file ("masked_hr@10" beside "hr@10").
  ks: cut-offs (default (5, 10)).
  ties: "pessimistic" (default), "optimistic" or "expected" (metrics.py).
  batch_size: users per jitted step (global; rounded up to a multiple of
    the data-parallel shards).

Context from the phase: `dataset` (ProcessedDataset), `score_fn(params,
batch) -> float [batch, num_items]` (batch has "user", "history",
"history_mask"), `mesh`, `history_length` (the model's window).

Yields <prefix>hr@k and <prefix>ndcg@k averaged over users,
<prefix>coverage@k for k = 1 and each of ks (the share of all items in
any user's top-k list, `metrics.catalog_coverage`; equal scores are listed
lowest item id first),
and <prefix>users, the number of users evaluated (all users of the
dataset: each has a validation and test item).
Per-user metrics come back to the host and are summed in float64 there, so
the result does not depend on how the batch is split over devices. Then
(metric_writer.PER_USER, block): per user (block["user_ids"]), the values
averaged above and <prefix>rank, the target's 0-based rank among the
candidates under the tie policy ("expected": the mean over tie-breaks).
"""

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ilm_jax import metric_writer, metrics, progress, sharding
from ilm_jax.data import pipeline, processing
from ilm_jax.evaluators import registry

ScoreFn = Callable[[Any, dict], jax.Array]


def exclusion_mask(item_lists: list[np.ndarray], num_items: int) -> np.ndarray:
  """bool [len(item_lists), num_items], True on each row's listed items."""
  rows = np.repeat(np.arange(len(item_lists)), [len(x) for x in item_lists])
  mask = np.zeros((len(item_lists), num_items), bool)
  if len(rows):
    mask[rows, np.concatenate(item_lists)] = True
  return mask


@registry.register("ranking")
class RankingEvaluator:
  """HR@k / NDCG@k under full ranking, batched, jitted and sharded."""

  def __init__(
    self,
    name: str,
    config: Any,
    *,
    dataset: processing.ProcessedDataset,
    score_fn: ScoreFn,
    mesh: jax.sharding.Mesh,
    history_length: int = 1,
    **unused_context: Any,
  ):
    self.name = name
    self.split = config["split"]
    if self.split not in ("valid", "test"):
      raise ValueError(
        f"evals.{name}.split={self.split!r}: expected 'valid' or 'test'."
      )
    self.mask_history = bool(config.get("mask_history", False))
    self.prefix = config.get("prefix", "")
    self.ks = tuple(int(k) for k in config.get("ks", (5, 10)))
    self.ties = config.get("ties", "pessimistic")
    if self.ties not in metrics.TIE_POLICIES:
      raise ValueError(
        f"evals.{name}.ties={self.ties!r}: expected one of "
        f"{metrics.TIE_POLICIES}."
      )
    shards = sharding.num_batch_shards(mesh) * jax.process_count()
    requested = int(config.get("batch_size", 512))
    self.batch_size = shards * math.ceil(requested / shards)
    self._mesh = mesh
    self._num_items = dataset.num_items
    self._examples = pipeline.sequential_examples(
      dataset, self.split, history_length
    )
    self._history = (
      dataset.leave_one_out(self.split).histories()
      if self.mask_history
      else None
    )
    self._score_fn = score_fn

  def _batches(self) -> Iterator[dict]:
    """This process's users in fixed-shape batches, padded with a mask.

    Every process runs the same number of steps (the largest shard's), as
    jitted steps over a multi-host mesh need all processes.
    """
    for batch in pipeline.eval_batches(
      self._examples,
      self.batch_size // jax.process_count(),
      jax.process_index(),
      jax.process_count(),
    ):
      if self._history is not None:
        rows = [self._history[u] for u in batch["user"]]
        batch["exclude"] = exclusion_mask(rows, self._num_items)
      yield batch

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    """Yields (metric name, mean over users), ("users", count), per-user."""
    columns: dict[str, list[np.ndarray]] = {}
    # Counts this process's users (padding excluded).
    bar = progress.Progress(
      f"{self.name} ({self.split}) users",
      total=pipeline.shard_size(
        len(self._examples), jax.process_index(), jax.process_count()
      ),
    )
    for local_batch in self._batches():
      batch = sharding.put_global_batch(local_batch, self._mesh)
      per_user, greater, tied, top = _gather_to_host(
        _per_user_metrics(
          params, batch, score_fn=self._score_fn, ks=self.ks, ties=self.ties
        )
      )
      per_user["rank"] = _target_rank(greater, tied, self.ties)
      per_user["user_ids"] = _gather_to_host(batch["user"])
      real = _gather_to_host(batch["mask"])
      per_user[_TOP_ITEMS] = top
      for key, values in per_user.items():
        columns.setdefault(key, []).append(np.asarray(values)[real])
      bar.update(int(local_batch["mask"].sum()))
    bar.done()
    per_user = {key: np.concatenate(v) for key, v in columns.items()}
    num_users = len(per_user.get("user_ids", ()))
    if not num_users:
      raise ValueError(f"Evaluator {self.name}: no users to evaluate.")
    logging.info(
      "%s: %d users, split=%s, mask_history=%s, ties=%s.",
      self.name,
      num_users,
      self.split,
      self.mask_history,
      self.ties,
    )
    user_ids = per_user.pop("user_ids")
    top = per_user.pop(_TOP_ITEMS)
    for key in sorted(per_user.keys() - {"rank"}, key=_metric_order):
      yield (
        self.prefix + key,
        float(np.sum(per_user[key], dtype=np.float64)) / num_users,
      )
    for k in sorted({1, *self.ks}):  # @1: how many distinct first items
      yield (
        f"{self.prefix}coverage@{k}",
        metrics.catalog_coverage(top, self._num_items, k),
      )
    yield self.prefix + "users", float(num_users)
    block = {self.prefix + key: values for key, values in per_user.items()}
    yield metric_writer.PER_USER, {"user_ids": user_ids, **block}


_TOP_ITEMS = "top_items"  # int [users, max(ks)]: not a per-user metric


def _target_rank(greater: np.ndarray, tied: np.ndarray, ties: str):
  """0-based rank of each target from `metrics.rank_counts` (float)."""
  offset = {"pessimistic": tied, "optimistic": 0, "expected": tied / 2}[ties]
  return (greater + offset).astype(np.float64)


def _metric_order(key: str) -> tuple[str, int]:
  name, k = key.split("@")
  return name, int(k)


# Static arguments key jax's compilation cache, so the valid and test
# evaluators of one model share one executable.
@functools.partial(jax.jit, static_argnames=("score_fn", "ks", "ties"))
def _per_user_metrics(params, batch, *, score_fn, ks, ties):
  scores = score_fn(params, batch)
  exclude = batch.get("exclude")
  greater, tied = metrics.rank_counts(scores, batch["target"], exclude)
  values = metrics.ranking_metrics(scores, batch["target"], ks, exclude, ties)
  candidates = scores
  if exclude is not None:  # the target stays a candidate, as in the metrics
    is_target = jnp.arange(scores.shape[1]) == batch["target"][:, None]
    candidates = jnp.where(exclude & ~is_target, -jnp.inf, scores)
  # top_k lists equal scores lowest index first.
  _, top = jax.lax.top_k(candidates, max(ks))
  return values, greater, tied, top


def _gather_to_host(tree: Any) -> Any:
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)
