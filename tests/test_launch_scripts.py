"""launch/gpu_phase2.sh: its input checks (it refuses before any Python runs)
and its signal handling (with a stub `python` on PATH)."""

import os
import pathlib
import signal
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_phase2.sh"


def _refusal(workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [str(SCRIPT), str(workdir), "configs/ml1m.py:gpu", *flags],
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )


def test_gpu_phase2_looks_for_the_q_former_of_the_variant_it_is_given(
  tmp_path,
):
  """Phase 1 of `--config.qformer.variant=sasrec` writes qformer_sasrec/:
  that is the export the script must ask for, not qformer/."""
  (tmp_path / "cf" / "export").mkdir(parents=True)
  (tmp_path / "cf" / "export" / "metadata.json").write_text("{}")
  default = _refusal(tmp_path)
  assert default.returncode == 1
  assert f"{tmp_path}/qformer/export/params is missing" in default.stderr
  variant = _refusal(tmp_path, "--config.qformer.variant=sasrec")
  assert variant.returncode == 1
  assert f"{tmp_path}/qformer_sasrec/export/params is missing" in (
    variant.stderr
  )
  assert "--config.qformer.variant" in variant.stderr


@pytest.mark.parametrize(
  "flags, wanted",
  [
    (("--config.qformer.variant", "sasrec"), "qformer_sasrec/export/params"),
    (("--config.qformer.variant=",), "qformer/export/params"),
    (
      (
        "--config.ilm.model.qformer_init=random",
        "--config.ilm.model.qformer_init=phase1",
      ),
      "qformer/export/params",
    ),
  ],
)
def test_gpu_phase2_reads_the_flags_as_absl_does(tmp_path, flags, wanted):
  """`--flag value` counts like `--flag=value`, and the last setting wins."""
  (tmp_path / "cf" / "export").mkdir(parents=True)
  (tmp_path / "cf" / "export" / "metadata.json").write_text("{}")
  refused = _refusal(tmp_path, *flags)
  assert refused.returncode == 1
  assert f"{tmp_path}/{wanted} is missing" in refused.stderr


@pytest.mark.parametrize(
  "flag",
  [
    "--config.ilm.model.qformer_init=random",
    "--config.ilm.model.adapter=mlp",
    "--config.ilm.model.adapter=prompt",
  ],
)
def test_gpu_phase2_needs_no_q_former_where_phase_2_reads_none(tmp_path, flag):
  """A random Q-Former or an adapter without one: only the CF export is
  required (the stub `python` stands in for phase 2)."""
  (tmp_path / "cf" / "export").mkdir(parents=True)
  (tmp_path / "cf" / "export" / "metadata.json").write_text("{}")
  stub_dir = tmp_path / "bin"
  stub_dir.mkdir()
  (stub_dir / "python").write_text("#!/usr/bin/env bash\nexit 0\n")
  (stub_dir / "python").chmod(0o755)
  ran = subprocess.run(
    [str(SCRIPT), str(tmp_path), "configs/ml1m.py:gpu", flag],
    env=dict(os.environ, PATH=f"{stub_dir}:{os.environ['PATH']}"),
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert ran.returncode == 0, ran.stderr
  assert "gpu_phase2: phase 2 and the tables in" in ran.stdout


def test_gpu_phase2_names_the_missing_cf_export_first(tmp_path):
  refused = _refusal(tmp_path, "--config.qformer.variant=sasrec")
  assert refused.returncode == 1
  assert f"{tmp_path}/cf/export/metadata.json is missing" in refused.stderr


def _default_signals():
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_gpu_phase2_passes_sigterm_on_and_waits_for_the_checkpoint(
  tmp_path, signum
):
  """A SIGTERM (or Ctrl-C's SIGINT, which a background job would ignore)
  to the script reaches phase 2 as a SIGTERM (it checkpoints and exits
  143), and the script exits only after it, with its status. `python` is
  a stub on PATH that records the signal and takes a moment to "save"."""
  workdir = tmp_path / "w"
  (workdir / "cf" / "export").mkdir(parents=True)
  (workdir / "cf" / "export" / "metadata.json").write_text("{}")
  (workdir / "qformer" / "export" / "params").mkdir(parents=True)
  stub_dir = tmp_path / "bin"
  stub_dir.mkdir()
  marks = tmp_path / "marks"
  stub = stub_dir / "python"
  stub.write_text(
    "#!/usr/bin/env bash\n"
    f"trap 'sleep 0.5; echo saved >> {marks}; exit 143' TERM\n"
    f"echo started >> {marks}\n"
    "while :; do sleep 0.05; done\n"
  )
  stub.chmod(0o755)
  proc = subprocess.Popen(
    [str(SCRIPT), str(workdir), "configs/ml1m.py:gpu"],
    env=dict(os.environ, PATH=f"{stub_dir}:{os.environ['PATH']}"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    # As from a terminal: a shell that inherits an ignored SIGINT (a test
    # run started in the background, nohup) cannot trap it.
    preexec_fn=_default_signals,
  )
  deadline = time.time() + 30
  while not (marks.exists() and "started" in marks.read_text()):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 143
  assert marks.read_text().split() == ["started", "saved"]
  assert "exited with status 143; rerun the same command" in stderr
