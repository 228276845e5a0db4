"""Ranking metrics against hand-computed ranks, ties and exclusions included;
metrics files with per-user results and intervals."""

import json
import math
import types

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import ml1m
from ilm_jax import data, metric_writer, metrics, stats, train
from ilm_jax.evaluators import generative
from ilm_jax.phases import eval as eval_phase

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


# --- Metrics files: per-user results, intervals, the evaluate channel.


class _FakeEvaluator:
  """Yields means and the per-user block they are the means of."""

  def __init__(self, name, split, user_ids, values, prefix=""):
    self.name, self.split, self.prefix = name, split, prefix
    self.user_ids, self.values = np.asarray(user_ids), np.asarray(values)

  def run(self, params):
    del params
    yield self.prefix + "hr@10", float(self.values.mean())
    yield self.prefix + "users", float(len(self.user_ids))
    yield (
      metric_writer.PER_USER,
      {"user_ids": self.user_ids, self.prefix + "hr@10": self.values},
    )


def test_evaluate_routes_per_user_blocks_and_files_carry_them(tmp_path):
  evaluators = [
    _FakeEvaluator("rank", "test", [7, 2, 5, 0], [1.0, 0.0, 1.0, 0.0]),
    _FakeEvaluator(
      "masked", "test", [2, 7, 0, 5], [1.0, 1.0, 0.0, 1.0], prefix="masked_"
    ),
    _FakeEvaluator("rank_valid", "valid", [3, 1], [0.0, 0.0]),
  ]
  per_user = {}
  results = train.evaluate(evaluators, params=None, per_user=per_user)
  # Scalars stay floats; blocks are merged per split, sorted by user.
  assert results == {
    "test/hr@10": 0.5,
    "test/users": 4.0,
    "test/masked_hr@10": 0.75,
    "test/masked_users": 4.0,
    "valid/hr@10": 0.0,
    "valid/users": 2.0,
  }
  np.testing.assert_array_equal(per_user["test"]["user_ids"], [0, 2, 5, 7])
  np.testing.assert_array_equal(per_user["test"]["hr@10"], [0, 0, 1, 1])
  np.testing.assert_array_equal(per_user["test"]["masked_hr@10"], [0, 1, 1, 1])
  # Without a dict to fill, the blocks are dropped and the scalars equal.
  assert train.evaluate(evaluators, params=None) == results

  train.write_split_metrics(
    tmp_path, "toy", results, per_user, {"train": {"steps": 3}}
  )
  saved = json.loads((tmp_path / "metrics" / "toy_test.json").read_text())
  assert saved["train"] == {"steps": 3}
  assert saved["users"] == 4.0
  assert saved["per_user"]["user_ids"] == [0, 2, 5, 7]
  # Per-user values add up to the reported means.
  for name in ("hr@10", "masked_hr@10"):
    assert np.mean(saved["per_user"][name]) == saved[name]
  # Intervals of the means: hits are a proportion (Wilson, 2 of 4).
  low, high = saved["hr@10_ci95"]
  np.testing.assert_allclose(
    [low, high], stats.mean_interval([1, 1, 0, 0], proportion=True)
  )
  assert 0.0 < low < 0.5 < high < 1.0
  assert "users_ci95" not in saved  # not a per-user metric
  valid = json.loads((tmp_path / "metrics" / "toy_valid.json").read_text())
  # Every user missed: Wilson's upper bound z^2 / (2 + z^2), not a point.
  z2 = 1.959963984540054**2
  np.testing.assert_allclose(valid["hr@10_ci95"], [0.0, z2 / (2 + z2)])


def test_re_evaluating_a_trained_model_keeps_the_other_metrics(tmp_path):
  def write(evaluators, trained):
    per_user = {}
    results = train.evaluate(evaluators, params=None, per_user=per_user)
    train.write_split_metrics(
      tmp_path, "toy", results, per_user, {"train": trained}
    )
    return json.loads((tmp_path / "metrics" / "toy_test.json").read_text())

  rank = _FakeEvaluator("rank", "test", [7, 2, 5, 0], [1.0, 0.0, 1.0, 0.0])
  write([rank], {"steps": 3})
  # The same step again with only a masked evaluator on three other users:
  # the unmasked metrics stay, the union of users gets NaN (null) holes.
  masked = _FakeEvaluator(
    "masked", "test", [9, 2, 7], [1.0, 1.0, 0.0], prefix="masked_"
  )
  saved = write([masked], {"steps": 3})
  assert saved["hr@10"] == 0.5 and saved["masked_hr@10"] == pytest.approx(2 / 3)
  block = saved["per_user"]
  assert block["user_ids"] == [0, 2, 5, 7, 9]
  assert block["hr@10"] == [0.0, 0.0, 1.0, 1.0, None]
  assert block["masked_hr@10"] == [None, 1.0, None, 0.0, 1.0]
  # Re-measured metrics are replaced, not merged.
  rank_again = _FakeEvaluator("rank", "test", [7, 2], [0.0, 0.0])
  saved = write([rank_again], {"steps": 3})
  assert saved["hr@10"] == 0.0 and saved["masked_hr@10"] == pytest.approx(2 / 3)
  assert saved["per_user"]["hr@10"] == [None, 0.0, None, 0.0, None]
  # Another trained step: a fresh file.
  saved = write([masked], {"steps": 4})
  assert "hr@10" not in saved and saved["per_user"]["user_ids"] == [2, 7, 9]


def test_merge_marks_users_a_block_did_not_evaluate():
  merged = metric_writer.merge_per_user(
    [
      {"user_ids": np.array([4, 1]), "a": np.array([0.4, 0.1])},
      {"user_ids": np.array([1, 9]), "b": np.array([1.0, 9.0])},
    ]
  )
  np.testing.assert_array_equal(merged["user_ids"], [1, 4, 9])
  np.testing.assert_array_equal(merged["a"], [0.1, 0.4, np.nan])
  np.testing.assert_array_equal(merged["b"], [1.0, np.nan, 9.0])
  with pytest.raises(ValueError, match="two blocks"):
    metric_writer.merge_per_user(
      [{"user_ids": [1], "a": [0.0]}, {"user_ids": [2], "a": [1.0]}]
    )


def test_metrics_file_round_trips_with_missing_users(tmp_path):
  path = tmp_path / "m.json"
  per_user = {
    "user_ids": np.array([3, 1, 2]),
    "hr@10": np.array([1.0, 0.0, np.nan]),
    "rank": np.array([2.0, -1.0, np.nan]),
  }
  metric_writer.write_metrics(path, {"hr@10": 0.5}, per_user)
  text = path.read_text()
  assert '"user_ids": [1, 2, 3]' in text  # one line per array
  saved = json.loads(text)
  assert saved["per_user"]["hr@10"] == [0.0, None, 1.0]
  assert saved["users"] == 3.0
  assert "rank_ci95" not in saved  # rank is not a mean in the file
  arrays = metric_writer.read_per_user(saved)
  np.testing.assert_array_equal(arrays["user_ids"], [1, 2, 3])
  np.testing.assert_array_equal(arrays["rank"], [-1.0, np.nan, 2.0])
  assert metric_writer.read_per_user({"hr@10": 0.5}) is None


def test_user_subsets_are_nested_prefixes_of_one_permutation():
  small = generative.seeded_subset(6040, 100, seed=0)
  large = generative.seeded_subset(6040, 500, seed=0)
  np.testing.assert_array_equal(large[:100], small)
  assert len(np.unique(large)) == 500
  everyone = generative.seeded_subset(6040, 0, seed=0)
  np.testing.assert_array_equal(everyone[:500], large)
  np.testing.assert_array_equal(np.sort(everyone), np.arange(6040))
  assert not np.array_equal(generative.seeded_subset(6040, 100, seed=1), small)


def test_catalog_coverage_counts_distinct_listed_items():
  ranked = np.array([[4, 1, -1], [4, 2, 3], [4, 1, 0]])
  # Top-1: only item 4 -> 1 of 10 items; top-2: {4, 1, 2}; top-3 adds 3, 0
  # (the empty slot -1 is not an item).
  assert metrics.catalog_coverage(ranked, 10, 1) == pytest.approx(0.1)
  assert metrics.catalog_coverage(ranked, 10, 2) == pytest.approx(0.3)
  assert metrics.catalog_coverage(ranked, 10, 3) == pytest.approx(0.5)
  # One identical list for everyone: k / items, however many users.
  same = np.tile(np.arange(3), (50, 1))
  assert metrics.catalog_coverage(same, 6, 3) == pytest.approx(0.5)
  for k, items in ((0, 10), (4, 10), (1, 0)):
    with pytest.raises(ValueError, match="catalog_coverage needs"):
      metrics.catalog_coverage(ranked, items, k)


def test_generative_ranking_per_user_block_adds_up_to_the_means():
  evaluator = object.__new__(generative.GenerativeRankingEvaluator)
  evaluator.name, evaluator.split = "rank", "test"
  evaluator.tasks = ("sequential",)
  evaluator.prefix = ""  # unmasked lists
  evaluator.templates = ("seen", "unseen")
  evaluator.users = np.array([5, 2, 7])
  evaluator.dataset = types.SimpleNamespace(num_items=20)
  templates = []

  def evaluation_request(task, user, split, unseen, template_index):
    templates.append((user, unseen, template_index))
    return types.SimpleNamespace(target_item=user)  # the target is the id

  evaluator.sampler = types.SimpleNamespace(
    evaluation_request=evaluation_request
  )
  # Beam lists (top 3) per user 5, 2, 7: target 5 at position 1, target 2
  # absent, target 7 first; the unseen lists miss everyone.
  lists = {
    False: np.array([[0, 5, 1], [3, 4, -1], [7, 8, 9]]),
    True: np.array([[0, 1, 3], [3, 4, 6], [8, 9, 10]]),
  }
  evaluator._rank = lambda params, requests, what: lists["unseen" in what]
  # Watched before the target, and the popular items.
  evaluator._history_of = {5: np.array([0, 4]), 2: np.array([9]), 7: []}
  evaluator._popular = np.array([3, 8])
  results = list(evaluator.run(params=None))
  scalars = {k: v for k, v in results if k != "per_user"}
  (block,) = [v for k, v in results if k == "per_user"]
  # Each user's seen template is its position in the subset.
  assert templates[:3] == [(5, False, 0), (2, False, 1), (7, False, 2)]
  np.testing.assert_array_equal(block["user_ids"], [5, 2, 7])
  np.testing.assert_array_equal(block["sequential/seen/rank"], [1, 3, 0])
  np.testing.assert_array_equal(block["sequential/unseen/rank"], [3, 3, 3])
  np.testing.assert_array_equal(block["sequential/seen/hr@5"], [1, 0, 1])
  np.testing.assert_allclose(
    block["sequential/seen/ndcg@5"], [INV_LOG2_3, 0.0, 1.0], rtol=1e-6
  )
  for which in ("seen", "unseen"):
    for metric in ("hr@5", "hr@10", "ndcg@5", "ndcg@10"):
      name = f"sequential/{which}/{metric}"
      assert np.mean(block[name], dtype=np.float64) == scalars[name]
  assert scalars["sequential/seen/hr@10"] == pytest.approx(2 / 3)
  assert scalars["users"] == 3
  # First titles: seen 0, 3, 7; unseen 0, 3, 8.
  for which, watched, popular in (
    ("seen", [1, 0, 0], [0, 1, 0]),
    ("unseen", [1, 0, 0], [0, 1, 1]),
  ):
    for metric, expected in (
      ("share_top1_in_history", watched),
      ("share_top1_popular", popular),
    ):
      name = f"sequential/{which}/{metric}"
      np.testing.assert_array_equal(block[name], expected)
      assert scalars[name] == pytest.approx(np.mean(expected))
    # The first titles' ids per user, never averaged; coverage@1 is the 3
    # distinct first titles of 20 items; lists of 3 have no coverage@10.
    np.testing.assert_array_equal(
      block[f"sequential/{which}/top1_item"], lists[which == "unseen"][:, 0]
    )
    assert f"sequential/{which}/top1_item" not in scalars
    assert scalars[f"sequential/{which}/coverage@1"] == pytest.approx(3 / 20)
    assert f"sequential/{which}/coverage@10" not in scalars


# --- The results tables of the eval phase.


def _write_row(workdir, prefix, user_ids, hits, ndcg, phase2=True, **more):
  names = (
    ("sequential/seen/hr@10", "sequential/seen/ndcg@10")
    if phase2
    else ("hr@10", "ndcg@10")
  )
  per_user = {"user_ids": np.asarray(user_ids)}
  per_user[names[0]], per_user[names[1]] = np.asarray(hits), np.asarray(ndcg)
  for name, column in more.items():  # other per-user columns
    per_user[name.replace("__", "/")] = np.asarray(column)
    names += (name.replace("__", "/"),)
  scalars = {n: float(np.mean(per_user[n])) for n in names}
  scalars["users"] = float(len(user_ids))
  metric_writer.write_metrics(
    workdir / "metrics" / f"{prefix}_test.json", scalars, per_user
  )


def test_results_tables_report_intervals_and_paired_tests(tmp_path):
  # ILM evaluates users 0-29 and hits 0-9; the MLP row evaluates users
  # 0-19 only and hits 0 and 2-18.
  users = np.arange(30)
  ilm_hits = (users < 10).astype(float)
  _write_row(
    tmp_path,
    "ilm",
    users,
    ilm_hits,
    ilm_hits * 0.5,
    sequential__target_nll_gain=users * 0.01,  # mean 0.145
    sequential__seen__share_top1_in_history=users < 3,  # 0.1
    sequential__seen__share_top1_popular=users < 15,  # 0.5
    naming__seen__share_title_exact=users < 6,  # 0.2
    **{"sequential__unseen__hr@10": ilm_hits},
  )
  mlp_users = np.arange(20)
  mlp_hits = ((mlp_users == 0) | (mlp_users >= 2)).astype(float)
  mlp_hits[19] = 0.0
  _write_row(
    tmp_path,
    "ilm_mlp",
    mlp_users,
    mlp_hits,
    mlp_hits * 0.25,
    **{"sequential__unseen__hr@10": mlp_hits},
  )
  _write_row(tmp_path, "ilm_curve_s80", users, ilm_hits, ilm_hits * 0.5)
  _write_row(tmp_path, "sasrec", np.arange(60), np.ones(60), np.ones(60), False)
  metric_writer.write_json(
    tmp_path / "metrics" / "popularity_test.json",
    {"hr@10": 0.1, "ndcg@10": 0.05, "users": 60.0, "coverage@10": 0.1},
  )
  # Coverage is a scalar over all users (no per-user column).
  ilm_file = tmp_path / "metrics" / "ilm_test.json"
  ilm = json.loads(ilm_file.read_text())
  ilm.update(
    {"sequential/seen/coverage@1": 0.05, "sequential/seen/coverage@10": 0.3}
  )
  metric_writer.write_json(ilm_file, ilm)
  table = eval_phase.results_table(tmp_path, num_items=100)
  ilm = json.loads(ilm_file.read_text())
  low, high = ilm["sequential/seen/hr@10_ci95"]
  assert low < 1 / 3 < high
  ilm_line = next(
    line for line in table.splitlines() if line.startswith("| ILM (Q")
  )
  assert f"| 30 | 0.3333 [{low:.4f}, {high:.4f}] |" in ilm_line
  assert ilm_line.split(" | ")[-2] == "yes"  # per-user results
  gain_low, gain_high = ilm["sequential/target_nll_gain_ci95"]
  assert gain_low < 0.145 < gain_high
  assert ilm_line.split(" | ")[-6] == (
    f"0.1450 [{gain_low:.4f}, {gain_high:.4f}]"
  )
  # Named targets: a proportion, so a Wilson interval.
  wilson = scipy.stats.binomtest(6, 30).proportion_ci(method="wilson")
  assert ilm_line.split(" | ")[-5] == (
    f"0.2000 [{wilson.low:.4f}, {wilson.high:.4f}]"
  )
  assert ilm_line.split(" | ")[-4] == "0.100 / 0.500"
  assert ilm_line.split(" | ")[-3] == "0.050 / 0.300"
  # Chance: a random top-10 of 100 items hits with 0.1; 10 of 30 users hit.
  # P(X >= 10), X ~ Binomial(30, 0.1), by hand.
  tail = sum(math.comb(30, i) * 0.1**i * 0.9 ** (30 - i) for i in range(10, 31))
  assert f"| 3.3x, p = {tail:.3g} |" in ilm_line
  # Shares are proportions: Wilson intervals, like HR.
  low, high = ilm["sequential/seen/share_top1_popular_ci95"]
  wilson = scipy.stats.binomtest(15, 30).proportion_ci(method="wilson")
  assert (low, high) == pytest.approx((wilson.low, wilson.high))
  popularity = next(
    line for line in table.splitlines() if line.startswith("| Popularity")
  )
  assert "| 60 | 0.1000 | 0.0500 | – | – |" in popularity
  assert popularity.split(" | ")[-2] == "no"  # marked, still printed
  assert popularity.split(" | ")[-3] == "– / 0.100"  # phase 0: no @1
  assert "| 1.0x, p = " in popularity  # 6 of 60 hit: chance's own rate
  # SASRec hits all 60 users: p = 0.1**60 = 1e-60; the tail is printed,
  # never a bare 0 (below float64's range: "< 1e-300").
  sasrec = next(line for line in table.splitlines() if "SASRec" in line)
  assert "| 10.0x, p = 1e-60 |" in sasrec
  assert eval_phase._p_cell(0.0) == "< 1e-300"
  assert "| 3.3x" not in eval_phase.results_table(tmp_path)  # no catalogue
  assert "| ilm_curve_s80 | 30 |" in table  # extra variants follow

  paired = eval_phase.paired_table(tmp_path, "seen")
  mlp_line = next(line for line in paired.splitlines() if "CoLLM" in line)
  cells = [c.strip() for c in mlp_line.strip("|").split("|")]
  # 20 common users; only ILM hits user 1, only MLP hits users 10-18 (9).
  # McNemar: 2 * (C(10,0) + C(10,1)) / 2**10 = 0.021484375.
  assert cells[1] == "20"
  assert cells[2] == "0.5000 / 0.9000"
  assert cells[3] == "1 / 9"
  assert cells[4] == "0.0215"
  # NDCG@10: ILM 0.5 * hits, MLP 0.25 * hits on users 0-19.
  difference = np.mean(0.5 * ilm_hits[:20] - 0.25 * mlp_hits)
  assert cells[5].startswith(f"{difference:+.4f} [")
  expected_p = stats.paired_bootstrap(
    0.5 * ilm_hits[:20], 0.25 * mlp_hits
  ).p_value
  assert cells[6] == f"{expected_p:.3g}"
  # SASRec (phase 0) is compared on the seen column; the old-format
  # popularity file has no per-user data; an identical row gives p = 1.
  sasrec_line = next(line for line in paired.splitlines() if "SASRec" in line)
  assert "| 30 | 0.3333 / 1.0000 | 0 / 20 |" in sasrec_line
  assert "no per-user data" in next(
    line for line in paired.splitlines() if "Popularity" in line
  )
  same = next(line for line in paired.splitlines() if "curve" in line)
  assert same.rstrip(" |").endswith("| 1")
  assert "0 / 0 | 1 |" in same
  # Phase-0 rows have no unseen templates: only phase-2 rows there.
  unseen = eval_phase.paired_table(tmp_path, "unseen")
  assert "SASRec" not in unseen and "CoLLM" in unseen
  # A seen-only run (the curve row) is left out of the unseen table.
  assert "curve" in paired and "curve" not in unseen


def test_another_reference_row_gets_its_own_paired_tables(tmp_path):
  users = np.arange(20)
  ilm_hits = (users < 10).astype(float)  # users 0-9
  mlp_hits = (users >= 1).astype(float)  # users 1-19
  _write_row(tmp_path, "ilm", users, ilm_hits, ilm_hits * 0.5)
  _write_row(tmp_path, "ilm_mlp", users, mlp_hits, mlp_hits * 0.25)
  paired = eval_phase.paired_table(tmp_path, "seen", reference="ilm_mlp")
  assert paired.startswith("| ilm_mlp vs | common users | HR@10 ilm_mlp / row")
  ilm_line = next(line for line in paired.splitlines() if "ILM (Q" in line)
  # Only the MLP row hits users 10-19 (10), only the ILM user 0 (1):
  # McNemar 2 * (C(11,0) + C(11,1)) / 2**11 = 0.01171875.
  assert "| 20 | 0.9500 / 0.5000 | 10 / 1 | 0.0117 |" in ilm_line
  assert "CoLLM" not in paired  # the reference is not compared with itself
  assert eval_phase.paired_table(tmp_path, reference="ilm_rand") == ""

  # The eval phase writes it beside results.md, which keeps the main ILM.
  config = ml1m.get_config("tiny")
  eval_phase.run(config, tmp_path, mesh=None)
  main = (tmp_path / "results.md").read_text()
  config.eval.reference = "ilm_mlp"
  eval_phase.run(config, tmp_path, mesh=None)
  assert (tmp_path / "results.md").read_text() == main
  other = (tmp_path / "results_ilm_mlp.md").read_text()
  assert "## ilm_mlp against each row (seen templates" in other
  assert "## ILM against each row (seen templates" in main
  config.eval.reference = "ilm_rand"  # no such metrics file
  with pytest.raises(ValueError, match="config.eval.reference='ilm_rand'"):
    eval_phase.run(config, tmp_path, mesh=None)


def test_files_measured_on_other_data_are_never_paired(tmp_path):
  users = np.arange(20)
  hits = (users < 10).astype(float)

  def row(prefix, digest):
    _write_row(tmp_path, prefix, users, hits, hits * 0.5)
    if digest is not None:
      path = tmp_path / "metrics" / f"{prefix}_test.json"
      values = json.loads(path.read_text())
      values["dataset"] = {"name": "ml100k", "interactions_digest": digest}
      path.write_text(json.dumps(values))

  row("ilm", "aaaa")
  row("ilm_mlp", None)  # written before the record existed: not checked
  row("ilm_rand", "aaaa")
  assert "| 20 |" in eval_phase.paired_table(tmp_path)
  # The config's own data must match too (the tiny config: synthetic).
  config = ml1m.get_config("tiny")
  with pytest.raises(ValueError, match=r"config.data \(synthetic\)") as error:
    eval_phase.run(config, tmp_path, mesh=None)
  assert "digest aaaa: ilm_test.json (ml100k), ilm_rand_test.json" in str(
    error.value
  )
  row("ilm_textonly", "bbbb")
  for table in (
    eval_phase.results_table,
    eval_phase.paired_table,
    eval_phase.seeds_table,
  ):
    with pytest.raises(ValueError, match="digest bbbb: ilm_textonly_test.json"):
      table(tmp_path)
  # Files from the config's data make a table.
  (tmp_path / "metrics" / "ilm_textonly_test.json").unlink()
  record = data.load_dataset(config.data).record()
  for prefix in ("ilm", "ilm_rand"):
    row(prefix, record["interactions_digest"])
  eval_phase.run(config, tmp_path, mesh=None)
  assert "| ILM (Q" in (tmp_path / "results.md").read_text()


def test_masked_lists_get_their_column_and_paired_table(tmp_path):
  users = np.arange(30)
  hits, masked = (users < 3).astype(float), (users < 12).astype(float)
  _write_row(
    tmp_path,
    "ilm",
    users,
    hits,
    hits,
    **{
      "sequential/seen/masked_hr@10": masked,
      "sequential/seen/masked_ndcg@10": masked * 0.5,
    },
  )
  _write_row(tmp_path, "ilm_mlp", users, hits, hits)  # unmasked only
  sasrec_masked = (users < 20).astype(float)
  _write_row(
    tmp_path,
    "sasrec",
    users,
    hits,
    hits,
    False,
    **{"masked_hr@10": sasrec_masked, "masked_ndcg@10": sasrec_masked},
  )
  table = eval_phase.results_table(tmp_path)
  header = table.splitlines()[0].split(" | ")
  column = header.index("seen hr@10, history masked [95% CI]")
  ilm_row = next(line for line in table.splitlines() if "| ILM (Q" in line)
  low, high = stats.mean_interval(masked, proportion=True)
  assert ilm_row.split(" | ")[column] == f"0.4000 [{low:.4f}, {high:.4f}]"
  mlp_row = next(line for line in table.splitlines() if "CoLLM" in line)
  assert mlp_row.split(" | ")[column] == "–"

  paired = eval_phase.paired_table(tmp_path, "seen", masked="masked_")
  assert "CoLLM" not in paired  # no masked lists to compare
  cells = [
    c.strip()
    for c in next(row for row in paired.splitlines() if "SASRec" in row)
    .strip("|")
    .split("|")
  ]
  # 12 vs 20 hits, nested: only SASRec hits users 12-19 (8).
  assert cells[1:5] == ["30", "0.4000 / 0.6667", "0 / 8", "0.00781"]
  # Without masked lists in the ILM row there is no masked table.
  (tmp_path / "metrics" / "ilm_test.json").unlink()
  _write_row(tmp_path, "ilm", users, hits, hits)
  assert eval_phase.paired_table(tmp_path, "seen", masked="masked_") == ""


def test_tables_recompute_intervals_from_the_per_user_values(tmp_path):
  """A file written with an older interval (a bootstrap's [0, 0] at zero
  hits) is tabulated with today's interval of its per-user values."""
  path = tmp_path / "metrics" / "old_test.json"
  metric_writer.write_metrics(
    path, {"hr@10": 0.0}, {"user_ids": np.arange(50), "hr@10": np.zeros(50)}
  )
  payload = json.loads(path.read_text())
  payload["hr@10_ci95"] = [0.0, 0.0]
  current = metric_writer.with_current_intervals(payload)
  assert current["hr@10_ci95"] == list(
    stats.mean_interval(np.zeros(50), proportion=True)
  )
  assert current["hr@10_ci95"][1] > 0.07  # Wilson: z^2 / (50 + z^2)
  assert payload["hr@10_ci95"] == [0.0, 0.0]  # the input is not changed


def test_only_hit_rates_are_proportions():
  for name in ("hr@10", "masked_hr@5", "sequential/seen/hr@10"):
    assert metric_writer.is_proportion(name)
  for name in ("ndcg@10", "masked_ndcg@10", "sequential/unseen/ndcg@5", "rank"):
    assert not metric_writer.is_proportion(name)
  # All-zero NDCG gains are not a proportion: a point, not a Wilson band.
  payload = metric_writer.metrics_payload(
    {"hr@10": 0.0, "ndcg@10": 0.0},
    {"user_ids": np.arange(20), "hr@10": np.zeros(20), "ndcg@10": np.zeros(20)},
  )
  assert payload["ndcg@10_ci95"] == [0.0, 0.0]
  assert payload["hr@10_ci95"][1] > 0.1  # Wilson at 0 of 20


def test_soft_token_table_lists_the_rows_that_measured_them(tmp_path):
  users = np.arange(4)
  _write_row(tmp_path, "ilm", users, np.ones(4), np.ones(4))
  _write_row(tmp_path, "ilm_mlp", users, np.ones(4), np.ones(4))
  assert eval_phase.soft_token_table(tmp_path) == ""  # none measured yet
  path = tmp_path / "metrics" / "ilm_test.json"
  values = json.loads(path.read_text())
  values.update(
    {
      "soft_tokens/items/entity_share": 0.09,
      "soft_tokens/items/entity_cosine": 0.99,
      "soft_tokens/items/norm_over_llm": 8.0,
      "soft_tokens/users/entity_share": 0.5,
      "soft_tokens/users/entity_cosine": 0.25,
    }
  )
  metric_writer.write_json(path, values)
  table = eval_phase.soft_token_table(tmp_path).splitlines()
  assert len(table) == 3  # header, rule, the ILM row only
  # One slot per entity: no slot cosine.
  assert table[2] == (
    "| ILM (Q-Former + projector) | 0.0900 | 0.9900 | – | 8.0000 "
    "| 0.5000 | 0.2500 |"
  )


def test_cf_signal_table_puts_training_prompts_beside_test_users(tmp_path):
  users = np.arange(4)
  _write_row(tmp_path, "ilm", users, np.ones(4), np.ones(4))
  assert eval_phase.cf_signal_table(tmp_path) == ""  # none measured yet
  # The MLP row hits users 0 and 3; the CF row hits users 0, 1 and 2.
  _write_row(
    tmp_path,
    "ilm_mlp",
    users,
    [1, 0, 0, 1],
    np.zeros(4),
    **{"cf_signal/sequential/hr@10": [1, 1, 1, 0]},
  )
  path = tmp_path / "metrics" / "ilm_mlp_test.json"
  values = json.loads(path.read_text())
  values.update(
    {
      "cf_signal/sequential/train_prompts/hr@10": 0.2,
      "cf_signal/straightforward/hr@10": 0.25,
      "cf_signal/soft_tokens/hr@10": 0.5,
      "cf_signal/users": 4.0,
    }
  )
  metric_writer.write_json(path, values)
  table = eval_phase.cf_signal_table(tmp_path).splitlines()
  assert len(table) == 3  # header, rule, the MLP row only
  assert table[0].startswith(
    "| row | sequential: training prompts | sequential: test users |"
  )
  # Straightforward's training figure was not measured: a dash. Hits 1 of
  # the 3 CF hits and 1 of the 1 other user; Fisher's two-sided p for
  # [[1, 2], [1, 0]] is 1 (every table with these margins is as likely).
  assert table[2] == (
    "| MLP projector (CoLLM-style) | 0.2000 | 0.7500 | – | 0.2500 | 0.5000 "
    "| 4 | 1 / 3 vs 1 / 1 | 1 |"
  )


def test_a_file_from_before_the_seed_was_recorded_is_the_same_run(tmp_path):
  path = tmp_path / "metrics" / "toy_test.json"
  rank = _FakeEvaluator("rank", "test", [7, 2], [1.0, 0.0])
  masked = _FakeEvaluator(
    "masked", "test", [7, 2], [0.0, 0.0], prefix="masked_"
  )
  for evaluators, trained in (
    ([rank], {"steps": 3}),  # written before `seed` was recorded
    ([masked], {"steps": 3, "seed": 0}),  # the same run evaluated again
  ):
    per_user = {}
    results = train.evaluate(evaluators, params=None, per_user=per_user)
    train.write_split_metrics(
      tmp_path, "toy", results, per_user, {"train": trained}
    )
  saved = json.loads(path.read_text())
  assert saved["hr@10"] == 0.5 and saved["masked_hr@10"] == 0.0
  assert saved["train"] == {"steps": 3, "seed": 0}
  # Another seed is another trained model: a fresh file.
  per_user = {}
  results = train.evaluate([masked], params=None, per_user=per_user)
  train.write_split_metrics(
    tmp_path, "toy", results, per_user, {"train": {"steps": 3, "seed": 1}}
  )
  assert "hr@10" not in json.loads(path.read_text())


def test_seeds_tables_pair_each_seed_on_common_users(tmp_path):
  users = np.arange(10)

  def row(prefix, hits, nll, seed=None, evaluated=users):
    _write_row(tmp_path, prefix, evaluated, hits, hits * 0.5)
    path = tmp_path / "metrics" / f"{prefix}_test.json"
    values = json.loads(path.read_text())
    values["sequential/target_nll"] = nll
    if seed is not None:
      values["train"] = {"steps": 8, "seed": seed}
    metric_writer.write_json(path, values)

  # Group ilm_a: seed 0 (no suffix, no record), 1 (suffix), 2 (the file's
  # record wins over the suffix). HR@10 0.3, 0.6 (0.5 on users 0-7), 0.4.
  row("ilm_a", users < 3, 1.0)
  row("ilm_a_seed1", (users < 4) | (users >= 8), 1.1)
  row("ilm_a_seed7", users < 4, 1.2, seed=2)
  # Group ilm_b: 0.1, 0.25 (users 0-7 only), 0.1.
  row("ilm_b", users < 1, 1.5)
  row("ilm_b_seed1", users[:8] < 2, 1.5, evaluated=users[:8])
  row("ilm_b_seed2", users < 1, 1.5)
  row("ilm_c", users < 5, 1.5)  # one seed: in no seeds table
  # Two rows of one group with one seed: that group is left out.
  row("ilm_d", users < 1, 1.0)
  row("ilm_d_seed3", users < 1, 1.0, seed=0)
  assert list(eval_phase.seed_groups(tmp_path)) == ["ilm_a", "ilm_b"]

  def t_quantile_2df(q):  # Student's t, 2 degrees of freedom, closed form
    return (2 * q - 1) / math.sqrt(2 * q * (1 - q))

  def p_2df(t):  # two-sided p-value, 2 degrees of freedom, closed form
    return 1 - abs(t) / math.sqrt(2 + t * t)

  table = eval_phase.seeds_table(tmp_path).splitlines()
  assert len(table) == 4
  cells = [c.strip() for c in table[2].strip("|").split("|")]
  assert cells[:3] == ["ilm_a", "0, 1, 2", "3 / 6 / 4"]
  runs = np.array([0.3, 0.6, 0.4])
  half = t_quantile_2df(0.975) * runs.std(ddof=1) / math.sqrt(3)
  assert cells[3] == (
    f"{runs.mean():.4f} [{runs.mean() - half:.4f}, {runs.mean() + half:.4f}]"
  )
  # HR@10 differences per seed on common users: 0.2, 0.25, 0.3 -> mean
  # 0.25, sd 0.05, t = 5 sqrt(3); target NLL: -0.5, -0.4, -0.3 -> t =
  # -4 sqrt(3).
  pairs = eval_phase.seed_pairs_table(tmp_path).splitlines()
  assert len(pairs) == 3
  cells = [c.strip() for c in pairs[2].strip("|").split("|")]
  assert cells[:2] == ["ilm_a - ilm_b", "0, 1, 2"]
  half = t_quantile_2df(0.975) * 0.05 / math.sqrt(3)
  assert cells[2] == f"+0.2500 [{0.25 - half:+.4f}, {0.25 + half:+.4f}]"
  assert cells[3] == f"{p_2df(5 * math.sqrt(3)):.3g}"
  assert cells[7] == f"{p_2df(4 * math.sqrt(3)):.3g}"
  assert cells[6].startswith("-0.4000 [")
  # Over users: every run of both groups evaluated users 0-7. Per-user
  # means over seeds, ilm_a: 1, 1, 1, 2/3, 0...; ilm_b: 1, 1/3, 0, 0, 0...
  # Differences 0, 2/3, 1, 2/3, 0, 0, 0, 0: mean 7/24. Discordant users
  # summed over seeds: only ilm_a 2 + 2 + 3, only ilm_b none.
  pooled = eval_phase.seed_pooled_table(tmp_path).splitlines()
  assert len(pooled) == 3
  cells = [c.strip() for c in pooled[2].strip("|").split("|")]
  assert cells[:4] == ["ilm_a - ilm_b", "0, 1, 2", "8", "7 / 0"]
  by_hand = stats.paired_bootstrap(
    [1, 1, 1, 2 / 3, 0, 0, 0, 0], [1, 1 / 3, 0, 0, 0, 0, 0, 0]
  )
  np.testing.assert_allclose(by_hand.mean_difference, 7 / 24)
  low, high = by_hand.interval
  assert cells[4] == f"{7 / 24:+.4f} [{low:+.4f}, {high:+.4f}]"
  assert cells[5] == f"{by_hand.p_value:.3g}"
  # Target NLL is a scalar in these files, not per user: no test over users.
  assert cells[8:] == ["–", "–"]
