"""The allocator re-exec: once, guarded, opt-out, clear when missing."""

import os
import pathlib
import subprocess
import sys

import pytest

from ilm_jax import allocator


class Exec(Exception):
  pass


@pytest.fixture
def execve(monkeypatch):
  calls = []

  def fake(path, argv, env):
    calls.append((path, argv, env))
    raise Exec

  monkeypatch.setattr(allocator.os, "execve", fake)
  for key in (allocator.ENV, allocator.GUARD, "LD_PRELOAD"):
    monkeypatch.delenv(key, raising=False)
  return calls


@pytest.fixture
def fake_lib(monkeypatch, tmp_path):
  lib = tmp_path / "libmimalloc.so.3"
  lib.write_bytes(b"")
  monkeypatch.setattr(allocator, "mimalloc_library", lambda: lib)
  return lib


def test_reexecs_once_with_the_library_preloaded(execve, fake_lib):
  with pytest.raises(Exec):
    allocator.reexec_with_preload()
  ((path, argv, env),) = execve
  assert path == sys.executable
  assert argv == [sys.executable, *sys.orig_argv[1:]]
  assert env["LD_PRELOAD"] == str(fake_lib)
  assert env[allocator.GUARD] == "1"


def test_keeps_an_existing_preload(execve, fake_lib, monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/x/libother.so")
  with pytest.raises(Exec):
    allocator.reexec_with_preload()
  assert execve[0][2]["LD_PRELOAD"] == f"{fake_lib}:/x/libother.so"


def test_guard_stops_a_second_exec(execve, fake_lib, monkeypatch, caplog):
  monkeypatch.setenv(allocator.GUARD, "1")
  allocator.reexec_with_preload()  # returns, no exec
  assert not execve


def test_opt_out(execve, fake_lib, monkeypatch):
  monkeypatch.setenv(allocator.ENV, "system")
  assert allocator.reexec_with_preload() == "glibc malloc"
  assert not execve


def test_caller_preload_is_respected(execve, fake_lib, monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")
  allocator.reexec_with_preload()
  assert not execve


def test_missing_library_logs_and_continues(execve, monkeypatch):
  monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
  warnings = []
  monkeypatch.setattr(
    allocator.logging, "warning", lambda msg, *a: warnings.append(msg % a)
  )
  assert allocator.reexec_with_preload() == "glibc malloc"
  assert not execve
  assert "pip install cmeel-mimalloc" in warnings[0]


def test_missing_path_logs_and_continues(execve, monkeypatch, tmp_path):
  monkeypatch.setenv(allocator.ENV, str(tmp_path / "nope.so"))
  warnings = []
  monkeypatch.setattr(
    allocator.logging, "warning", lambda msg, *a: warnings.append(msg % a)
  )
  assert allocator.reexec_with_preload() == "glibc malloc"
  assert not execve
  assert "no such file" in warnings[0]


@pytest.mark.skipif(
  allocator.mimalloc_library() is None, reason="cmeel-mimalloc not installed"
)
def test_real_process_reexecs_exactly_once(tmp_path):
  script = (
    "import os\n"
    "from ilm_jax import allocator\n"
    "print('start', flush=True)\n"
    "allocator.reexec_with_preload()\n"
    "print('mapped', allocator.loaded_allocator(), flush=True)\n"
  )
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in (allocator.ENV, allocator.GUARD, "LD_PRELOAD")
  }
  env["PYTHONPATH"] = str(pathlib.Path(__file__).parents[1])
  out = subprocess.run(
    [sys.executable, "-c", script],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines.count("start") == 2  # the original process and one re-exec
  (mapped,) = [x for x in lines if x.startswith("mapped")]
  assert "libmimalloc" in mapped
