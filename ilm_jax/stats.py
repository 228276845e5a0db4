"""Uncertainty of per-user metrics: bootstrap intervals and paired tests.

Every evaluation here averages a per-user quantity (a hit, an NDCG gain)
over a fixed set of users, so the unit of resampling is the user:
  mean_interval       95% interval of one row's mean: Wilson score for
                      binary hits (a proportion), else bootstrap;
  bootstrap_interval  95% interval of one row's mean (BCa bootstrap);
  paired_bootstrap    two rows on the same users: the mean difference, its
                      interval and a two-sided p-value for "no difference";
  mcnemar             two rows' binary hits on the same users: exact
                      McNemar test on the discordant pairs;
  above_chance        one row's hits against a uniformly random top-k
                      list (HR@k of chance = k / catalogue items): exact
                      one-sided binomial test;
  align               two rows' per-user arrays restricted to the users
                      both evaluated, in one order.
Training runs are a second source of variance that resampling users does
not see (a test over users holds each trained model fixed): the same
config hit 27 and 19 of 943 users with two seeds. Across runs, the unit is
the run:
  mean_over_runs      one config's mean over runs (seeds) and its
                      Student-t interval;
  paired_over_runs    two configs run with the same seeds: the mean of the
                      per-seed differences, its t interval and the paired
                      t-test's p-value;
  paired_over_seeds_and_users  two configs run with the same seeds, on
                      the same users: each user's mean over the seeds,
                      then a paired bootstrap over users (holds the
                      trained models fixed, like every test over users,
                      but uses every seed's users at once).
Resampling uses `scipy.stats.bootstrap` with a fixed seed, so a metrics
file's intervals do not change between reads of the same results.
"""

import dataclasses

import numpy as np
import scipy.stats

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
_BATCH = 500  # resamples per vectorised chunk: memory ~ users * _BATCH


def _as_vector(values, name: str = "values") -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or not len(values):
    raise ValueError(
      f"{name}: expected a non-empty 1-D array, got shape {values.shape}."
    )
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name}: contains NaN or infinite values.")
  return values


def _bootstrap(
  values: np.ndarray, confidence: float, resamples: int, seed: int, method: str
):
  return scipy.stats.bootstrap(
    (values,),
    np.mean,
    confidence_level=confidence,
    n_resamples=resamples,
    method=method,
    vectorized=True,
    batch=_BATCH,
    rng=np.random.default_rng(seed),
  )


def bootstrap_interval(
  values,
  confidence: float = 0.95,
  resamples: int = DEFAULT_RESAMPLES,
  seed: int = DEFAULT_SEED,
  method: str = "BCa",
) -> tuple[float, float]:
  """Bootstrap confidence interval of the mean of per-user values.

  Args:
    values: float [users] (e.g. 0/1 hits or NDCG gains), finite.
    confidence: the interval's level (0.95: the 2.5th to 97.5th percentile).
    resamples: bootstrap resamples of the users.
    seed: seeds the resampling (same inputs, same interval).
    method: scipy's "BCa" (default: bias-corrected and accelerated, better
      than "percentile" for rare hits) or "percentile" or "basic".

  Returns:
    (low, high) floats. A constant vector gives (c, c); one user gives
    (nan, nan) (no spread to resample).

  Raises:
    ValueError: empty, not 1-D, or non-finite values.
  """
  values = _as_vector(values)
  if len(values) == 1:
    return float("nan"), float("nan")
  if np.all(values == values[0]):
    # Every resample has the same mean; BCa's acceleration is 0/0 here.
    return float(values[0]), float(values[0])
  interval = _bootstrap(
    values, confidence, resamples, seed, method
  ).confidence_interval
  return float(interval.low), float(interval.high)


def mean_interval(
  values, proportion: bool, confidence: float = 0.95
) -> tuple[float, float]:
  """Confidence interval of the mean of per-user values.

  A proportion (hits: HR@k, every value 0 or 1) gets the Wilson score
  interval (`scipy.stats.binomtest(...).proportion_ci`), which stays
  informative at 0 or all hits, where a bootstrap collapses to a point
  (0 of 200 users gives [0, 0.019], not [0, 0]). Other values (NDCG gains)
  get `bootstrap_interval`, also when they happen to be all 0 or 1.

  Args:
    values: float [users], finite.
    proportion: whether the values are hits of a proportion.
    confidence: the interval's level.

  Returns:
    (low, high) floats.

  Raises:
    ValueError: empty, not 1-D, or non-finite values, or a proportion
      with a value other than 0 or 1.
  """
  values = _as_vector(values)
  if not proportion:
    return bootstrap_interval(values, confidence)
  if not np.all((values == 0) | (values == 1)):
    raise ValueError("A proportion's per-user values must be 0 or 1.")
  hits = int(values.sum())
  interval = scipy.stats.binomtest(hits, len(values)).proportion_ci(
    confidence_level=confidence, method="wilson"
  )
  return float(interval.low), float(interval.high)


@dataclasses.dataclass(frozen=True)
class PairedBootstrap:
  """Row A minus row B over the same users.

  Attributes:
    users: number of users compared.
    mean_difference: mean over users of a - b.
    interval: bootstrap confidence interval of the mean difference.
    p_value: two-sided bootstrap p-value of "mean difference = 0".
  """

  users: int
  mean_difference: float
  interval: tuple[float, float]
  p_value: float


def paired_bootstrap(
  a,
  b,
  confidence: float = 0.95,
  resamples: int = DEFAULT_RESAMPLES,
  seed: int = DEFAULT_SEED,
) -> PairedBootstrap:
  """Paired bootstrap test of two rows' per-user values.

  Resamples users (each user keeps both rows' values), giving the
  distribution of the mean difference d*. The p-value centres that
  distribution on the null (d* - d) and counts resamples at least as far
  from 0 as the observed d: p = (1 + #{|d* - d| >= |d|}) / (1 + resamples)
  (Hall and Wilson, 1991). Identical rows give p = 1. The interval is BCa
  (bias- and skew-corrected), the p-value is not, so near the 5% boundary
  they can disagree: with sparse, skewed hits an interval may just
  exclude 0 while p is a little above 0.05. The p-value is the test.

  Args:
    a, b: float [users], the same users in the same order.
    confidence: level of the difference's interval.
    resamples: bootstrap resamples.
    seed: seeds the resampling.

  Returns:
    A PairedBootstrap.

  Raises:
    ValueError: shapes differ, or either is empty or non-finite.
  """
  a, b = _as_vector(a, "a"), _as_vector(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b differ in shape: {a.shape} vs {b.shape}.")
  difference = a - b
  observed = float(difference.mean())
  if np.all(difference == difference[0]):
    # Every resample equals the observed mean: p = 1 if it is 0, else the
    # smallest p-value this many resamples can give.
    p_value = 1.0 if observed == 0 else 1.0 / (1 + resamples)
    return PairedBootstrap(len(a), observed, (observed, observed), p_value)
  result = _bootstrap(difference, confidence, resamples, seed, "BCa")
  distribution = result.bootstrap_distribution
  extreme = np.sum(np.abs(distribution - observed) >= abs(observed))
  interval = result.confidence_interval
  return PairedBootstrap(
    users=len(a),
    mean_difference=observed,
    interval=(float(interval.low), float(interval.high)),
    p_value=float((1 + extreme) / (1 + len(distribution))),
  )


@dataclasses.dataclass(frozen=True)
class McNemar:
  """Exact McNemar test of two rows' binary hits on the same users.

  Attributes:
    users: number of users compared.
    only_a: users hit by row A and missed by row B.
    only_b: users hit by row B and missed by row A.
    p_value: two-sided exact binomial p-value of only_a among the
      only_a + only_b discordant users at 1/2 (1 when there are none).
  """

  users: int
  only_a: int
  only_b: int
  p_value: float


def _binary_pair(a, b, names, test: str) -> tuple[np.ndarray, np.ndarray]:
  """Two [users] hit vectors of one shape, every value 0 or 1.

  Raises:
    ValueError: shapes differ, or a value is not 0 or 1 (e.g. HR under
      "expected" ties, which is fractional).
  """
  a, b = _as_vector(a, names[0]), _as_vector(b, names[1])
  if a.shape != b.shape:
    raise ValueError(
      f"{names[0]} and {names[1]} differ in shape: {a.shape} vs {b.shape}."
    )
  for name, hits in zip(names, (a, b), strict=True):
    if not np.all((hits == 0) | (hits == 1)):
      raise ValueError(f"{name}: needs binary hits (0 or 1) for {test}.")
  return a, b


def mcnemar(a_hits, b_hits) -> McNemar:
  """Exact McNemar test (binomial test on the discordant pairs).

  Args:
    a_hits, b_hits: [users] of 0/1 (or bool), the same users in order.

  Returns:
    A McNemar; e.g. only_a=1, only_b=9 gives p = 2 * (1 + 10) / 2**10.

  Raises:
    ValueError: shapes differ, or a value is not 0 or 1 (e.g. HR under
      "expected" ties, which is fractional).
  """
  a, b = _binary_pair(a_hits, b_hits, ("a_hits", "b_hits"), "McNemar")
  only_a = int(np.sum((a == 1) & (b == 0)))
  only_b = int(np.sum((a == 0) & (b == 1)))
  discordant = only_a + only_b
  p_value = (
    1.0
    if discordant == 0
    else float(scipy.stats.binomtest(only_a, discordant, 0.5).pvalue)
  )
  return McNemar(len(a), only_a, only_b, p_value)


@dataclasses.dataclass(frozen=True)
class HitsGivenSignal:
  """A model's hits split by whether another scorer hit the same user.

  Attributes:
    users: users in both.
    signal_hits: users the other scorer (e.g. the CF user row) hits.
    hits_with_signal: the model's hits among those users.
    hits_without_signal: the model's hits among the other users.
    p_value: two-sided Fisher exact test of independence on the 2x2 table
      (`scipy.stats.fisher_exact`): small when the model hits where the
      other scorer does more (or less) often than elsewhere.
  """

  users: int
  signal_hits: int
  hits_with_signal: int
  hits_without_signal: int
  p_value: float


def hits_given_signal(model_hits, signal_hits) -> HitsGivenSignal:
  """Does a model hit the users another scorer hits more often?

  Args:
    model_hits, signal_hits: [users] of 0/1 (or bool), the same users in
      order.

  Returns:
    A HitsGivenSignal.

  Raises:
    ValueError: shapes differ, or a value is not 0 or 1.
  """
  model, signal = _binary_pair(
    model_hits, signal_hits, ("model_hits", "signal_hits"), "Fisher's test"
  )
  model, signal = model == 1, signal == 1
  table = [
    [np.sum(model & signal), np.sum(~model & signal)],
    [np.sum(model & ~signal), np.sum(~model & ~signal)],
  ]
  return HitsGivenSignal(
    users=len(model),
    signal_hits=int(signal.sum()),
    hits_with_signal=int(table[0][0]),
    hits_without_signal=int(table[1][0]),
    p_value=float(scipy.stats.fisher_exact(table).pvalue),
  )


@dataclasses.dataclass(frozen=True)
class ChanceTest:
  """Exact one-sided binomial test of a row's hits against chance.

  Attributes:
    users: number of users evaluated.
    hits: users whose target is in their list.
    chance: a user's hit probability under chance (e.g. 10 / items).
    p_value: P(X >= hits), X ~ Binomial(users, chance).
  """

  users: int
  hits: int
  chance: float
  p_value: float

  @property
  def ratio(self) -> float:
    """The hit rate over the chance rate (1: no better than chance)."""
    return self.hits / self.users / self.chance


def above_chance(hits: int, users: int, chance: float) -> ChanceTest:
  """Is a hit count above what a uniformly random list gets?

  A list of k distinct items drawn uniformly from N catalogue items holds
  a user's one held-out target with probability k / N, independently per
  user, so under chance the hits of `users` users are Binomial(users,
  k / N). E.g. 6 hits of 500 users at 10 / 3416 (1.46 expected) give
  p = 0.0039.

  Args:
    hits: users hit (HR@k x users, an integer count).
    users: users evaluated (> 0).
    chance: the per-user hit probability under chance, in (0, 1).

  Returns:
    A ChanceTest with the one-sided p-value ("more hits than chance").

  Raises:
    ValueError: users < 1, hits outside [0, users], or chance not in (0, 1).
  """
  if users < 1 or not 0 <= hits <= users:
    raise ValueError(
      f"Need 0 <= hits <= users and users >= 1: {hits}, {users}."
    )
  if not 0 < chance < 1:
    raise ValueError(f"chance must be in (0, 1), got {chance}.")
  test = scipy.stats.binomtest(int(hits), int(users), chance, "greater")
  return ChanceTest(int(users), int(hits), float(chance), float(test.pvalue))


@dataclasses.dataclass(frozen=True)
class OverRuns:
  """A mean over training runs (one value per run) with a t interval.

  Attributes:
    runs: number of runs (for a paired comparison: of seed pairs).
    mean: mean over runs (paired: of the per-run differences a - b).
    interval: Student-t confidence interval of that mean; (nan, nan) for a
      single run, (mean, mean) when every value is equal.
    p_value: two-sided t-test p-value of "mean = 0" (paired: "no
      difference"); nan for one run or when every value is equal and
      nonzero (no variance to test against), 1 when every value is 0.
  """

  runs: int
  mean: float
  interval: tuple[float, float]
  p_value: float


def mean_over_runs(values, confidence: float = 0.95) -> OverRuns:
  """One config's metric over runs (e.g. HR@10 of each seed).

  The interval is mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n)
  (`scipy.stats.ttest_1samp`), which assumes the runs' values are
  independent draws from a roughly normal distribution; with 3-5 seeds it
  is wide, as it should be.

  Args:
    values: float [runs], finite.
    confidence: the interval's level.

  Returns:
    An OverRuns (its p_value tests "mean = 0").

  Raises:
    ValueError: empty, not 1-D, or non-finite values.
  """
  values = _as_vector(values)
  mean = float(values.mean())
  if len(values) == 1:
    return OverRuns(1, mean, (np.nan, np.nan), np.nan)
  if np.all(values == values[0]):
    return OverRuns(
      len(values), mean, (mean, mean), 1.0 if mean == 0 else np.nan
    )
  result = scipy.stats.ttest_1samp(values, 0.0)
  interval = result.confidence_interval(confidence)
  return OverRuns(
    len(values),
    mean,
    (float(interval.low), float(interval.high)),
    float(result.pvalue),
  )


def paired_over_runs(a, b, confidence: float = 0.95) -> OverRuns:
  """Two configs over the same seeds: paired t-test of the differences.

  Run i of `a` and run i of `b` share the seed (the same data order,
  initialisation draw and evaluated users), so the test is on the per-seed
  differences a_i - b_i (a one-sample t-test of them, the same as
  `scipy.stats.ttest_rel(a, b)`), with n - 1 degrees of freedom. A test over runs, not users: each run's value is already a mean
  over users.

  Args:
    a, b: float [runs], paired by position.
    confidence: level of the difference's interval.

  Returns:
    An OverRuns of the differences a - b.

  Raises:
    ValueError: shapes differ, or either is empty or non-finite.
  """
  a, b = _as_vector(a, "a"), _as_vector(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b differ in shape: {a.shape} vs {b.shape}.")
  return mean_over_runs(a - b, confidence)


def paired_over_seeds_and_users(
  a,
  b,
  confidence: float = 0.95,
  resamples: int = DEFAULT_RESAMPLES,
  seed: int = DEFAULT_SEED,
) -> PairedBootstrap:
  """Two configs over the same seeds and users: bootstrap over users.

  Each user's value is averaged over the seeds first (a hit rate in
  {0, 1/S, ..., 1} for S seeds), so the user stays the unit of resampling
  and the correlation of one user's results across seeds is kept: pooling
  the seeds' users as independent pairs (a McNemar test on S * users
  pairs) would overstate the evidence. Like every test over users it holds
  the trained models fixed; `paired_over_runs` is the test over seeds.

  Args:
    a, b: float [seeds, users]; row s of both is seed s, column u the same
      user in both.
    confidence: level of the difference's interval.
    resamples: bootstrap resamples.
    seed: seeds the resampling.

  Returns:
    A PairedBootstrap of the per-user mean differences over seeds.

  Raises:
    ValueError: shapes differ or are not 2-D, either is empty or
      non-finite.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or a.shape != b.shape or not a.size:
    raise ValueError(
      "a and b must be non-empty [seeds, users] arrays of one shape, got "
      f"{a.shape} and {b.shape}."
    )
  return paired_bootstrap(
    a.mean(axis=0), b.mean(axis=0), confidence, resamples, seed
  )


def align(
  ids_a, values_a, ids_b, values_b
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Two rows' per-user values on the users both have, sorted by user id.

  Args:
    ids_a, ids_b: int [n_a], [n_b] user ids (unique within a row).
    values_a, values_b: [n_a], [n_b] values in the order of the ids. NaN
      marks a user the row did not evaluate; such users are dropped.

  Returns:
    (user ids [m], values_a [m], values_b [m]) for the m common users.

  Raises:
    ValueError: a row repeats a user id or ids and values differ in length.
  """
  kept = []
  for ids, values in ((ids_a, values_a), (ids_b, values_b)):
    ids = np.asarray(ids, np.int64)
    values = np.asarray(values, np.float64)
    if ids.shape != values.shape:
      raise ValueError(f"ids {ids.shape} and values {values.shape} differ.")
    if len(np.unique(ids)) != len(ids):
      raise ValueError("A row lists a user id twice.")
    evaluated = ~np.isnan(values)
    kept.append((ids[evaluated], values[evaluated]))
  (ids_a, values_a), (ids_b, values_b) = kept
  common, in_a, in_b = np.intersect1d(
    ids_a, ids_b, assume_unique=True, return_indices=True
  )
  return common, values_a[in_a], values_b[in_b]
