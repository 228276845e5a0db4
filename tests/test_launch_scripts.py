"""launch/gpu_phase2.sh's input checks (no Python run: it refuses first)."""

import pathlib
import subprocess

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
