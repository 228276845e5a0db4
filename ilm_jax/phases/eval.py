"""The `eval` phase: one markdown results table from the workdir's metrics.

Reads `WORKDIR/metrics/<name>_test.json` for every ILM variant and phase-0
model that ran, and `WORKDIR/phases.json` for wall times, and writes
`WORKDIR/results.md` (plus a phase-1 table of the Q-Former runs present). ILM rows are sequential recommendation on seen and
unseen templates (trie-constrained beam search over all titles, on the
evaluated user subset); phase-0 rows are OpenP5's full ranking over all items
for all users (no prompts, so no seen/unseen split).
"""

import json
import pathlib

import ml_collections
from absl import logging
from jax.sharding import Mesh

METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
# Row label for each metrics-file prefix, in table order.
ROWS = (
  ("ilm", "ILM (Q-Former + linear projector)"),
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


def results_table(workdir: pathlib.Path) -> str:
  """The markdown table of every test-metrics file present in `workdir`."""
  metrics_dir = workdir / "metrics"
  phases_file = workdir / "phases.json"
  phases = json.loads(phases_file.read_text()) if phases_file.exists() else {}
  header = (
    ["model"]
    + [f"seen {m}" for m in METRICS]
    + [f"unseen {m}" for m in METRICS]
    + ["semantic consistency (seen)", "users", "phase wall time (s)"]
  )
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for prefix, label in ROWS:
    path = metrics_dir / f"{prefix}_test.json"
    if not path.exists():
      continue
    values = json.loads(path.read_text())
    if prefix.startswith("ilm"):
      seen = [values.get(f"sequential/seen/{m}") for m in METRICS]
      unseen = [values.get(f"sequential/unseen/{m}") for m in METRICS]
      consistency = values.get("description/seen/semantic_consistency")
      wall = phases.get(prefix, {}).get("wall_time_s")
    else:
      seen = [values.get(m) for m in METRICS]
      unseen, consistency = [None] * len(METRICS), None
      wall = phases.get("cf", {}).get(f"{prefix}/wall_time_s")
    users = values.get("users")
    row = (
      [label]
      + [_cell(v) for v in seen + unseen]
      + [
        _cell(consistency),
        "–" if users is None else str(int(users)),
        "–" if wall is None else f"{wall:.0f}",
      ]
    )
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def qformer_table(workdir: pathlib.Path) -> str:
  """Phase-1 evaluators of the main run and each ablation present."""
  phases_file = workdir / "phases.json"
  phases = json.loads(phases_file.read_text()) if phases_file.exists() else {}
  header = ["phase-1 losses"] + [
    f"{split} {metric}" for split, metric in QFORMER_METRICS
  ]
  lines = ["| " + " | ".join(header + ["wall time (s)"]) + " |"]
  lines.append("|" + "---|" * (len(header) + 1))
  for prefix, label in QFORMER_ROWS:
    files = {
      split: workdir / "metrics" / f"{prefix}_{split}.json"
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
  del config, mesh
  workdir = pathlib.Path(workdir).absolute()
  table = results_table(workdir)
  phase1 = qformer_table(workdir)
  phases_file = workdir / "phases.json"
  phases = json.loads(phases_file.read_text()) if phases_file.exists() else {}
  timings = "\n".join(
    f"- {name}: {summary.get('wall_time_s', 0):.0f} s"
    for name, summary in phases.items()
  )
  text = (
    "# Results\n\nTest split. ILM rows: sequential recommendation by "
    "trie-constrained beam search over all item titles. Phase-0 rows: "
    "full ranking over all items.\n\n"
    + table
    + (
      "\n## Phase 1: Q-Former retrieval over all items\n\n" + phase1
      if phase1
      else ""
    )
    + "\n## Wall time per phase\n\n"
    + timings
    + "\n"
  )
  (workdir / "results.md").write_text(text)
  logging.info("Results table:\n%s", table)
  return dict(results=str(workdir / "results.md"))
