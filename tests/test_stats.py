"""Bootstrap intervals and paired tests against hand-computed cases."""

import math

import numpy as np
import pytest
import scipy.stats

from ilm_jax import stats


def test_mcnemar_matches_the_binomial_sum_by_hand():
  # 1 user only hit by A, 9 only by B, 5 by both, 5 by neither.
  a = np.array([1] + [0] * 9 + [1] * 5 + [0] * 5)
  b = np.array([0] + [1] * 9 + [1] * 5 + [0] * 5)
  result = stats.mcnemar(a, b)
  assert (result.users, result.only_a, result.only_b) == (20, 1, 9)
  # Two-sided exact: 2 * P(X <= 1), X ~ Binomial(10, 1/2).
  by_hand = 2 * (math.comb(10, 0) + math.comb(10, 1)) / 2**10
  assert by_hand == 0.021484375
  assert result.p_value == pytest.approx(by_hand, abs=1e-12)
  # Symmetric in the rows.
  assert stats.mcnemar(b, a).p_value == pytest.approx(by_hand, abs=1e-12)


def test_mcnemar_balanced_and_without_discordant_pairs():
  # 3 vs 3 discordant: the observed count is the most likely one, p = 1.
  a = np.array([1, 1, 1, 0, 0, 0, 1])
  b = np.array([0, 0, 0, 1, 1, 1, 1])
  assert stats.mcnemar(a, b).p_value == pytest.approx(1.0)
  same = np.array([1, 0, 1, 1])
  result = stats.mcnemar(same, same)
  assert (result.only_a, result.only_b, result.p_value) == (0, 0, 1.0)
  # 0 vs 4 discordant: 2 * (1/2)**4.
  result = stats.mcnemar([0, 0, 0, 0], [1, 1, 1, 1])
  assert result.p_value == pytest.approx(2 / 16)


def test_mcnemar_rejects_non_binary_hits():
  with pytest.raises(ValueError, match="binary"):
    stats.mcnemar([0.5, 1.0], [0.0, 1.0])
  with pytest.raises(ValueError, match="shape"):
    stats.mcnemar([0, 1], [0, 1, 1])


def test_interval_of_a_constant_vector_is_degenerate():
  assert stats.bootstrap_interval(np.full(30, 0.25)) == (0.25, 0.25)
  assert stats.bootstrap_interval(np.zeros(500)) == (0.0, 0.0)
  low, high = stats.bootstrap_interval([0.7])
  assert math.isnan(low) and math.isnan(high)


def test_interval_rejects_empty_and_non_finite_values():
  with pytest.raises(ValueError, match="non-empty"):
    stats.bootstrap_interval([])
  with pytest.raises(ValueError, match="NaN"):
    stats.bootstrap_interval([0.0, np.nan])


def test_interval_is_seeded_and_brackets_the_mean():
  values = np.random.default_rng(3).random(200)
  first = stats.bootstrap_interval(values, resamples=2000, seed=5)
  assert first == stats.bootstrap_interval(values, resamples=2000, seed=5)
  assert first[0] < values.mean() < first[1]


def _numpy_percentile_interval(values, resamples, seed):
  """Independent reference: resample with numpy, take percentiles."""
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, len(values), size=(resamples, len(values)))
  means = values[rows].mean(axis=1)
  return np.percentile(means, [2.5, 97.5])


def test_percentile_interval_matches_an_independent_numpy_bootstrap():
  values = (np.random.default_rng(0).random(400) < 0.3).astype(float)
  ours = stats.bootstrap_interval(
    values, resamples=20_000, seed=1, method="percentile"
  )
  reference = _numpy_percentile_interval(values, 20_000, seed=2)
  # Different resamples: agreement up to Monte Carlo error (the standard
  # error of the mean is ~0.023 here; the endpoints move by ~1e-3).
  np.testing.assert_allclose(ours, reference, atol=4e-3)
  # And both match the normal approximation mean +- 1.96 se.
  se = values.std() / math.sqrt(len(values))
  normal = values.mean() + np.array([-1.96, 1.96]) * se
  np.testing.assert_allclose(ours, normal, atol=6e-3)
  # BCa differs from the percentile interval by a small skew correction.
  bca = stats.bootstrap_interval(values, resamples=20_000, seed=1)
  np.testing.assert_allclose(bca, reference, atol=6e-3)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
  rng = np.random.default_rng(7)
  true_rate, trials = 0.3, 200
  covered = 0
  for trial in range(trials):
    hits = (rng.random(150) < true_rate).astype(float)
    low, high = stats.bootstrap_interval(hits, resamples=1000, seed=trial)
    covered += low <= true_rate <= high
  # Binomial(200, 0.95) lies in [181, 197] with probability > 0.99.
  assert 181 <= covered <= 197, covered


def test_paired_bootstrap_of_identical_rows_gives_p_one():
  values = np.random.default_rng(1).random(100)
  result = stats.paired_bootstrap(values, values)
  assert result.p_value == 1.0
  assert result.mean_difference == 0.0
  assert result.interval == (0.0, 0.0)
  assert result.users == 100


def test_paired_bootstrap_detects_a_clear_difference_and_not_noise():
  rng = np.random.default_rng(2)
  base = rng.random(300)
  better = base + 0.1 + 0.05 * rng.standard_normal(300)
  result = stats.paired_bootstrap(better, base, resamples=5000)
  # Every resampled mean difference is ~0.1 +- 0.003: none reaches the
  # null's tail, so p is the smallest possible.
  assert result.p_value == pytest.approx(1 / 5001)
  assert result.mean_difference == pytest.approx(np.mean(better - base))
  assert result.interval[0] < result.mean_difference < result.interval[1]
  assert result.interval[0] > 0.09
  # Zero-mean noise on top of the same values: no difference found.
  noisy = base + 0.05 * rng.standard_normal(300)
  assert stats.paired_bootstrap(noisy, base, resamples=5000).p_value > 0.05


def test_paired_bootstrap_p_value_matches_an_independent_computation():
  rng = np.random.default_rng(4)
  a = (rng.random(200) < 0.2).astype(float)
  b = (rng.random(200) < 0.12).astype(float)
  ours = stats.paired_bootstrap(a, b, resamples=20_000, seed=0).p_value
  # Reference: numpy resampling of the differences, shifted to the null.
  d = a - b
  rows = np.random.default_rng(9).integers(0, 200, size=(20_000, 200))
  shifted = d[rows].mean(axis=1) - d.mean()
  reference = np.mean(np.abs(shifted) >= abs(d.mean()))
  assert ours == pytest.approx(reference, abs=0.01)
  # 30 vs 21 hits (27 vs 18 discordant users): a difference of 0.045 that
  # is not significant; the normal approximation of the paired test gives
  # p = 2 * (1 - Phi(mean / se)) = 0.178.
  se = d.std() / math.sqrt(len(d))
  normal_p = math.erfc(abs(d.mean()) / se / math.sqrt(2))
  assert normal_p == pytest.approx(0.1777, abs=1e-3)
  assert ours == pytest.approx(normal_p, abs=0.05)


def test_paired_bootstrap_of_a_constant_nonzero_difference():
  result = stats.paired_bootstrap(np.ones(10), np.zeros(10), resamples=99)
  assert result.p_value == pytest.approx(0.01)
  assert result.interval == (1.0, 1.0)


def test_align_keeps_common_evaluated_users_in_id_order():
  ids, a, b = stats.align(
    [5, 1, 9, 3], [0.5, 0.1, 0.9, np.nan], [3, 9, 1, 7], [3.0, 9.0, 1.0, 7.0]
  )
  # 3 is NaN in row A (not evaluated), 5 and 7 are in one row only.
  np.testing.assert_array_equal(ids, [1, 9])
  np.testing.assert_array_equal(a, [0.1, 0.9])
  np.testing.assert_array_equal(b, [1.0, 9.0])
  with pytest.raises(ValueError, match="twice"):
    stats.align([1, 1], [0.0, 1.0], [1], [0.0])


def test_mean_interval_is_wilson_for_hits_and_bootstrap_otherwise():
  z2 = 1.959963984540054**2
  # 0 of 200 hits: Wilson's upper bound is z^2 / (n + z^2), not 0.
  low, high = stats.mean_interval(np.zeros(200), proportion=True)
  assert low == 0.0
  np.testing.assert_allclose(high, z2 / (200 + z2), rtol=1e-9)
  # 3 of 100: the closed form (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2))
  # / (1 + z^2/n).
  n, p = 100, 0.03
  centre = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = np.sqrt(z2) * np.sqrt(p * (1 - p) / n + z2 / (4 * n**2)) / (1 + z2 / n)
  hits = np.zeros(n)
  hits[:3] = 1
  np.testing.assert_allclose(
    stats.mean_interval(hits, proportion=True),
    (centre - half, centre + half),
    rtol=1e-9,
  )
  # Graded values (NDCG gains) use the bootstrap, even all 0 or 1.
  gains = np.array([0.0, 0.5, 0.0, 1.0, 0.3, 0.0, 0.63, 0.0])
  assert stats.mean_interval(gains, False) == stats.bootstrap_interval(gains)
  assert stats.mean_interval(np.zeros(9), False) == (0.0, 0.0)
  with pytest.raises(ValueError, match="must be 0 or 1"):
    stats.mean_interval(gains, proportion=True)


def test_above_chance_is_the_binomial_tail_by_hand():
  # 6 hits of 500 users at 10 / 3416: P(X >= 6) = 1 - sum_{i<6} pmf(i).
  n, p = 500, 10 / 3416
  by_hand = 1 - sum(
    math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(6)
  )
  result = stats.above_chance(6, 500, p)
  assert result.p_value == pytest.approx(by_hand, rel=1e-9)
  assert result.p_value == pytest.approx(0.0039, abs=1e-4)
  assert result.ratio == pytest.approx(6 / 500 / p)
  # No hits: P(X >= 0) = 1; every user hit at p = 1/2: 2**-users.
  assert stats.above_chance(0, 50, 0.01).p_value == 1.0
  assert stats.above_chance(4, 4, 0.5).p_value == pytest.approx(1 / 16)


def test_above_chance_rejects_impossible_counts():
  with pytest.raises(ValueError, match="hits"):
    stats.above_chance(5, 4, 0.1)
  with pytest.raises(ValueError, match="users"):
    stats.above_chance(0, 0, 0.1)
  with pytest.raises(ValueError, match="chance"):
    stats.above_chance(1, 10, 0.0)


def test_paired_over_runs_is_the_t_test_by_hand():
  # Differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) on 2 degrees
  # of freedom. Student's t with 2 df has the closed-form CDF
  # 1/2 + t / (2 sqrt(2 + t^2)) and quantile (2q - 1) / sqrt(2 q (1 - q)).
  a, b = [0.11, 0.22, 0.33], [0.10, 0.20, 0.30]
  test = stats.paired_over_runs(np.array(a) * 100, np.array(b) * 100)
  t = 2 * np.sqrt(3)
  p_by_hand = 2 * (0.5 - t / (2 * np.sqrt(2 + t**2)))
  half_width = 0.95 / np.sqrt(2 * 0.975 * 0.025) / np.sqrt(3)
  assert test.runs == 3
  np.testing.assert_allclose(test.mean, 2.0, rtol=1e-12)
  np.testing.assert_allclose(test.p_value, p_by_hand, rtol=1e-9)
  np.testing.assert_allclose(p_by_hand, 0.0742, atol=1e-4)
  np.testing.assert_allclose(
    test.interval, (2 - half_width, 2 + half_width), rtol=1e-9
  )


def test_over_runs_edge_cases():
  one = stats.mean_over_runs([0.02])
  assert one.runs == 1 and one.mean == 0.02
  assert np.isnan(one.interval).all() and np.isnan(one.p_value)
  same = stats.paired_over_runs([0.1, 0.2], [0.1, 0.2])
  assert same.mean == 0 and same.interval == (0, 0) and same.p_value == 1
  constant = stats.mean_over_runs([0.5, 0.5, 0.5])
  assert constant.interval == (0.5, 0.5) and np.isnan(constant.p_value)
  with pytest.raises(ValueError, match="differ in shape"):
    stats.paired_over_runs([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="non-empty"):
    stats.mean_over_runs([])


def test_paired_over_runs_matches_scipy_ttest_rel():
  rng = np.random.default_rng(3)
  a, b = rng.normal(0.02, 0.004, 5), rng.normal(0.018, 0.004, 5)
  test = stats.paired_over_runs(a, b, confidence=0.9)
  reference = scipy.stats.ttest_rel(a, b)
  interval = reference.confidence_interval(0.9)
  np.testing.assert_allclose(test.p_value, reference.pvalue, rtol=1e-12)
  np.testing.assert_allclose(
    test.interval, (interval.low, interval.high), rtol=1e-12
  )


def test_paired_over_seeds_and_users_averages_each_user_over_seeds():
  # Seeds x users. User 0: A hits in both seeds, B in one -> +1/2; user 1:
  # A in one, B in none -> +1/2; user 2: B in both -> -1; user 3: none -> 0.
  a = [[1, 1, 0, 0], [1, 0, 0, 0]]
  b = [[1, 0, 1, 0], [0, 0, 1, 0]]
  test = stats.paired_over_seeds_and_users(a, b)
  assert test.users == 4
  np.testing.assert_allclose(test.mean_difference, (0.5 + 0.5 - 1) / 4)
  by_hand = stats.paired_bootstrap([1, 0.5, 0, 0], [0.5, 0, 1, 0])
  assert test == by_hand
  # A seed repeated adds no evidence: the user, not the (seed, user) pair,
  # is the unit, so two identical seeds test as one.
  rng = np.random.default_rng(0)
  one_a, one_b = rng.random(50) < 0.3, rng.random(50) < 0.1
  twice = stats.paired_over_seeds_and_users(
    np.stack([one_a, one_a]), np.stack([one_b, one_b])
  )
  assert twice == stats.paired_bootstrap(one_a, one_b)
  # Every user +1/2: no spread, the smallest p these resamples can give.
  constant = stats.paired_over_seeds_and_users(
    [[1, 1], [0, 0]], [[0, 0], [0, 0]], resamples=99
  )
  assert constant.interval == (0.5, 0.5) and constant.p_value == 0.01
  with pytest.raises(ValueError, match=r"\[seeds, users\]"):
    stats.paired_over_seeds_and_users([1.0, 0.0], [1.0, 0.0])
  with pytest.raises(ValueError, match="one shape"):
    stats.paired_over_seeds_and_users([[1.0, 0.0]], [[1.0, 0.0, 1.0]])


def _fisher_two_sided_by_hand(a, b, c, d) -> float:
  """Sum of the hypergeometric probabilities of the tables with the same
  margins that are no more likely than [[a, b], [c, d]]."""
  row, col, n = a + b, a + c, a + b + c + d

  def prob(x):
    return math.comb(col, x) * math.comb(n - col, row - x) / math.comb(n, row)

  observed = prob(a)
  support = range(max(0, row + col - n), min(row, col) + 1)
  return sum(prob(x) for x in support if prob(x) <= observed * (1 + 1e-9))


def test_hits_given_signal_counts_and_fisher_by_hand():
  # 10 users; the signal hits users 0-3; the model hits 0, 1, 2 and 7.
  signal = np.arange(10) < 4
  model = np.isin(np.arange(10), [0, 1, 2, 7])
  test = stats.hits_given_signal(model, signal)
  assert (test.users, test.signal_hits) == (10, 4)
  assert (test.hits_with_signal, test.hits_without_signal) == (3, 1)
  expected = _fisher_two_sided_by_hand(3, 1, 1, 5)
  assert test.p_value == pytest.approx(expected)
  # P(x) = C(4, x) C(6, 4 - x) / 210 = 15, 80, 90, 24, 1 over 210 for x = 0..4;
  # no likelier than x = 3: x = 0, 3, 4, so p = 40 / 210.
  assert test.p_value == pytest.approx(40 / 210)


def test_hits_given_signal_rejects_bad_input():
  with pytest.raises(ValueError, match="differ in shape"):
    stats.hits_given_signal([1, 0], [1, 0, 1])
  with pytest.raises(ValueError, match="signal_hits: needs binary hits"):
    stats.hits_given_signal([1, 0], [0.5, 0])
