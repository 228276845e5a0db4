"""Learning curves of the phase-2 adapters, drawn from metrics files.

  python docs/plot_learning_curves.py --workdir=WORKDIR \
    --out=docs/learning_curves.png

Each point is one phase-2 run: a variant `ilm_<series>_s<steps>` trained
for `ilm.train.steps` and evaluated on the test users, whose
`metrics/ilm_<series>_s<steps>_test.json` records the trained prompts
(`train.prompts` = steps * global batch) beside HR@10 / NDCG@10 and their
95% intervals. The runs of one workdir share its phase-0/1 outputs; several
`--workdir`s are read together (e.g. budgets run on different machines).
The right-hand panel is each run's logged training loss on the target
titles (`WORKDIR/ilm_<series>_s<steps>/logs/metrics.jsonl`, the sequential
task's answer-token cross-entropy per log interval; `--loss_key=loss` for
all tasks) against prompts seen. Horizontal lines are
the reference rows present (`--references`, e.g. SASRec and the zero-shot
LLM), averaged over the curves' users when their files carry per-user
results. The runs (config `configs/ml1m.py:cpu`, batch 8; one workdir that
already holds the phase-0/1 outputs):

  for steps in 80 320 1280; do
    python -m ilm_jax.main --config=configs/ml1m.py:cpu --workdir=WORKDIR \
      --config.phases=ilm --config.ilm.evals.rank.num_users=500 \
      --config.ilm.train.steps=$steps --config.ilm.variant=curve_ilm_s$steps
    # MLP projector: --config.ilm.variant=curve_mlp_s$steps
    #   --config.ilm.model.adapter=mlp
    # text-only: --config.ilm.variant=curve_textonly_s$steps
    #   --config.ilm.model.adapter=prompt --config.ilm.model.tokens_per_entity=20
    # ILM-rand: --config.ilm.variant=curve_rand_s$steps
    #   --config.ilm.model.qformer_init=random
  done

The ML-100K curves of the design of record (SASRec tables, one projector
per query, LoRA rank 8 on q, v; all 943 test users; docs/results/ilm.md,
session 24) are the same runs with `configs/ml100k.py:cpu`, the flags of
that section and `--config.ilm.variant=lora_sasrec_perq_s$steps` (MLP
projector: `lora_mlp_sasrec_perq_s$steps`), drawn with

  python docs/plot_learning_curves.py --workdir=WORKDIR \
    --out=docs/learning_curves_ml100k.png \
    --series="ILM (Q-Former) + LoRA=lora_sasrec_perq" \
    --series="MLP projector + LoRA=lora_mlp_sasrec_perq"

Runs of another training seed (`--config.seed=N`, variants named
`..._s$steps_seedN`) are drawn with `--seed=N`; without it the runs with no
seed suffix are drawn.

Needs matplotlib (`pip install -e ".[plot]"`); draws with the Agg backend.
"""

import argparse
import dataclasses
import json
import pathlib
import re
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

# Run as a script from a checkout: the repository root holds ilm_jax.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ilm_jax import metric_writer  # noqa: E402

# (label, series key): runs are ilm.variant=<key>_s<steps>.
SERIES = (
  ("ILM (Q-Former)", "curve_ilm"),
  ("ILM, soft tokens at the LLM's token norm", "curve_ilmnorm"),
  # --config.ilm.optim.learning_rate=1e-3
  # --config.ilm.optim.lr_mults="(('qformer/.*', 0.1),)"
  ("ILM, projector lr 1e-3, Q-Former lr 1e-4", "curve_ilmlr"),
  ("MLP projector (CoLLM-style)", "curve_mlp"),
  ("Text-only", "curve_textonly"),
  ("ILM-rand (no phase 1)", "curve_rand"),
  ("ILM-rand, projector lr 1e-3, Q-Former lr 1e-4", "curve_randlr"),
  ("MLP projector, lr 1e-3", "curve_mlplr"),
)
# (label, metrics-file prefixes): the first file found is drawn.
REFERENCES = (
  ("SASRec", ("sasrec",)),
  ("Popularity", ("popularity",)),
  # The 500-user row (variant curve_zeroshot), else the main command's.
  ("Zero-shot LLM", ("ilm_curve_zeroshot", "ilm_zeroshot")),
)
# (metric, templates) per panel, row by row. GAIN is the shuffled-entities
# probe (evaluators/generative.py): target-title NLL with swapped soft-token
# entities minus with the true ones, nats per token; its "templates" are
# the seen ones.
# NAMED is the item-naming probe: the share of target items named exactly
# from their soft tokens.
GAIN = "target_nll_gain"
NAMED = "share_title_exact"
PANELS = (
  ("hr@10", "seen"),
  ("hr@10", "unseen"),
  ("masked_hr@10", "seen"),
  ("ndcg@10", "seen"),
  ("ndcg@10", "unseen"),
  (GAIN, "seen"),
  (NAMED, "seen"),
)


@dataclasses.dataclass
class Run:
  """One point of a curve: a phase-2 run's test metrics and training log.

  Attributes:
    name: the metrics-file prefix, "ilm_<series>_s<steps>".
    prompts: training prompts (steps * global batch size).
    users: test users evaluated.
    user_ids: int [users] when the file has per-user results, else None.
    values: (metric, templates) -> (mean, low, high); the interval is
      (nan, nan) when the file has none.
    loss_prompts: float [log records], prompts seen at each logged loss.
    loss: float [log records], the logged training loss.
  """

  name: str
  prompts: int
  users: int
  user_ids: np.ndarray | None
  values: dict[tuple[str, str], tuple[float, float, float]]
  loss_prompts: np.ndarray
  loss: np.ndarray


def _key(metric: str, templates: str) -> str:
  if metric == GAIN:
    return f"sequential/{GAIN}"
  if metric == NAMED:
    return f"naming/{templates}/{NAMED}"
  return f"sequential/{templates}/{metric}"


def training_loss(
  workdir: pathlib.Path, name: str, batch_size: int, loss_key: str = "loss"
) -> tuple[np.ndarray, np.ndarray]:
  """(prompts seen, loss) of every logged training step of run `name`.

  The log is appended to by every (re)start of the run: a step logged
  twice keeps its last record. `loss_key` names a logged metric ("loss":
  the mean answer-token loss of all tasks), or `task:<task>` for one task's
  answer-token loss in each log interval, the interval's
  `answer_nll_sum/<task>` over its `answer_tokens/<task>` (models/ilm.py);
  `task:sequential` is the target-title loss. Intervals without that task
  are skipped.
  """
  path = workdir / name / "logs" / "metrics.jsonl"
  task = loss_key.removeprefix("task:") if loss_key.startswith("task:") else ""
  by_step = {}
  if path.exists():
    for line in path.read_text().splitlines():
      record = json.loads(line)
      if task:
        tokens = record.get(f"answer_tokens/{task}", 0.0)
        if tokens > 0:
          value = record[f"answer_nll_sum/{task}"] / tokens
          by_step[int(record["step"])] = value
      elif loss_key in record:
        by_step[int(record["step"])] = float(record[loss_key])
  steps = np.array(sorted(by_step), np.int64)
  return steps * batch_size, np.array([by_step[s] for s in steps.tolist()])


def read_run(workdir: pathlib.Path, name: str, loss_key: str = "loss") -> Run:
  """The Run of `WORKDIR/metrics/<name>_test.json`.

  Raises:
    ValueError: the file has no `train` record (written before metrics
      files recorded the trained steps).
  """
  path = workdir / "metrics" / f"{name}_test.json"
  payload = json.loads(path.read_text())
  if "train" not in payload:
    raise ValueError(f"{path} has no train record; re-evaluate the run.")
  values = {}
  for metric, templates in PANELS:
    key = _key(metric, templates)
    interval = payload.get(key + metric_writer.INTERVAL_SUFFIX) or [None] * 2
    low, high = (np.nan if v is None else v for v in interval)
    # Runs evaluated before a probe existed lack its value.
    values[(metric, templates)] = (payload.get(key, np.nan), low, high)
  per_user = metric_writer.read_per_user(payload)
  batch_size = int(payload["train"]["batch_size"])
  loss_prompts, loss = training_loss(workdir, name, batch_size, loss_key)
  return Run(
    name=name,
    prompts=int(payload["train"]["prompts"]),
    users=int(payload["users"]),
    user_ids=None if per_user is None else per_user["user_ids"],
    values=values,
    loss_prompts=loss_prompts,
    loss=loss,
  )


def collect(
  workdirs: list[pathlib.Path],
  series=SERIES,
  loss_key: str = "loss",
  seed: int | None = None,
) -> dict[str, list[Run]]:
  """label -> that series' runs in all workdirs, by prompts (empty: dropped).

  A series' runs are `ilm_<key>_s<steps>`, or with `seed` the runs of that
  training seed, `ilm_<key>_s<steps>_seed<seed>` (the `--config.seed=N`
  runs named with a `_seedN` suffix); the two never mix.
  """
  suffix = "" if seed is None else f"_seed{seed}"
  curves = {}
  for label, key in series:
    pattern = re.compile(rf"(ilm_{re.escape(key)}_s\d+{suffix})_test\.json")
    runs = [
      read_run(workdir, match.group(1), loss_key)
      for workdir in workdirs
      for path in sorted((workdir / "metrics").glob("*_test.json"))
      if (match := pattern.fullmatch(path.name))
    ]
    if runs:
      curves[label] = sorted(runs, key=lambda run: run.prompts)
  return curves


def reference_values(
  workdirs: list[pathlib.Path], user_ids: np.ndarray | None, refs=REFERENCES
) -> dict[str, dict[tuple[str, str], float]]:
  """label -> panel -> the reference row's mean on `user_ids` (if known).

  Phase-0 rows have no templates: their one value serves both columns.
  """
  found = {}
  for label, prefixes in refs:
    candidates = [
      (prefix, workdir / "metrics" / f"{prefix}_test.json")
      for prefix in prefixes
      for workdir in workdirs
    ]
    for prefix, path in candidates:
      if not path.exists():
        continue
      payload = json.loads(path.read_text())
      per_user = metric_writer.read_per_user(payload)
      values = {}
      for metric, templates in PANELS:
        key = _key(metric, templates) if prefix.startswith("ilm") else metric
        if key not in payload:
          continue
        if per_user is not None and key in per_user and user_ids is not None:
          keep = np.isin(per_user["user_ids"], user_ids)
          values[(metric, templates)] = float(np.nanmean(per_user[key][keep]))
        else:
          values[(metric, templates)] = float(payload[key])
      found[label] = values
      break
  return found


def plot(
  curves: dict[str, list[Run]],
  references: dict[str, dict[tuple[str, str], float]],
  out: pathlib.Path,
) -> matplotlib.figure.Figure:
  """Draws the curves (2 x 4 panels) into the PNG `out`; returns the figure.

  Metric panels: one line per series through its runs' means, a band
  between their 95% interval ends, x = training prompts (log scale). Loss
  panel: each run's logged loss against prompts seen.
  """
  figure, axes = plt.subplots(2, 4, figsize=(20, 9), squeeze=False)
  colors = dict(
    zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False)
  )
  panel_axes = [axes[0, 0], axes[0, 1], axes[0, 2]] + list(axes[1])
  for ax, panel in zip(panel_axes, PANELS, strict=True):
    for label, runs in curves.items():
      x = np.array([run.prompts for run in runs], np.float64)
      mean, low, high = np.array([run.values[panel] for run in runs]).T
      ax.plot(x, mean, marker="o", color=colors[label], label=label)
      ax.fill_between(x, low, high, color=colors[label], alpha=0.15)
    for index, (label, values) in enumerate(references.items()):
      if panel in values:
        ax.axhline(
          values[panel],
          color="gray",
          linestyle=("--", ":", "-.")[index % 3],
          label=label,
        )
    if not any(
      np.isfinite(run.values[panel][0])
      for runs in curves.values()
      for run in runs
    ):
      # Nothing plotted: matplotlib would keep x in [0, 1], which a log
      # scale cannot show.
      prompts = [run.prompts for runs in curves.values() for run in runs]
      ax.set_xlim(min(prompts) / 1.25, max(prompts) * 1.25)
      ax.text(
        0.5,
        0.5,
        "not evaluated in these runs",
        ha="center",
        transform=ax.transAxes,
      )
    ax.set_xscale("log")
    ax.set_xlabel("training prompts")
    if panel[0] == GAIN:
      ax.axhline(0.0, color="black", lw=0.8)
      ax.set_title("target-title NLL, shuffled - true entities (nats/token)")
    elif panel[0] == NAMED:
      ax.set_title("target item named, exact title (share; text rows copy it)")
      ax.set_ylim(bottom=0)
    elif panel[0].startswith("masked_"):
      ax.set_title(f"test HR@10, history masked ({panel[1]} templates)")
      ax.set_ylim(bottom=0)
    else:
      ax.set_title(f"test {panel[0].upper()} ({panel[1]} templates)")
      ax.set_ylim(bottom=0)
  loss_ax = axes[0, 3]
  for label, runs in curves.items():
    for run in runs:
      if len(run.loss):
        loss_ax.plot(run.loss_prompts, run.loss, color=colors[label], lw=1)
  loss_ax.set_xscale("log")
  loss_ax.set_xlabel("prompts seen")
  loss_ax.set_title("training loss (answer tokens)")
  users = sorted({run.users for runs in curves.values() for run in runs})
  handles, labels = panel_axes[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc="lower center", ncol=3)
  figure.suptitle(
    f"test users: {', '.join(map(str, users))}; bands: 95% intervals"
  )
  figure.tight_layout(rect=(0, 0.08, 1, 0.97))
  out.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(out, dpi=100)
  return figure


def parse_series(text: str) -> tuple[str, str]:
  """`--series` "LABEL=KEY" -> (label, key); the key is after the last "=".

  Raises:
    argparse.ArgumentTypeError: no "=", an empty label, or a key that is
      not a variant name (letters, digits, "_", "-").
  """
  label, _, key = text.rpartition("=")
  if not label or not re.fullmatch(r"[\w-]+", key):
    raise argparse.ArgumentTypeError(
      f"--series={text!r}: expected LABEL=KEY, KEY the variant's series "
      "(the runs ilm_<KEY>_s<steps>), e.g. 'ILM + LoRA=lora_sasrec_perq'."
    )
  return label, key


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--workdir", action="append", required=True, type=pathlib.Path
  )
  parser.add_argument(
    "--out", type=pathlib.Path, default=pathlib.Path("learning_curves.png")
  )
  parser.add_argument(
    "--loss_key",
    default="task:sequential",
    help="the loss panel: task:<task> (that task's answer-token loss; "
    "task:sequential is the target-title loss) or a logged metric (loss)",
  )
  parser.add_argument(
    "--series",
    action="append",
    type=parse_series,
    help="LABEL=KEY, repeated: draw the runs ilm_<KEY>_s<steps> as the "
    "curve LABEL (default: the curve_* series of SERIES)",
  )
  parser.add_argument(
    "--seed",
    type=int,
    help="draw the runs of this training seed, ilm_<KEY>_s<steps>_seed<N> "
    "(default: the runs without a seed suffix)",
  )
  args = parser.parse_args(argv)
  series = tuple(args.series) if args.series else SERIES
  curves = collect(args.workdir, series, loss_key=args.loss_key, seed=args.seed)
  if not curves:
    suffix = "" if args.seed is None else f"_seed{args.seed}"
    keys = ", ".join(f"ilm_{key}_s<steps>{suffix}" for _, key in series)
    raise SystemExit(f"No {keys} test metrics under {args.workdir}.")
  user_sets = {
    tuple(run.user_ids.tolist())
    for runs in curves.values()
    for run in runs
    if run.user_ids is not None
  }
  if len(user_sets) > 1:
    print("Warning: the runs were evaluated on different users.")
  ids = np.array(next(iter(user_sets))) if len(user_sets) == 1 else None
  plot(curves, reference_values(args.workdir, ids), args.out)
  for label, runs in curves.items():
    for run in runs:
      hr, low, high = run.values[("hr@10", "seen")]
      print(
        f"{label:32s} {run.prompts:>8d} prompts  {run.users} users  "
        f"HR@10 seen {hr:.4f} [{low:.4f}, {high:.4f}]"
      )
  print(f"Wrote {args.out}.")


if __name__ == "__main__":
  main()
