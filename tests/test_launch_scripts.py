"""launch/gpu_phase2.sh's input checks (no Python run: it refuses first)."""

import os
import pathlib
import signal
import subprocess
import time

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


def test_gpu_phase2_names_the_missing_cf_export_first(tmp_path):
  refused = _refusal(tmp_path, "--config.qformer.variant=sasrec")
  assert refused.returncode == 1
  assert f"{tmp_path}/cf/export/metadata.json is missing" in refused.stderr


def test_gpu_phase2_passes_sigterm_on_and_waits_for_the_checkpoint(tmp_path):
  """A SIGTERM to the script reaches phase 2 (which checkpoints and exits
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
  )
  deadline = time.time() + 30
  while not (marks.exists() and "started" in marks.read_text()):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 143
  assert marks.read_text().split() == ["started", "saved"]
  assert "exited with status 143; rerun the same command" in stderr
