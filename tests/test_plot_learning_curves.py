"""docs/plot_learning_curves.py on synthetic metrics files."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from ilm_jax import metric_writer

_SCRIPT = pathlib.Path(__file__).parents[1] / "docs" / "plot_learning_curves.py"
_spec = importlib.util.spec_from_file_location("plot_learning_curves", _SCRIPT)
plot_learning_curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_learning_curves)

BATCH = 8
USERS = np.arange(40)


def _hits(rate: float, seed: int) -> np.ndarray:
  return (np.random.default_rng(seed).random(len(USERS)) < rate).astype(float)


def _write_run(workdir, name, steps, seed, log_steps):
  """A phase-2 run's metrics file and training log; returns its hits."""
  per_user = {"user_ids": USERS}
  scalars = {"users": float(len(USERS))}
  for offset, (metric, templates) in enumerate(plot_learning_curves.PANELS):
    values = _hits(0.05 * np.log2(steps), seed + offset)
    if metric.startswith("ndcg"):
      values = values * 0.5
    key = plot_learning_curves._key(metric, templates)
    per_user[key] = values
    scalars[key] = float(values.mean())
  metric_writer.write_metrics(
    workdir / "metrics" / f"{name}_test.json",
    scalars,
    per_user,
    {"train": {"steps": steps, "batch_size": BATCH, "prompts": steps * BATCH}},
  )
  logs = workdir / name / "logs"
  logs.mkdir(parents=True)
  records = [
    {"step": s, "loss": 3.0 / s, "learning_rate": 1e-4} for s in log_steps
  ]
  # A validation record (no loss) and a restarted run's repeat of a step.
  records.insert(1, {"step": log_steps[0], "valid/hr@10": 0.1})
  records.append({"step": log_steps[-1], "loss": 0.125})
  (logs / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in records)
  )
  return per_user


@pytest.fixture
def workdirs(tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  written = {}
  for seed, (series, steps, workdir) in enumerate(
    [
      ("curve_ilm", 80, first),
      ("curve_ilm", 320, first),
      ("curve_ilm", 1280, second),  # a budget run elsewhere
      ("curve_mlp", 320, first),
      ("curve_mlp", 80, first),
    ]
  ):
    name = f"ilm_{series}_s{steps}"
    written[name] = _write_run(workdir, name, steps, 10 * seed, [10, 20])
  # A reference row with per-user results on more users than the curves.
  sasrec_hits = (np.arange(100) % 4 == 0).astype(float)
  metric_writer.write_metrics(
    first / "metrics" / "sasrec_test.json",
    {"hr@10": sasrec_hits.mean(), "ndcg@10": 0.1},
    {"user_ids": np.arange(100)[::-1], "hr@10": sasrec_hits[::-1]},
  )
  # Not a curve run: ignored.
  metric_writer.write_metrics(
    first / "metrics" / "ilm_mlp_test.json", {"users": 1.0}
  )
  return [first, second], written


def test_collect_reads_the_files_values(workdirs):
  dirs, written = workdirs
  curves = plot_learning_curves.collect(dirs)
  assert list(curves) == ["ILM (Q-Former)", "MLP projector (CoLLM-style)"]
  ilm = curves["ILM (Q-Former)"]
  assert [run.prompts for run in ilm] == [640, 2560, 10240]
  assert [run.name for run in ilm] == [
    "ilm_curve_ilm_s80",
    "ilm_curve_ilm_s320",
    "ilm_curve_ilm_s1280",
  ]
  for runs in curves.values():
    for run in runs:
      saved = json.loads(
        next(
          (d / "metrics" / f"{run.name}_test.json")
          for d in dirs
          if (d / "metrics" / f"{run.name}_test.json").exists()
        ).read_text()
      )
      for metric, templates in plot_learning_curves.PANELS:
        key = plot_learning_curves._key(metric, templates)
        mean, low, high = run.values[(metric, templates)]
        assert mean == saved[key] == np.mean(written[run.name][key])
        assert [low, high] == saved[key + "_ci95"]
      assert run.users == 40
      np.testing.assert_array_equal(run.user_ids, USERS)
      # Logged losses by step (the restarted run's last record wins).
      np.testing.assert_array_equal(run.loss_prompts, [10 * BATCH, 20 * BATCH])
      np.testing.assert_allclose(run.loss, [0.3, 0.125])


def test_plot_draws_the_collected_values_into_a_png(workdirs, tmp_path):
  dirs, _ = workdirs
  curves = plot_learning_curves.collect(dirs)
  references = plot_learning_curves.reference_values(dirs, USERS)
  # SASRec hits every fourth user; on users 0-39 that is 10 of 40.
  assert references["SASRec"][("hr@10", "seen")] == 0.25
  assert references["SASRec"][("hr@10", "unseen")] == 0.25
  # No per-user NDCG in its file: the file's mean over all its users.
  assert references["SASRec"][("ndcg@10", "seen")] == 0.1
  assert "Zero-shot LLM" not in references  # no such file
  out = tmp_path / "plots" / "curves.png"
  figure = plot_learning_curves.plot(curves, references, out)
  assert out.stat().st_size > 10_000
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  hr_seen = figure.axes[0]
  lines = {line.get_label(): line for line in hr_seen.get_lines()}
  for label, runs in curves.items():
    xy = lines[label].get_xydata()
    np.testing.assert_array_equal(xy[:, 0], [r.prompts for r in runs])
    np.testing.assert_array_equal(
      xy[:, 1], [r.values[("hr@10", "seen")][0] for r in runs]
    )
  np.testing.assert_array_equal(lines["SASRec"].get_ydata(), [0.25, 0.25])
  # The interval bands span each run's [low, high].
  band = hr_seen.collections[0].get_paths()[0].vertices
  ilm = curves["ILM (Q-Former)"]
  for run in ilm:
    _, low, high = run.values[("hr@10", "seen")]
    at_x = band[np.isclose(band[:, 0], run.prompts), 1]
    assert np.isclose(at_x, low).any() and np.isclose(at_x, high).any()
  # The shuffled-entities panel plots each run's mean gain.
  gain_lines = {ln.get_label(): ln for ln in figure.axes[6].get_lines()}
  np.testing.assert_array_equal(
    gain_lines["ILM (Q-Former)"].get_ydata(),
    [r.values[(plot_learning_curves.GAIN, "seen")][0] for r in ilm],
  )
  # The loss panel holds every run's logged losses.
  loss_lines = figure.axes[3].get_lines()
  assert len(loss_lines) == 5
  np.testing.assert_allclose(loss_lines[0].get_ydata(), [0.3, 0.125])
  # The naming panel, last, plots each run's share of named targets.
  named = {ln.get_label(): ln for ln in figure.axes[7].get_lines()}
  np.testing.assert_array_equal(
    named["ILM (Q-Former)"].get_ydata(),
    [r.values[(plot_learning_curves.NAMED, "seen")][0] for r in ilm],
  )


def test_main_writes_the_png(workdirs, tmp_path, capsys):
  dirs, _ = workdirs
  out = tmp_path / "main.png"
  argv = [f"--workdir={d}" for d in dirs] + [f"--out={out}"]
  plot_learning_curves.main(argv)
  assert out.stat().st_size > 10_000
  printed = capsys.readouterr().out
  assert "10240 prompts  40 users" in printed


def test_a_file_without_its_train_record_is_rejected(tmp_path):
  metric_writer.write_metrics(
    tmp_path / "metrics" / "ilm_curve_ilm_s80_test.json", {"users": 4.0}
  )
  with pytest.raises(ValueError, match="no train record"):
    plot_learning_curves.collect([tmp_path])


def test_task_loss_divides_the_interval_sums_and_skips_intervals_without_it(
  tmp_path,
):
  logs = tmp_path / "ilm_curve_ilm_s4" / "logs"
  logs.mkdir(parents=True)
  records = [
    # Interval means of two steps: 3 sequential tokens, NLL sum 6 -> 2.0.
    {
      "step": 2,
      "answer_nll_sum/sequential": 6.0,
      "answer_tokens/sequential": 3.0,
    },
    # No sequential batch in this interval: skipped, not a zero loss.
    {
      "step": 4,
      "answer_nll_sum/sequential": 0.0,
      "answer_tokens/sequential": 0.0,
    },
    {
      "step": 6,
      "answer_nll_sum/sequential": 1.5,
      "answer_tokens/sequential": 2.0,
    },
    {"step": 6, "valid/hr@10": 0.1},
  ]
  (logs / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in records)
  )
  prompts, loss = plot_learning_curves.training_loss(
    tmp_path, "ilm_curve_ilm_s4", 8, "task:sequential"
  )
  np.testing.assert_array_equal(prompts, [16, 48])
  np.testing.assert_allclose(loss, [2.0, 0.75])


def test_the_zero_shot_reference_prefers_the_500_user_row(workdirs):
  dirs, _ = workdirs
  key = plot_learning_curves._key("hr@10", "seen")

  def write(workdir, name, hits):
    metric_writer.write_metrics(
      workdir / "metrics" / f"{name}_test.json",
      {key: float(np.mean(hits))},
      {"user_ids": USERS, key: hits},
    )

  write(dirs[1], "ilm_zeroshot", (USERS < 4).astype(float))  # 0.1
  found = plot_learning_curves.reference_values(dirs, USERS)
  assert found["Zero-shot LLM"][("hr@10", "seen")] == 0.1
  write(dirs[1], "ilm_curve_zeroshot", (USERS < 8).astype(float))  # 0.2
  found = plot_learning_curves.reference_values(dirs, USERS)
  assert found["Zero-shot LLM"][("hr@10", "seen")] == 0.2


def test_series_flag_selects_other_variants_and_rejects_bad_ones(
  tmp_path, capsys
):
  for steps in (80, 640):
    _write_run(tmp_path, f"ilm_lora_x_s{steps}", steps, steps, [10, 20])
  _write_run(tmp_path, "ilm_lora_x_s640_seed1", 640, 1, [10])  # not a budget
  curves = plot_learning_curves.collect(
    [tmp_path], (plot_learning_curves.parse_series("A = B=lora_x"),)
  )
  assert list(curves) == ["A = B"]
  assert [run.name for run in curves["A = B"]] == [
    "ilm_lora_x_s80",
    "ilm_lora_x_s640",
  ]
  out = tmp_path / "x.png"
  plot_learning_curves.main(
    [f"--workdir={tmp_path}", f"--out={out}", "--series=A=lora_x"]
  )
  assert "5120 prompts  40 users" in capsys.readouterr().out
  for bad in ("lora_x", "=lora_x", "A=", "A=lora x"):
    with pytest.raises(SystemExit):
      plot_learning_curves.main([f"--workdir={tmp_path}", f"--series={bad}"])
  with pytest.raises(SystemExit, match="ilm_other_s<steps>"):
    plot_learning_curves.main([f"--workdir={tmp_path}", "--series=A=other"])


def test_seed_flag_draws_one_seeds_runs_only(tmp_path, capsys):
  for name, steps in (
    ("ilm_lora_x_s80_seed5", 80),
    ("ilm_lora_x_s640_seed5", 640),
    ("ilm_lora_x_s320_seed15", 320),  # another seed sharing the prefix
    ("ilm_lora_x_s160", 160),  # no seed suffix
  ):
    _write_run(tmp_path, name, steps, steps, [10, 20])
  series = (("A", "lora_x"),)
  by_seed = plot_learning_curves.collect([tmp_path], series, seed=5)
  assert [run.name for run in by_seed["A"]] == [
    "ilm_lora_x_s80_seed5",
    "ilm_lora_x_s640_seed5",
  ]
  assert [run.prompts for run in by_seed["A"]] == [640, 5120]
  # The training log is the seeded run's own directory.
  np.testing.assert_allclose(by_seed["A"][0].loss, [0.3, 0.125])
  unseeded = plot_learning_curves.collect([tmp_path], series)
  assert [run.name for run in unseeded["A"]] == ["ilm_lora_x_s160"]
  out = tmp_path / "seed.png"
  plot_learning_curves.main(
    [f"--workdir={tmp_path}", f"--out={out}", "--series=A=lora_x", "--seed=5"]
  )
  printed = capsys.readouterr().out
  assert "640 prompts" in printed and "5120 prompts" in printed
  assert "1280 prompts" not in printed and "2560 prompts" not in printed
  assert out.stat().st_size > 0
  with pytest.raises(SystemExit, match="ilm_lora_x_s<steps>_seed7"):
    plot_learning_curves.main(
      [f"--workdir={tmp_path}", "--series=A=lora_x", "--seed=7"]
    )


def test_popularity_is_a_reference_and_empty_panels_say_so(workdirs, tmp_path):
  dirs, _ = workdirs
  hits = (USERS % 5 == 0).astype(float)  # 8 of 40
  metric_writer.write_metrics(
    dirs[0] / "metrics" / "popularity_test.json",
    {"hr@10": 0.5},
    {"user_ids": USERS, "hr@10": hits},
  )
  references = plot_learning_curves.reference_values(dirs, USERS)
  assert references["Popularity"][("hr@10", "seen")] == 0.2
  curves = plot_learning_curves.collect(dirs)
  for runs in curves.values():
    for run in runs:
      run.values[(plot_learning_curves.NAMED, "seen")] = (np.nan,) * 3
  figure = plot_learning_curves.plot(curves, references, tmp_path / "p.png")
  texts = [[t.get_text() for t in ax.texts] for ax in figure.axes]
  assert texts[7] == ["not evaluated in these runs"]
  assert texts[0] == []
