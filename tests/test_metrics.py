"""Ranking metrics against hand-computed ranks, ties and exclusions included."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax import metrics

INV_LOG2_3 = 1.0 / math.log2(3.0)  # NDCG gain at rank 1 (0-based)


def _metrics(scores, targets, ties="pessimistic", exclude=None, ks=(1, 2, 5)):
  exclude = None if exclude is None else jnp.asarray(exclude)
  results = metrics.ranking_metrics(
    jnp.asarray(scores, jnp.float32), jnp.asarray(targets), ks, exclude, ties
  )
  return {k: np.asarray(v) for k, v in results.items()}


def test_rank_without_ties():
  # Target item 2 (0.5) is beaten only by item 0 (0.9): rank 1.
  result = _metrics([[0.9, 0.1, 0.5, 0.3]], [2])
  assert result["hr@1"][0] == 0.0
  assert result["hr@2"][0] == 1.0
  assert result["ndcg@1"][0] == 0.0
  np.testing.assert_allclose(result["ndcg@2"][0], INV_LOG2_3, rtol=1e-6)
  np.testing.assert_allclose(result["ndcg@5"][0], INV_LOG2_3, rtol=1e-6)


def test_rank_counts_by_hand():
  greater, tied = metrics.rank_counts(
    jnp.array([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]),
    jnp.array([0, 4]),
  )
  # Row 0: nothing above 3.0, items 2 and 4 tie. Row 1: four ties.
  np.testing.assert_array_equal(greater, [0, 0])
  np.testing.assert_array_equal(tied, [2, 4])


@pytest.mark.parametrize(
  "ties, expected",
  [
    # Target (item 1) ties with items 2 and 3, nothing scores higher.
    # Possible ranks: 0, 1, 2.
    ("pessimistic", {"hr@1": 0, "hr@2": 0, "hr@5": 1, "ndcg@2": 0.0}),
    ("optimistic", {"hr@1": 1, "hr@2": 1, "hr@5": 1, "ndcg@2": 1.0}),
    (
      "expected",
      {"hr@1": 1 / 3, "hr@2": 2 / 3, "hr@5": 1, "ndcg@2": (1 + INV_LOG2_3) / 3},
    ),
  ],
)
def test_tie_policies(ties, expected):
  result = _metrics([[1.0, 2.0, 2.0, 2.0, 0.0]], [1], ties=ties)
  for name, value in expected.items():
    np.testing.assert_allclose(result[name][0], value, rtol=1e-6, err_msg=name)
  ndcg5 = {
    "pessimistic": 0.5,  # rank 2: 1 / log2(4)
    "optimistic": 1.0,
    "expected": (1 + INV_LOG2_3 + 0.5) / 3,
  }[ties]
  np.testing.assert_allclose(result["ndcg@5"][0], ndcg5, rtol=1e-6)


def test_expected_ties_of_a_constant_scorer_give_chance_level():
  num_items, k = 10, 5
  result = _metrics(np.zeros((3, num_items)), [0, 4, 9], "expected", ks=(k,))
  np.testing.assert_allclose(result["hr@5"], k / num_items, rtol=1e-6)
  # Pessimistic ties rank the target last: a constant scorer gets nothing.
  result = _metrics(np.zeros((3, num_items)), [0, 4, 9], ks=(k,))
  np.testing.assert_array_equal(result["hr@5"], 0.0)


def test_excluded_items_are_not_candidates_but_the_target_always_is():
  scores = [[5.0, 4.0, 3.0, 2.0, 1.0]]
  # Target item 3: items 0, 1, 2 score higher (rank 3).
  assert _metrics(scores, [3], ks=(3,))["hr@3"][0] == 0.0
  exclude = [[True, True, False, True, False]]  # excludes the target too
  result = _metrics(scores, [3], exclude=exclude, ks=(1, 2))
  # Only item 2 is left above it: rank 1.
  assert result["hr@1"][0] == 0.0
  assert result["hr@2"][0] == 1.0
  np.testing.assert_allclose(result["ndcg@2"][0], INV_LOG2_3, rtol=1e-6)


def test_excluded_items_do_not_tie():
  exclude = [[False, True, False]]
  result = _metrics([[1.0, 1.0, 0.0]], [0], exclude=exclude, ks=(1,))
  assert result["hr@1"][0] == 1.0  # item 1 would tie, but it is excluded


def test_nan_target_ranks_last():
  result = _metrics([[np.nan, 0.0, 1.0]], [0], ties="optimistic", ks=(2,))
  assert result["hr@2"][0] == 0.0
  greater, tied = metrics.rank_counts(
    jnp.array([[np.nan, 0.0, 1.0]]), jnp.array([0])
  )
  assert (int(greater[0]), int(tied[0])) == (2, 0)


def _reference_ranks(scores, targets, ties):
  """Independent reference: sort each row, place the target among ties."""
  ranks = []
  for row, target in zip(scores, targets, strict=True):
    order = sorted(range(len(row)), key=lambda i: -row[i])  # stable
    tied = [i for i in order if row[i] == row[target]]
    first = order.index(tied[0])
    if ties == "pessimistic":
      ranks.append(first + len(tied) - 1)
    else:
      ranks.append(first)
  return np.array(ranks)


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_random_integer_scores_match_a_sorting_reference(ties):
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, size=(64, 30)).astype(np.float32)  # many ties
  targets = rng.integers(0, 30, size=64)
  ranks = _reference_ranks(scores, targets, ties)
  result = _metrics(scores, targets, ties=ties, ks=(5, 10))
  for k in (5, 10):
    np.testing.assert_array_equal(result[f"hr@{k}"], ranks < k)
    expected_ndcg = np.where(ranks < k, 1 / np.log2(ranks + 2.0), 0.0)
    np.testing.assert_allclose(result[f"ndcg@{k}"], expected_ndcg, rtol=1e-6)


def test_unknown_tie_policy_is_rejected():
  with pytest.raises(ValueError, match="ties="):
    _metrics([[1.0, 0.0]], [0], ties="random")
