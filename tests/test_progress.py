"""Tests for ilm_jax.progress: line format, logging interval, ETA."""

import pytest
from absl import logging

from ilm_jax import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


@pytest.fixture
def logged(monkeypatch):
  lines = []
  monkeypatch.setattr(
    logging, "info", lambda fmt, *args: lines.append(fmt % args)
  )
  return lines


def test_format_duration():
  assert progress.format_duration(0.4) == "0 s"
  assert progress.format_duration(42.2) == "42 s"
  assert progress.format_duration(185) == "3 min 05 s"
  assert progress.format_duration(2 * 3600 + 7 * 60 + 10) == "2 h 07 min"
  assert progress.format_duration(-3) == "0 s"


def test_message_has_count_percent_rate_elapsed_eta():
  clock = FakeClock()
  bar = progress.Progress("users", total=400, clock=clock)
  clock.now += 20.0
  bar.count = 100
  # 100 in 20 s = 5/s; 300 left -> 60 s.
  assert (
    bar.message() == "users: 100/400 (25%), 5/s, elapsed 20 s, ETA 1 min 00 s"
  )


def test_logs_once_per_interval_and_a_final_line(logged):
  clock = FakeClock()
  bar = progress.Progress("items", total=10, interval_s=10.0, clock=clock)
  for _ in range(10):
    clock.now += 3.0
    bar.update(1)
  # Logged at t=12 (4 done) and t=24 (8 done), not at every update.
  assert logged == [
    "items: 4/10 (40%), 0.333/s, elapsed 12 s, ETA 18 s",
    "items: 8/10 (80%), 0.333/s, elapsed 24 s, ETA 6 s",
  ]
  assert bar.done() == "items: 10/10 (100%), 0.333/s, elapsed 30 s (done)"
  assert logged[-1].endswith("(done)")


def test_unknown_total_has_no_percent_or_eta():
  clock = FakeClock()
  bar = progress.Progress("lines", clock=clock)
  clock.now += 2.0
  bar.update(50)
  assert bar.message() == "lines: 50, 25/s, elapsed 2 s"


def test_zero_rate_says_eta_unknown():
  clock = FakeClock()
  bar = progress.Progress("x", total=3, clock=clock)
  clock.now += 1.0
  assert bar.message().endswith("ETA unknown")


def test_track_yields_items_and_counts_sizes(logged):
  batches = [[1, 2], [3], [4, 5, 6]]
  out = list(progress.track(batches, "rows", total=6, size=len))
  assert out == batches
  assert logged[-1].startswith("rows: 6/6 (100%)")


def test_track_takes_total_from_len(logged):
  list(progress.track(range(7), "steps"))
  assert logged[-1].startswith("steps: 7/7 (100%)")


@pytest.mark.parametrize(
  "kwargs", [dict(total=-1), dict(total=3, interval_s=0.0)]
)
def test_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError, match="Progress 'bad'"):
    progress.Progress("bad", **kwargs)
