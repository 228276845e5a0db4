"""Two JAX processes on this machine (gloo CPU collectives) against one.

The trainer's steps run with the data sharded by process index
(tests/toy_task.py: each process takes its slice of every global batch);
the loss trajectory of two processes x 2 devices equals one process x 4
devices to float32 reduction-order noise (rtol 1e-5), and a checkpoint
written by two processes resumes in one process on one device, and the
other way round, landing on the uninterrupted run's losses.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two processes

REPO = pathlib.Path(__file__).parents[1]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(workdir, steps, processes=1, devices_per_process=1):
  env = dict(
    os.environ,
    PYTHONPATH=str(REPO),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
  )
  port = _port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "tests.multiprocess_toy",
        str(i),
        str(processes),
        str(port),
        str(workdir),
        str(steps),
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  devices = processes * devices_per_process
  for i, out in enumerate(outputs):
    assert f"done {i} {processes} {devices} {steps}" in out, out[-2000:]


def _losses(workdir) -> dict[int, float]:
  lines = (workdir / "toy" / "logs" / "metrics.jsonl").read_text().split("\n")
  return {
    record["step"]: record["loss"]
    for record in map(json.loads, filter(None, lines))
    if "loss" in record
  }


def test_two_processes_match_one_and_checkpoints_cross_process_counts(
  tmp_path,
):
  reference = tmp_path / "one_process_4_devices"
  _train(reference, 15, processes=1, devices_per_process=4)
  expected = _losses(reference)
  assert sorted(expected) == [5, 10, 15]

  two = tmp_path / "two_processes"
  _train(two, 10, processes=2, devices_per_process=2)
  got = _losses(two)
  assert sorted(got) == [5, 10]
  np.testing.assert_allclose(
    [got[5], got[10]], [expected[5], expected[10]], rtol=1e-5
  )
  # Only process 0 writes logs: one line per logged step, not two.
  lines = (two / "toy" / "logs" / "metrics.jsonl").read_text().splitlines()
  assert len([x for x in lines if '"loss"' in x]) == 2

  # Written by 2 processes (4 devices), resumed by 1 process on 1 device.
  shutil.copytree(two, tmp_path / "resumed_in_one")
  _train(tmp_path / "resumed_in_one", 15, processes=1, devices_per_process=1)
  np.testing.assert_allclose(
    _losses(tmp_path / "resumed_in_one")[15], expected[15], rtol=1e-5
  )

  # Written by 1 process on 1 device, resumed by 2 processes.
  one = tmp_path / "one_process_1_device"
  _train(one, 10, processes=1, devices_per_process=1)
  shutil.copytree(one, tmp_path / "resumed_in_two")
  _train(tmp_path / "resumed_in_two", 15, processes=2, devices_per_process=2)
  np.testing.assert_allclose(
    _losses(tmp_path / "resumed_in_two")[15], expected[15], rtol=1e-5
  )
