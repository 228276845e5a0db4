"""The `eval` phase: markdown results tables from the workdir's metrics.

Reads `WORKDIR/metrics/<name>_test.json` for every ILM variant and phase-0
model that ran, and `WORKDIR/phases.json` for wall times, and writes
`WORKDIR/results.md`:
  - one row per metrics file: users, HR@10 / NDCG@10 with their 95%
    intervals (from the file: Wilson for HR, bootstrap for NDCG), HR@5 /
    NDCG@5, seen HR@10 over chance (a uniformly random top-10 list of
    the catalogue's items, 10 / items) with its exact one-sided binomial
    p-value, semantic consistency, the target-title NLL gain of true over
    shuffled entities (`shuffled_entities`, nats per token), the share of
    target items named exactly from their soft tokens (`item_naming`), the
    shares of
    first titles the user watched before and among the 100 most popular
    items, catalogue coverage@1 / @10 (the share of all items in any
    user's top-1 / top-10 list), wall time; rows whose file has no
    per-user results (older runs) print with "no" in the per-user column
    and no intervals;
  - ILM (or the row `config.eval.reference` names, into
    `results_<row>.md`) against every other row, on the users both
    evaluated: exact McNemar test on the HR@10 hits and a paired bootstrap
    test of NDCG@10;
  - rows run with several seeds (`<variant>_seed<N>`, or the seed the
    file records): per-seed hits, means over seeds with t intervals,
    paired t-tests over the seeds of every two such rows, and the same
    pairs tested over users on each user's mean over the seeds;
  - the soft-token statistics of the rows that measured them
    (`soft_token_stats`: has an adapter's output collapsed?);
  - the CF user row's own HR@10 of the prompt targets, on training prompts
    and on test users (`cf_user_signal`: does `{user}` hold the answer?);
  - a phase-1 table of the Q-Former runs present.
ILM rows are sequential recommendation on seen and unseen templates
(trie-constrained beam search over all titles, on the evaluated user
subset); phase-0 rows are OpenP5's full ranking over all items for all
users (no prompts, so no seen/unseen split; compared on the seen column).
"""

import json
import pathlib
import re

import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ilm_jax import data, layout, metric_writer, stats
from ilm_jax.evaluators import cf_signal

METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
# Row label for each metrics-file prefix, in table order. Other
# `ilm_<variant>_test.json` files (e.g. learning-curve runs) follow, labelled
# by their prefix.
ROWS = (
  ("ilm", "ILM (Q-Former + projector)"),
  ("ilm_mlp", "MLP projector (CoLLM-style)"),
  ("ilm_rand", "ILM-rand (no phase 1)"),
  ("ilm_it", "ILM, phase 1 = IT (ITC+ITM+ITG)"),
  ("ilm_it_ii", "ILM, phase 1 = IT+II"),
  ("ilm_it_ui", "ILM, phase 1 = IT+UI"),
  ("ilm_textonly", "Text-only (titles, learned prompt)"),
  ("ilm_zeroshot", "Frozen LLM zero-shot (text-only prompts)"),
  ("sasrec", "SASRec (phase 0, full ranking)"),
  ("mf", "MF (phase 0, full ranking)"),
  ("popularity", "Popularity (phase 0, full ranking)"),
)
# The row every other row is compared with, by default (config.eval.reference
# picks another, e.g. a longer run's ILM against baselines at its budget).
REFERENCE = "ilm"


# Phase-1 rows (metrics/<prefix>_test.json and _valid.json) and columns.
QFORMER_ROWS = (
  ("qformer", "all five (ITC+ITM+ITG+II+UI)"),
  ("qformer_it", "IT (ITC+ITM+ITG)"),
  ("qformer_it_ii", "IT+II"),
  ("qformer_it_ui", "IT+UI"),
  ("qformer_rand", "random init (no phase 1)"),
)
QFORMER_METRICS = (
  ("test", "i2t/recall@1"),
  ("test", "i2t/recall@10"),
  ("test", "t2i/recall@1"),
  ("test", "t2i/recall@10"),
  ("test", "ii/recall@10"),
  ("valid", "itg/loss"),
)


def _cell(value) -> str:
  return "–" if value is None else f"{value:.4f}"


def _p_cell(value) -> str:
  if value is None:
    return "–"
  if value == 0:  # below float64's range (e.g. SASRec's binomial tail)
    return "< 1e-300"
  return f"{value:.3g}"


def _interval_cell(values: dict, name: str) -> str:
  """ "mean [low, high]", or the mean alone without an interval."""
  mean, interval = values.get(name), values.get(name + "_ci95")
  if mean is None or not interval or None in interval:
    return _cell(mean)
  return f"{mean:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def _shares_cell(values: dict) -> str:
  """ "watched / popular" shares of the first title, seen templates."""
  watched, popular = (
    values.get(f"sequential/seen/share_top1_{what}")
    for what in ("in_history", "popular")
  )
  if watched is None or popular is None:
    return "–"
  return f"{watched:.3f} / {popular:.3f}"


def _coverage_cell(values: dict, prefix: str) -> str:
  """ "@1 / @10" catalogue coverage of the (seen-template) lists."""
  cells = [
    values.get(_metric_name(prefix, "seen", f"coverage@{k}")) for k in (1, 10)
  ]
  return " / ".join("–" if c is None else f"{c:.3f}" for c in cells)


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def check_one_dataset(
  rows: list[tuple[str, str, dict]], expected: dict | None = None
) -> None:
  """Raises unless every row that records its data ran on the same data.

  The tables pair rows user by user (per-user results by user index), which
  means something only if both rows ranked the same users against the same
  held-out items: the files' "dataset" records (`ProcessedDataset.record`)
  must agree on `interactions_digest`. Files written before the record
  existed (3 December 2026) are not checked.

  Args:
    rows: `present_rows`' (prefix, label, metrics) triples.
    expected: the record of the dataset the config describes, or None.

  Raises:
    ValueError: two digests among the rows (or a row's and `expected`'s)
      differ; names the files of each.
  """
  by_digest: dict[str, list[str]] = {}
  for prefix, _, values in rows:
    record = values.get("dataset")
    if isinstance(record, dict) and record.get("interactions_digest"):
      digest = str(record["interactions_digest"])
      by_digest.setdefault(digest, []).append(
        f"{prefix}_test.json ({record.get('name', '?')})"
      )
  if expected is not None and by_digest:
    by_digest.setdefault(expected["interactions_digest"], []).append(
      f"config.data ({expected['name']})"
    )
  if len(by_digest) > 1:
    groups = "; ".join(
      f"digest {digest}: {', '.join(names)}"
      for digest, names in sorted(by_digest.items())
    )
    raise ValueError(
      "Metrics files measured on different data cannot share a table (its "
      f"rows are paired user by user): {groups}. Keep one dataset's files "
      "in WORKDIR/metrics, or point config.data at the data they ran on."
    )


def present_rows(workdir: pathlib.Path) -> list[tuple[str, str, dict]]:
  """(prefix, label, metrics) of every test-metrics file, in table order.

  Raises:
    ValueError: files measured on different data (`check_one_dataset`).
  """
  metrics_dir = layout.metrics_dir(workdir)
  known = dict(ROWS)
  extra = sorted(
    path.name.removesuffix("_test.json")
    for path in metrics_dir.glob("ilm_*_test.json")
    if path.name.removesuffix("_test.json") not in known
  )
  rows = []
  for prefix in [p for p, _ in ROWS] + extra:
    path = layout.metrics_file(workdir, prefix, "test")
    if path.exists():
      values = metric_writer.with_current_intervals(
        json.loads(path.read_text())
      )
      rows.append((prefix, known.get(prefix, prefix), values))
  check_one_dataset(rows)
  return rows


def _metric_name(prefix: str, which: str, metric: str) -> str:
  """The file's key of `metric` on the `which` templates of a row."""
  if prefix.startswith("ilm"):
    return f"sequential/{which}/{metric}"
  return metric  # phase 0: no templates


def _chance_cell(values: dict, prefix: str, num_items: int | None) -> str:
  """ "ratio x, p = ..." of seen HR@10 against 10 / num_items."""
  hit_rate, users = (
    values.get(_metric_name(prefix, "seen", "hr@10")),
    values.get("users"),
  )
  if hit_rate is None or not users or not num_items or num_items <= 10:
    return "–"
  test = stats.above_chance(round(hit_rate * users), int(users), 10 / num_items)
  return f"{test.ratio:.1f}x, p = {_p_cell(test.p_value)}"


def results_table(workdir: pathlib.Path, num_items: int | None = None) -> str:
  """The markdown table of every test-metrics file present in `workdir`.

  Args:
    workdir: the experiment's workdir.
    num_items: the catalogue's size, for the chance column (HR@10 of a
      uniformly random top-10 list is 10 / num_items); None: "–".
  """
  phases = layout.read_phases(workdir)
  header = (
    ["model", "users"]
    + [
      f"{which} {m} [95% CI]"
      for which in ("seen", "unseen")
      for m in ("hr@10", "ndcg@10")
    ]
    + [
      "seen hr@10, history masked [95% CI]",
      "seen hr@10 / chance (10 / items), binomial p",
      "seen hr@5",
      "seen ndcg@5",
      "semantic consistency (seen)",
      "target NLL gain, shuffled entities [95% CI]",
      "target named from its soft tokens (seen) [95% CI]",
      "first title watched / popular (seen)",
      "catalogue coverage@1 / @10 (seen)",
      "per-user",
      "phase wall time (s)",
    ]
  )
  rows = []
  for prefix, label, values in present_rows(workdir):
    is_ilm = prefix.startswith("ilm")
    intervals = [
      _interval_cell(values, _metric_name(prefix, which, m))
      if is_ilm or which == "seen"
      else "–"
      for which in ("seen", "unseen")
      for m in ("hr@10", "ndcg@10")
    ]
    more = [
      _interval_cell(values, _metric_name(prefix, "seen", "masked_hr@10")),
      _chance_cell(values, prefix, num_items),
    ]
    more += [
      _cell(values.get(_metric_name(prefix, "seen", m)))
      for m in ("hr@5", "ndcg@5")
    ]
    if is_ilm:
      consistency = values.get("description/seen/semantic_consistency")
      wall = phases.get(prefix, {}).get("wall_time_s")
    else:
      consistency = None
      wall = phases.get("cf", {}).get(f"{prefix}/wall_time_s")
    users = values.get("users")
    rows.append(
      [label, "–" if users is None else str(int(users))]
      + intervals
      + more
      + [
        _cell(consistency),
        _interval_cell(values, "sequential/target_nll_gain"),
        _interval_cell(values, "naming/seen/share_title_exact"),
        _shares_cell(values),
        _coverage_cell(values, prefix),
        "yes" if metric_writer.PER_USER in values else "no",
        "–" if wall is None else f"{wall:.0f}",
      ]
    )
  return _table(header, rows)


def _paired_row(
  reference_prefix: str,
  reference: dict,
  other_prefix: str,
  other: dict,
  which: str,
  masked: str = "",
) -> list[str]:
  """Users, HR@10 of both, McNemar p, NDCG@10 difference and its p.

  `masked="masked_"` compares the history-masked lists instead.
  """
  mine, theirs = (
    metric_writer.read_per_user(reference),
    metric_writer.read_per_user(other),
  )
  if mine is None or theirs is None:
    return ["no per-user data"] + ["–"] * 5
  cells = []
  for metric in ("hr@10", "ndcg@10"):
    a_name = _metric_name(reference_prefix, which, masked + metric)
    b_name = _metric_name(other_prefix, which, masked + metric)
    if a_name not in mine or b_name not in theirs:
      return ["no per-user data"] + ["–"] * 5
    users, a, b = stats.align(
      mine["user_ids"], mine[a_name], theirs["user_ids"], theirs[b_name]
    )
    if not len(users):
      return ["0"] + ["–"] * 5
    if metric == "hr@10":
      cells.append(str(len(users)))
      cells.append(f"{a.mean():.4f} / {b.mean():.4f}")
      try:
        test = stats.mcnemar(a, b)
        cells += [f"{test.only_a} / {test.only_b}", _p_cell(test.p_value)]
      except ValueError:  # fractional hits ("expected" ties)
        cells += ["–", "–"]
    else:
      test = stats.paired_bootstrap(a, b)
      low, high = test.interval
      cells.append(f"{test.mean_difference:+.4f} [{low:+.4f}, {high:+.4f}]")
      cells.append(_p_cell(test.p_value))
  return cells


def paired_table(
  workdir: pathlib.Path,
  which: str = "seen",
  masked: str = "",
  reference: str = REFERENCE,
) -> str:
  """`reference` against every other row on the users both evaluated.

  Args:
    workdir: the experiment's workdir.
    which: "seen" or "unseen" templates (phase-0 rows only in "seen").
    masked: "masked_" compares the history-masked lists, only of rows that
      have them.
    reference: the metrics-file prefix of the row compared with the others
      ("ilm": the main command's ILM).

  Returns:
    A markdown table, or "" when the reference row (or its lists) is absent.
  """
  rows = present_rows(workdir)
  found = [v for p, _, v in rows if p == reference]
  if not found:
    return ""
  values, short = found[0], _short_label(reference)
  header = [
    f"{short} vs",
    "common users",
    f"HR@10 {short} / row",
    f"hits only {short} / only row",
    "McNemar p (HR@10)",
    f"NDCG@10 {short} - row [95% CI]",
    "paired bootstrap p (NDCG@10)",
  ]
  if masked and _metric_name(reference, which, masked + "hr@10") not in values:
    return ""
  body = [
    [label] + _paired_row(reference, values, prefix, other, which, masked)
    for prefix, label, other in rows
    if prefix != reference
    and (which == "seen" or prefix.startswith("ilm"))
    # Rows without these lists (e.g. a seen-only run in the unseen table).
    and _metric_name(prefix, which, masked + "hr@10") in other
  ]
  return _table(header, body) if body else ""


# A row trained with another seed: `--config.ilm.variant=<name>_seed<N>`.
SEED_SUFFIX = re.compile(r"_seed(\d+)$")
# Per-seed metrics of the seeds tables: (key, label).
SEED_METRICS = (
  ("sequential/seen/hr@10", "seen HR@10"),
  ("sequential/seen/ndcg@10", "seen NDCG@10"),
  ("sequential/target_nll", "target NLL (nats/token)"),
)


def run_seed(prefix: str, values: dict) -> int:
  """The seed a row was trained with.

  Its file's `train.seed`; files written before that was recorded (1
  December 2026) say it by their name's `_seed<N>` suffix, else they ran
  with `config.seed`'s default, 0.
  """
  recorded = values.get("train", {}).get("seed")
  if recorded is not None:
    return int(recorded)
  match = SEED_SUFFIX.search(prefix)
  return int(match.group(1)) if match else 0


def seed_groups(workdir: pathlib.Path) -> dict[str, dict[int, tuple]]:
  """ILM rows run with several seeds: {group: {seed: (prefix, values)}}.

  A group is the rows whose prefixes are equal once a `_seed<N>` suffix is
  removed (`ilm_mlp`, `ilm_mlp_seed1`, `ilm_mlp_seed2`); only groups with
  two or more seeds are returned, in table order. A group naming one seed
  twice is left out, with a warning.
  """
  groups: dict[str, dict[int, tuple]] = {}
  clashes = set()
  for prefix, _, values in present_rows(workdir):
    if not prefix.startswith("ilm"):
      continue
    group, seed = SEED_SUFFIX.sub("", prefix), run_seed(prefix, values)
    if seed in groups.setdefault(group, {}):
      clashes.add(group)
      logging.warning(
        "Rows %s and %s both ran with seed %d; group %s left out of the "
        "seeds tables.",
        groups[group][seed][0],
        prefix,
        seed,
        group,
      )
    groups[group][seed] = (prefix, values)
  return {
    group: dict(sorted(runs.items()))
    for group, runs in groups.items()
    if len(runs) >= 2 and group not in clashes
  }


def _seed_pair(first: tuple, second: tuple, key: str) -> tuple | None:
  """Two rows' means of `key` in one seed, on the users both evaluated.

  Per-user values where both files have them (`stats.align`), else both
  files' means; None where either lacks the metric or no user is common.
  """
  blocks = [
    metric_writer.read_per_user(values) for _, values in (first, second)
  ]
  if all(block is not None and key in block for block in blocks):
    _, a, b = stats.align(
      blocks[0][metric_writer.USER_IDS],
      blocks[0][key],
      blocks[1][metric_writer.USER_IDS],
      blocks[1][key],
    )
    return (float(a.mean()), float(b.mean())) if len(a) else None
  a, b = first[1].get(key), second[1].get(key)
  return None if a is None or b is None else (a, b)


def _over_runs_cell(test: stats.OverRuns, signed: bool = False) -> str:
  sign = "+" if signed else ""
  if np.isnan(test.interval[0]):
    return f"{test.mean:{sign}.4f}"
  low, high = test.interval
  return f"{test.mean:{sign}.4f} [{low:{sign}.4f}, {high:{sign}.4f}]"


def seeds_table(workdir: pathlib.Path) -> str:
  """Each multi-seed group: per-seed HR@10 and the means over seeds.

  Returns:
    A markdown table, or "" when no group has two seeds.
  """
  rows = []
  for group, runs in seed_groups(workdir).items():
    hits = []
    for _, values in runs.values():
      users, rate = values.get("users"), values.get(SEED_METRICS[0][0])
      hits.append(
        "–" if users is None or rate is None else f"{round(rate * users)}"
      )
    cells = [group, ", ".join(map(str, runs)), " / ".join(hits)]
    for key, _ in SEED_METRICS:
      found = [v.get(key) for _, v in runs.values()]
      known = [x for x in found if x is not None]
      if len(known) < 2:
        cells.append("–")
      else:
        cells.append(
          _over_runs_cell(stats.mean_over_runs(known))
          + ("" if len(known) == len(found) else f" ({len(known)} seeds)")
        )
    rows.append(cells)
  if not rows:
    return ""
  header = ["row", "seeds", "seen HR@10 hits per seed"] + [
    f"{label}, mean over seeds [95% t interval]" for _, label in SEED_METRICS
  ]
  return _table(header, rows)


def _group_pairs(groups: dict[str, dict[int, tuple]]):
  """Every two groups of `seed_groups` (in its order) sharing two or more
  seeds: (first, second, the common seeds, sorted)."""
  names = list(groups)
  for i, first in enumerate(names):
    for second in names[i + 1 :]:
      seeds = sorted(set(groups[first]) & set(groups[second]))
      if len(seeds) >= 2:
        yield first, second, seeds


def seed_pairs_table(workdir: pathlib.Path) -> str:
  """Every two multi-seed groups on the seeds both ran: paired t-tests.

  For each common seed, both rows' metric on the users both evaluated in
  that seed (the files' means where either lacks per-user data); the test is
  over the per-seed differences (`stats.paired_over_runs`).

  Returns:
    A markdown table, or "" when fewer than two groups share two seeds.
  """
  groups = seed_groups(workdir)
  rows = []
  for first, second, seeds in _group_pairs(groups):
    cells = [f"{first} - {second}", ", ".join(map(str, seeds))]
    for key, _ in SEED_METRICS:
      a, b = [], []
      for seed in seeds:
        pair = _seed_pair(groups[first][seed], groups[second][seed], key)
        if pair is not None:
          a.append(pair[0])
          b.append(pair[1])
      if len(a) < 2:
        cells += ["–", "–"]
        continue
      test = stats.paired_over_runs(a, b)
      cells += [
        _over_runs_cell(test, signed=True)
        + ("" if len(a) == len(seeds) else f" ({len(a)} seeds)"),
        "–" if np.isnan(test.p_value) else _p_cell(test.p_value),
      ]
    rows.append(cells)
  if not rows:
    return ""
  header = ["rows (first - second)", "common seeds"]
  for _, label in SEED_METRICS:
    header += [f"{label} difference [95% t interval]", "paired t-test p"]
  return _table(header, rows)


def _on_users_of_all(runs: list[tuple], key: str) -> tuple | None:
  """Runs' per-user `key` on the users every run evaluated.

  Args:
    runs: (prefix, values) of metrics files.
    key: a per-user metric name.

  Returns:
    (user ids int [users], values float [runs, users]), or None where a
    file lacks per-user `key` or no user is common to all.
  """
  blocks = [metric_writer.read_per_user(values) for _, values in runs]
  if any(block is None or key not in block for block in blocks):
    return None
  series = [
    dict(
      zip(
        np.asarray(block[metric_writer.USER_IDS], np.int64).tolist(),
        np.asarray(block[key], np.float64).tolist(),
        strict=True,
      )
    )
    for block in blocks
  ]
  common = sorted(
    set.intersection(
      *({user for user, x in one.items() if not np.isnan(x)} for one in series)
    )
  )
  if not common:
    return None
  return np.asarray(common), np.array(
    [[one[user] for user in common] for one in series]
  )


def seed_pooled_table(workdir: pathlib.Path) -> str:
  """Every two multi-seed groups, each user's mean over the common seeds.

  Users: those every run of both groups on those seeds evaluated. The test
  is a paired bootstrap over users of the per-user means over seeds
  (`stats.paired_over_seeds_and_users`); the hits columns sum each seed's
  discordant users (users hit by one row only).

  Returns:
    A markdown table, or "" when fewer than two groups share two seeds.
  """
  groups = seed_groups(workdir)
  rows = []
  for first, second, seeds in _group_pairs(groups):
    runs = [groups[first][s] for s in seeds] + [
      groups[second][s] for s in seeds
    ]
    # {key: (user ids, values [2 * seeds, users]) or None}; the first
    # group's seeds come first.
    found = {key: _on_users_of_all(runs, key) for key, _ in SEED_METRICS}
    hits = found[SEED_METRICS[0][0]]
    cells = [
      f"{first} - {second}",
      ", ".join(map(str, seeds)),
      "–" if hits is None else str(len(hits[0])),
    ]
    if hits is None:
      cells.append("–")
    else:
      a, b = hits[1][: len(seeds)], hits[1][len(seeds) :]
      only = [
        int(np.sum((a > 0) & (b == 0))),
        int(np.sum((a == 0) & (b > 0))),
      ]
      cells.append(f"{only[0]} / {only[1]}")
    for key, _ in SEED_METRICS:
      if found[key] is None:
        cells += ["–", "–"]
        continue
      values = found[key][1]
      test = stats.paired_over_seeds_and_users(
        values[: len(seeds)], values[len(seeds) :]
      )
      low, high = test.interval
      cells += [
        f"{test.mean_difference:+.4f} [{low:+.4f}, {high:+.4f}]",
        _p_cell(test.p_value),
      ]
    rows.append(cells)
  if not rows:
    return ""
  header = [
    "rows (first - second)",
    "common seeds",
    "users (evaluated in every run)",
    "seen HR@10 hits only first / only second, summed over seeds",
  ]
  for _, label in SEED_METRICS:
    header += [
      f"{label} difference of per-user means over seeds [95% CI]",
      "paired bootstrap p (over users)",
    ]
  return _table(header, rows)


def _short_label(prefix: str) -> str:
  """ "ILM" for the main row, else the metrics-file prefix."""
  return "ILM" if prefix == REFERENCE else prefix


# Soft-token statistics (evaluators/soft_tokens.py), per entity kind.
SOFT_TOKEN_METRICS = (
  ("items", "entity_share"),
  ("items", "entity_cosine"),
  ("items", "slot_cosine"),
  ("items", "norm_over_llm"),
  ("users", "entity_share"),
  ("users", "entity_cosine"),
)


def _measured_table(workdir: pathlib.Path, columns, extra=None) -> str:
  """A table of the rows whose metrics hold `columns[0]`'s metric, or "".

  Args:
    workdir: the workdir whose metrics files are read.
    columns: (metric name, column header) pairs, in order; a third item,
      if any, formats the value (default `_cell`).
    extra: optional (headers, cells_of) appended after `columns`:
      `cells_of(values)` gives a row's cells from its whole metrics file.
  """
  headers, cells_of = extra or ([], lambda values: [])
  rows = [
    [label]
    + [(c[2] if len(c) > 2 else _cell)(values.get(c[0])) for c in columns]
    + cells_of(values)
    for _, label, values in present_rows(workdir)
    if columns[0][0] in values
  ]
  if not rows:
    return ""
  return _table(["row"] + [c[1] for c in columns] + headers, rows)


def soft_token_table(workdir: pathlib.Path) -> str:
  """The soft-token statistics of every row that measured them, or ""."""
  return _measured_table(
    workdir,
    [
      (f"soft_tokens/{kind}/{metric}", f"{kind} {metric}")
      for kind, metric in SOFT_TOKEN_METRICS
    ],
  )


def _hits_given_signal_cells(values: dict) -> list[str]:
  """The row's seen sequential hits among the users the CF row hits."""
  per_user = metric_writer.read_per_user(values)
  names = ("sequential/seen/hr@10", "cf_signal/sequential/hr@10")
  if per_user is None or any(n not in per_user for n in names):
    return ["–", "–"]
  model, signal = per_user[names[0]], per_user[names[1]]
  both = ~np.isnan(model) & ~np.isnan(signal)
  if not both.any():
    return ["–", "–"]
  test = stats.hits_given_signal(model[both] > 0, signal[both] > 0)
  rest = test.users - test.signal_hits
  return [
    f"{test.hits_with_signal} / {test.signal_hits} vs "
    f"{test.hits_without_signal} / {rest}",
    _p_cell(test.p_value),
  ]


def cf_signal_table(workdir: pathlib.Path) -> str:
  """HR@10 of the CF user row on training prompts and test users, of the
  adapter's user tokens (cosine to the items' tokens), and each row's hits
  among the users the CF row hits; or ""."""
  columns = []
  for task in cf_signal.USER_TASKS:
    columns += [
      (f"cf_signal/{task}/train_prompts/hr@10", f"{task}: training prompts"),
      (f"cf_signal/{task}/hr@10", f"{task}: test users"),
    ]
  columns.append(
    ("cf_signal/soft_tokens/hr@10", "test users, by the soft tokens' cosine")
  )
  users = (
    "cf_signal/users",
    "users",
    lambda n: "–" if n is None else f"{n:.0f}",
  )
  extra = (
    [
      "row's hits where the CF row hits vs elsewhere (sequential, seen)",
      "Fisher exact p",
    ],
    _hits_given_signal_cells,
  )
  return _measured_table(workdir, columns + [users], extra)


def qformer_table(workdir: pathlib.Path) -> str:
  """Phase-1 evaluators of the main run and each ablation present."""
  phases = layout.read_phases(workdir)
  header = ["phase-1 losses"] + [
    f"{split} {metric}" for split, metric in QFORMER_METRICS
  ]
  lines = ["| " + " | ".join(header + ["wall time (s)"]) + " |"]
  lines.append("|" + "---|" * (len(header) + 1))
  for prefix, label in QFORMER_ROWS:
    files = {
      split: layout.metrics_file(workdir, prefix, split)
      for split in ("test", "valid")
    }
    if not files["test"].exists():
      continue
    values = {
      split: json.loads(path.read_text()) if path.exists() else {}
      for split, path in files.items()
    }
    cells = [_cell(values[s].get(m)) for s, m in QFORMER_METRICS]
    wall = phases.get(prefix, {}).get("wall_time_s")
    wall_cell = "–" if wall is None else f"{wall:.0f}"
    lines.append("| " + " | ".join([label, *cells, wall_cell]) + " |")
  return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def run(config: ml_collections.ConfigDict, workdir, mesh: Mesh) -> dict:
  del mesh
  workdir = pathlib.Path(workdir).absolute()
  reference = config.eval.reference
  wanted = layout.metrics_file(workdir, reference, "test")
  # Checked before any table is built; the default may be absent (e.g. a
  # phase-0-only run), which leaves the paired tables out.
  if reference != REFERENCE and not wanted.exists():
    present = sorted(
      path.name.removesuffix("_test.json")
      for path in layout.metrics_dir(workdir).glob("*_test.json")
    )
    raise ValueError(
      f"config.eval.reference={reference!r}: no test metrics file {wanted};"
      f" rows present: {', '.join(present) or 'none'}."
    )
  # The chance column's catalogue size (the processed cache: seconds).
  dataset = data.load_dataset(config.data)
  num_items = dataset.num_items
  check_one_dataset(present_rows(workdir), expected=dataset.record())
  table = results_table(workdir, num_items)
  phase1 = qformer_table(workdir)
  soft = soft_token_table(workdir)
  user_signal = cf_signal_table(workdir)
  phases = layout.read_phases(workdir)
  timings = "\n".join(
    f"- {name}: {summary.get('wall_time_s', 0):.0f} s"
    for name, summary in phases.items()
  )
  paired = {
    f"{which} templates": paired_table(workdir, which, reference=reference)
    for which in ("seen", "unseen")
  }
  paired["seen templates, history masked"] = paired_table(
    workdir, "seen", masked="masked_", reference=reference
  )
  seeds, seed_pairs = seeds_table(workdir), seed_pairs_table(workdir)
  pooled = seed_pooled_table(workdir)
  text = (
    "# Results\n\nTest split. ILM rows: sequential recommendation by "
    "trie-constrained beam search over all item titles. Phase-0 rows: "
    "full ranking over all items. Intervals: 95%, Wilson score for hit "
    "rates, BCa bootstrap over users for NDCG.\n\n"
    + table
    + "".join(
      f"\n## {_short_label(reference)} against each row ({which}, common "
      "users)\n\n"
      "Exact McNemar test on the HR@10 hits (users hit by only one of the "
      "two rows); paired bootstrap test of the mean NDCG@10 difference.\n\n"
      + paired[which]
      for which in paired
      if paired[which]
    )
    + (
      "\n## Over training seeds\n\nRows run with several seeds (a "
      "`_seed<N>` variant suffix, or the seed each file records). A test "
      "over users holds each trained model fixed; these hold the config "
      "fixed and treat each seed's run as one draw. Means over seeds with "
      "Student-t intervals; paired t-tests over the seeds both rows ran, "
      "each seed's pair on the users both evaluated.\n\n"
      + seeds
      + ("\n" + seed_pairs if seed_pairs else "")
      + (
        "\nThe same pairs tested over users: each user's mean over the "
        "common seeds, on the users every one of those runs evaluated, and "
        "a paired bootstrap over users (the trained models held fixed, as "
        "in the tables above, but every seed's results used at once).\n\n"
        + pooled
        if pooled
        else ""
      )
      if seeds
      else ""
    )
    + (
      "\n## Soft tokens\n\nWhat each adapter hands the LLM, over sampled "
      "items and users: entity share (|x - mean| / |x|; 0 = the same token "
      "for every entity), mean cosine between entities and between one "
      "entity's slots, norm over the LLM's mean token norm.\n\n" + soft
      if soft
      else ""
    )
    + (
      "\n## What the CF user row knows\n\nHR@10 of each prompt's target "
      "item ranked by the CF tables' own score (user row . item row, every "
      "item a candidate), on phase 2's training prompts as sampled and on "
      "the test users. A training figure far above the test one says the "
      "{user} tokens hand the adapter answers in training that they do not "
      'hold at test time. "By the soft tokens\' cosine": the test targets '
      "ranked by the cosine of the user's and the items' soft tokens (how "
      "much of the row's signal the adapter keeps). The last columns: does "
      "the row hit the users "
      "whose CF row ranks the target in its top 10 more often than the "
      "others (is the adapter using the row's signal)?\n\n" + user_signal
      if user_signal
      else ""
    )
    + (
      "\n## Phase 1: Q-Former retrieval over all items\n\n" + phase1
      if phase1
      else ""
    )
    + "\n## Wall time per phase\n\n"
    + timings
    + "\n"
  )
  # Another reference writes its own file beside the main results.md.
  results = layout.results_file(
    workdir, None if reference == REFERENCE else reference
  )
  results.write_text(text)
  logging.info("Results table:\n%s", table)
  return dict(results=str(results))
