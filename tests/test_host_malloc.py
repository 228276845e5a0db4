"""The glibc malloc settings applied before JAX starts (ilm_jax/host_malloc)."""

import ctypes

from ilm_jax import host_malloc


class FakeLibc:
  """Records mallopt calls; refuses the parameters listed in `refuse`."""

  def __init__(self, refuse=()):
    self.calls, self.refuse = [], refuse

  def mallopt(self, param, value):
    self.calls.append((param, value))
    return 0 if param in self.refuse else 1


def test_sets_no_mmap_high_trim_one_arena(monkeypatch):
  libc = FakeLibc()
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
  note = host_malloc.keep_large_buffers_in_heap()
  # glibc's <malloc.h>: M_MMAP_MAX -4, M_TRIM_THRESHOLD -1, M_ARENA_MAX -8.
  assert libc.calls == [(-4, 0), (-1, 2**31 - 1), (-8, 1)]
  assert "keeps large buffers in the heap" in note


def test_leaves_a_preloaded_allocator_alone(monkeypatch):
  libc = FakeLibc()
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
  note = host_malloc.keep_large_buffers_in_heap()
  assert libc.calls == []
  assert "libtcmalloc_minimal.so.4" in note


def test_reports_a_refused_setting_and_a_missing_glibc(monkeypatch):
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc(refuse=(-8,)))
  assert "refused" in host_malloc.keep_large_buffers_in_heap()

  def no_glibc(name):
    raise OSError(f"{name}: cannot open shared object file")

  monkeypatch.setattr(ctypes, "CDLL", no_glibc)
  assert "no glibc" in host_malloc.keep_large_buffers_in_heap()
