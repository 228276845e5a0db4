"""`cf_user_signal`: how much of a prompt's answer its CF user row holds.

The recommendation prompts put a user's CF row (`params["cf"]["users"]`;
with `ilm.data.user_state='sequence'`, SASRec's state before the prompt's
target) in front of the LLM as `{user}` soft tokens. This evaluator ranks each
prompt's target item among all items by the CF source's own score, the dot
product `users[row] . items[i]` (MF's prediction; SASRec's next-item logit
for `cf.tables=sasrec`), on two sets of prompts of each task in `tasks`:

  train_prompts  the first `num_prompts` training requests of the task,
                 exactly as phase 2's sampler draws them (seeded);
  (no infix)     the evaluation request of each user of the split's fixed
                 subset (`num_users`, 0 = all; the same users, in the same
                 seeded order, as `generative_ranking`).

Metrics: `cf_signal/<task>/train_prompts/hr@k`, `.../ndcg@k` and
`cf_signal/<task>/hr@k`, `.../ndcg@k` (every item a candidate,
pessimistic ties: the unmasked protocol of `generative_ranking`), with the
split's per-user values for paired comparisons. A training figure far
above the split's says the user row hands the adapter the answer during
training and not at test time: MF's user rows are fit to every training
interaction, targets of the training prompts included (docs/results/ilm.md,
"Where the user row's signal is"). A diagnostic of our own, not one of the
paper's metrics; numpy on the host, seconds. It describes the CF tables,
so it is the same for every adapter over one export.

For adapters with CF input ("qformer", "mlp") it also ranks the split's
targets in the soft-token space: `cf_signal/soft_tokens/hr@k`,
`.../ndcg@k` score item i for user u by the cosine between u's `{user}`
soft tokens and i's `{item}` soft tokens, each flattened `[T * D]` (what
the `user_target` loss of phase 2 trains; models/ilm.py). It says how much
of the row's signal the adapter's tokens keep, before the LLM.
"""

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from ilm_jax import metric_writer, metrics
from ilm_jax.data import prompts
from ilm_jax.evaluators import generative, registry

USER_TASKS = ("sequential", "straightforward")  # tasks with a {user} row
_CHUNK = 1024  # users scored at once: [chunk, num_items] floats


def target_metrics(
  user_rows: np.ndarray,
  item_table: np.ndarray,
  targets: np.ndarray,
  ks=(5, 10),
) -> dict[str, np.ndarray]:
  """HR@k and NDCG@k of each target under the dot-product score.

  Args:
    user_rows: float `[n, d]`, the CF row of each prompt's user.
    item_table: float `[num_items, d]`.
    targets: int `[n]`, each prompt's target item.
    ks: cut-offs.

  Returns:
    {"hr@k": float64 `[n]`, "ndcg@k": float64 `[n]`, ...}: every item a
    candidate, pessimistic ties (`metrics.ranking_metrics`).

  Raises:
    ValueError: the rows' and the table's dimensions differ, or the
      counts of rows and targets differ.
  """
  user_rows = np.asarray(user_rows, np.float32)
  item_table = np.asarray(item_table, np.float32)
  targets = np.asarray(targets, np.int32)
  if user_rows.ndim != 2 or user_rows.shape[1] != item_table.shape[1]:
    raise ValueError(
      f"user rows of shape {user_rows.shape} and an item table of shape "
      f"{item_table.shape}: expected [n, d] and [num_items, d]."
    )
  if len(targets) != len(user_rows):
    raise ValueError(f"{len(user_rows)} user rows but {len(targets)} targets.")
  columns: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(targets), _CHUNK):
    rows = slice(start, start + _CHUNK)
    scores = user_rows[rows] @ item_table.T
    values = metrics.ranking_metrics(scores, targets[rows], tuple(ks))
    for name, value in values.items():
      columns.setdefault(name, []).append(np.asarray(value, np.float64))
  return {name: np.concatenate(parts) for name, parts in columns.items()}


@registry.register("cf_user_signal")
class CfUserSignalEvaluator:
  """The CF score's HR/NDCG of the targets of training and split prompts."""

  def __init__(
    self, name, config, *, sampler, dataset, model=None, seed=0, **unused
  ):
    del unused
    self.name, self.config, self.split = name, config, config["split"]
    self.sampler = sampler
    self.num_items = dataset.num_items
    self._soft_tokens = None
    if model is not None and model.adapter in ("qformer", "mlp"):
      self._soft_tokens = jax.jit(model.unit_soft_tokens, static_argnums=1)
    self.tasks = tuple(config.get("tasks", USER_TASKS))
    wrong = [t for t in self.tasks if t not in USER_TASKS]
    if wrong:
      raise ValueError(
        f"evals.{name}.tasks has {wrong}: only tasks whose prompts hold a "
        f"{{user}} row can be scored, {USER_TASKS}."
      )
    self.num_prompts = int(config.get("num_prompts", 2000))
    self.ks = tuple(config.get("ks", (5, 10)))
    self.users = generative.seeded_subset(
      dataset.num_users, config.get("num_users", 0), seed
    )
    # Both user tasks ask each user for the split's target item.
    self.targets = generative.split_targets(dataset, self.split, self.users)
    # Their {user} rows: the users' own, or their states before the target.
    self.rows = sampler.split_user_rows(self.split, self.users)

  def _training_pairs(self, task) -> tuple[np.ndarray, np.ndarray]:
    requests = [
      self.sampler.training_request(i, task=task)
      for i in range(self.num_prompts)
    ]
    return (
      np.array([r.user_index for r in requests], np.int64),
      np.array([r.target_item for r in requests], np.int64),
    )

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    """Yields (metric name, mean) pairs, the counts, and the per-user block.

    Args:
      params: the phase's params; only `params["cf"]` ({"items": float
        `[num_items, d]`, "users": float `[num_users, d]`}) is read.
    """
    tables = jax.device_get(params["cf"])
    items = np.asarray(tables["items"], np.float32)
    users = np.asarray(tables["users"], np.float32)
    block: dict[str, np.ndarray] = {}
    for task in self.tasks:
      if self.num_prompts:
        who, targets = self._training_pairs(task)
        values = target_metrics(users[who], items, targets, self.ks)
        for metric, per_prompt in values.items():
          yield f"cf_signal/{task}/train_prompts/{metric}", per_prompt.mean()
      values = target_metrics(users[self.rows], items, self.targets, self.ks)
      for metric, per_user in values.items():
        block[f"cf_signal/{task}/{metric}"] = per_user
        yield f"cf_signal/{task}/{metric}", per_user.mean()
    if self._soft_tokens is not None:
      values = target_metrics(
        self._unit_tokens(params, prompts.USER, self.rows),
        self._unit_tokens(params, prompts.ITEM, np.arange(self.num_items)),
        self.targets,
        self.ks,
      )
      for metric, per_user in values.items():
        block[f"cf_signal/soft_tokens/{metric}"] = per_user
        yield f"cf_signal/soft_tokens/{metric}", per_user.mean()
    yield "cf_signal/train_prompts", float(self.num_prompts)
    yield "cf_signal/users", float(len(self.users))
    yield metric_writer.PER_USER, {"user_ids": self.users, **block}

  def _unit_tokens(self, params, kind: int, ids: np.ndarray) -> np.ndarray:
    """`IlmModel.unit_soft_tokens` of entities `ids`, in chunks: [N, T*D]."""
    return np.concatenate(
      [
        np.asarray(
          self._soft_tokens(
            params, kind, np.asarray(ids[start : start + _CHUNK], np.int32)
          )
        )
        for start in range(0, len(ids), _CHUNK)
      ]
    )
