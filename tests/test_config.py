"""Configs load in every mode; bad values and fields get clear errors."""

import pathlib
import subprocess
import sys

import pytest

from configs import ml1m
from ilm_jax import config_validation, experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arg", [None, "cpu", "tiny"])
def test_every_mode_validates(arg):
  config = ml1m.get_config(arg)
  config_validation.validate(config)
  assert config.mode == (arg or "full")


def test_unknown_mode_lists_the_valid_ones():
  with pytest.raises(ValueError, match="full.*cpu.*tiny"):
    ml1m.get_config("huge")


def test_out_of_range_values_name_field_and_range():
  config = ml1m.get_config("tiny")
  config.cf.optim.learning_rate = 0.0
  config.cf.train.batch_size = -4
  config.data.max_history = 0
  config.ilm.variant = "../mlp"
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config)
  message = str(error.value)
  assert "config.cf.optim.learning_rate=0.0: must be a finite number > 0" in (
    message
  )
  assert "config.cf.train.batch_size=-4: must be an integer >= 1" in message
  assert "config.data.max_history=0: must be an integer >= 1" in message
  assert "config.ilm.variant='../mlp': must be lowercase letters" in message


def test_phase_selection():
  assert config_validation.selected_phases("all") == list(
    config_validation.PHASES
  )
  # Order follows the pipeline, not the command line.
  assert config_validation.selected_phases("ilm, cf") == ["cf", "ilm"]
  with pytest.raises(config_validation.ConfigError, match="unknown.*'nope'"):
    config_validation.selected_phases("cf,nope")


def _main(*args):
  return subprocess.run(
    [sys.executable, "-m", "ilm_jax.main", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def test_cli_rejects_unknown_config_field(tmp_path):
  proc = _main(
    "--config=configs/ml1m.py:tiny",
    f"--workdir={tmp_path}",
    "--config.cf.optim.lr=3",
  )
  assert proc.returncode != 0
  assert "Unknown config field 'lr' in --config.cf.optim.lr" in proc.stderr


def test_cli_rejects_bad_value_before_any_work(tmp_path):
  proc = _main(
    "--config=configs/ml1m.py:tiny",
    f"--workdir={tmp_path}",
    "--config.cf.train.steps=-1",
  )
  assert proc.returncode != 0
  assert "config.cf.train.steps=-1: must be an integer >= 0" in proc.stderr
  assert not (tmp_path / "cf").exists()


@pytest.mark.parametrize(
  "preload, hinted", [("", True), ("libtcmalloc.so", False)]
)
def test_allocator_hint_only_on_cpu_with_glibc_malloc(
  monkeypatch, preload, hinted
):
  monkeypatch.setenv("LD_PRELOAD", preload)
  messages = []
  monkeypatch.setattr(
    experiment.logging, "info", lambda msg, *a: messages.append(msg)
  )
  experiment.log_allocator_hint()
  assert any("tcmalloc" in m for m in messages) == hinted
