"""Full-ranking metrics with one held-out item per user: HR@k and NDCG@k.

Every per-user function is pure jnp, works on a batch of users and jits;
`catalog_coverage`, a property of all users' lists together, is numpy on
the host. The rank of the target is 0-based: rank 0 means it scored
highest.

Ties. Let g be the number of candidates scored strictly above the target and
e the number of other candidates scored exactly equal to it. The target's
rank under each policy is
  pessimistic  g + e: the target comes after every tied item (the default:
               a model cannot gain from ties; a constant scorer gets 0);
  optimistic   g: the target comes before every tied item;
  expected     uniform over g, ..., g + e: the exact expectation of the
               metric under a random tie-break (a constant scorer gets
               chance level, k / num_candidates for HR@k).
HR@k = P(rank < k); NDCG@k = E[1 / log2(rank + 2) if rank < k else 0]
(the ideal DCG is 1 with a single relevant item).

Candidates are all items unless `exclude` removes some (e.g. the user's
history); the target is always a candidate, even if `exclude` marks it.
"""

import jax
import jax.numpy as jnp
import numpy as np

TIE_POLICIES = ("pessimistic", "optimistic", "expected")


def rank_counts(
  scores: jax.Array, targets: jax.Array, exclude: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Counts the candidates scored above and equal to each target.

  Args:
    scores: float [batch, num_items].
    targets: int [batch], the held-out item of each row.
    exclude: optional bool [batch, num_items], True on items that are not
      candidates (they neither outrank nor tie the target). The target
      itself is never excluded.

  Returns:
    (num_greater, num_tied), int32 [batch] each; num_tied excludes the
    target itself. A NaN target score counts as below every candidate.
  """
  num_items = scores.shape[-1]
  is_target = jnp.arange(num_items)[None, :] == targets[:, None]
  candidate = ~is_target
  if exclude is not None:
    candidate &= ~exclude
  target_scores = jnp.take_along_axis(scores, targets[:, None], axis=-1)
  num_greater = jnp.sum(candidate & (scores > target_scores), axis=-1)
  num_tied = jnp.sum(candidate & (scores == target_scores), axis=-1)
  # A NaN target score compares false with everything, which would rank it
  # first; rank it last instead so a broken model cannot score well.
  nan_target = jnp.isnan(target_scores[:, 0])
  num_greater = jnp.where(nan_target, jnp.sum(candidate, -1), num_greater)
  num_tied = jnp.where(nan_target, 0, num_tied)
  return num_greater.astype(jnp.int32), num_tied.astype(jnp.int32)


def _rank_range(
  num_greater: jax.Array, num_tied: jax.Array, ties: str
) -> tuple[jax.Array, jax.Array]:
  """(lowest possible rank, number of equally likely ranks) per row."""
  if ties == "pessimistic":
    return num_greater + num_tied, jnp.ones_like(num_greater)
  if ties == "optimistic":
    return num_greater, jnp.ones_like(num_greater)
  if ties == "expected":
    return num_greater, num_tied + 1
  raise ValueError(f"ties={ties!r}: expected one of {TIE_POLICIES}.")


def _expected_gain(
  num_greater: jax.Array,
  num_tied: jax.Array,
  k: int,
  ties: str,
  gain_of_rank: jax.Array,
) -> jax.Array:
  """E[gain_of_rank[rank]] over the tie policy's ranks; 0 for ranks >= k."""
  first, count = _rank_range(num_greater, num_tied, ties)
  ranks = jnp.arange(k)[None, :]
  possible = (ranks >= first[:, None]) & (ranks < (first + count)[:, None])
  total = jnp.sum(jnp.where(possible, gain_of_rank[None, :], 0.0), axis=-1)
  return total / count.astype(jnp.float32)


def hit_rate(
  num_greater: jax.Array,
  num_tied: jax.Array,
  k: int,
  ties: str = "pessimistic",
) -> jax.Array:
  """HR@k per row (float32 [batch]) from `rank_counts`."""
  return _expected_gain(
    num_greater, num_tied, k, ties, jnp.ones((k,), jnp.float32)
  )


def ndcg(
  num_greater: jax.Array,
  num_tied: jax.Array,
  k: int,
  ties: str = "pessimistic",
) -> jax.Array:
  """NDCG@k per row (float32 [batch]) from `rank_counts`."""
  discounts = 1.0 / jnp.log2(jnp.arange(k, dtype=jnp.float32) + 2.0)
  return _expected_gain(num_greater, num_tied, k, ties, discounts)


def ranking_metrics(
  scores: jax.Array,
  targets: jax.Array,
  ks=(5, 10),
  exclude: jax.Array | None = None,
  ties: str = "pessimistic",
) -> dict[str, jax.Array]:
  """HR@k and NDCG@k for every k, per row.

  Args:
    scores: float [batch, num_items]; higher is better.
    targets: int [batch].
    ks: cut-offs.
    exclude: optional bool [batch, num_items] of non-candidates.
    ties: one of TIE_POLICIES.

  Returns:
    {"hr@k": float32 [batch], "ndcg@k": float32 [batch], ...}.
  """
  if ties not in TIE_POLICIES:
    raise ValueError(f"ties={ties!r}: expected one of {TIE_POLICIES}.")
  num_greater, num_tied = rank_counts(scores, targets, exclude)
  results = {}
  for k in ks:
    results[f"hr@{k}"] = hit_rate(num_greater, num_tied, k, ties)
    results[f"ndcg@{k}"] = ndcg(num_greater, num_tied, k, ties)
  return results


def catalog_coverage(ranked: np.ndarray, num_items: int, k: int) -> float:
  """Catalogue coverage@k: the share of all items in any user's top-k list.

  Aggregate diversity (Adomavicius & Kwon, 2012; "catalog coverage" in Ge
  et al., 2010): 1.0 when the lists together name every item, k / items
  when every user gets the same list. Low coverage with a high HR@k is a
  popularity-like recommender.

  Args:
    ranked: int [users, >= k] ranked item ids, best first (-1: empty slot).
    num_items: catalogue size (> 0).
    k: list length counted (1 <= k <= ranked.shape[1]).

  Returns:
    |union of the users' top-k items| / num_items, in [0, 1].

  Raises:
    ValueError: k outside [1, ranked.shape[1]] or num_items < 1.
  """
  if num_items < 1 or not 1 <= k <= ranked.shape[1]:
    raise ValueError(
      f"catalog_coverage needs num_items >= 1 and 1 <= k <= {ranked.shape[1]}"
      f" (the list length); got num_items={num_items}, k={k}."
    )
  top = ranked[:, :k]
  return len(np.unique(top[top >= 0])) / num_items
