"""Progress lines for long loops: count, rate, elapsed time and ETA.

Any loop that can run for more than a few seconds (an evaluator over all
users, encoding every item, reading a large file) says what it does:

  what: n/N (x%), r/s, elapsed t, ETA e

through absl logging, at most once per `interval_s` seconds (plus a final
line from `done()`), so calling `update` once per batch costs a clock read
and a comparison.

Example:

  from ilm_jax import progress

  bar = progress.Progress("ranking/test users", total=len(users))
  for batch in batches:
    ...
    bar.update(len(batch))
  bar.done()

or, wrapping an iterable whose items each count 1 (or `size(item)`):

  for batch in progress.track(batches, "beam search users", total=n,
                              size=lambda b: len(b["user"])):
    ...

Rates are averaged over the whole run so far (not the last interval), so the
ETA is stable; the first interval includes jit compilation, which the later
lines amortise.
"""

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from absl import logging

T = TypeVar("T")

DEFAULT_INTERVAL_S = 15.0


def format_duration(seconds: float) -> str:
  """'42 s', '3 min 05 s' or '2 h 07 min' for a non-negative duration."""
  seconds = max(0.0, float(seconds))
  if seconds < 60:
    return f"{seconds:.0f} s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes} min {secs:02d} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes:02d} min"


class Progress:
  """Counts work done and logs `what: n/N (x%), rate/s, elapsed, ETA`.

  Args:
    what: what is counted, e.g. "ranking/test users"; starts every line.
    total: the number of units the loop will do, or None if unknown (the
      line then has no percentage and no ETA). Must be >= 0.
    interval_s: the least time between two logged lines (seconds, > 0).
    clock: returns seconds; `time.monotonic` unless a test injects one.

  Raises:
    ValueError: on a negative total or a non-positive interval.
  """

  def __init__(
    self,
    what: str,
    total: int | None = None,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
  ):
    if total is not None and total < 0:
      raise ValueError(f"Progress {what!r}: total={total} must be >= 0.")
    if not interval_s > 0:
      raise ValueError(
        f"Progress {what!r}: interval_s={interval_s} must be > 0."
      )
    self.what, self.total, self.interval_s = what, total, float(interval_s)
    self.count = 0
    self._clock = clock
    self._start = clock()
    self._last_log = self._start
    self._done = False

  def message(self) -> str:
    """The progress line for the current count (what `update` logs)."""
    elapsed = self._clock() - self._start
    rate = self.count / elapsed if elapsed > 0 else 0.0
    parts = [f"{self.what}: {self.count}"]
    if self.total is not None:
      percent = 100.0 * self.count / self.total if self.total else 100.0
      parts = [f"{self.what}: {self.count}/{self.total} ({percent:.0f}%)"]
    parts.append(f"{rate:.3g}/s")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if self.total is not None and not self._done:
      left = max(self.total - self.count, 0)
      if left == 0:
        parts.append("ETA 0 s")
      elif rate > 0:
        parts.append(f"ETA {format_duration(left / rate)}")
      else:
        parts.append("ETA unknown")
    return ", ".join(parts)

  def update(self, n: int = 1) -> None:
    """Adds `n` units done; logs a line if `interval_s` has passed."""
    self.count += n
    now = self._clock()
    if now - self._last_log >= self.interval_s:
      self._last_log = now
      logging.info("%s", self.message())

  def done(self) -> str:
    """Logs (and returns) the final line: count, rate and elapsed time."""
    self._done = True
    line = self.message() + " (done)"
    logging.info("%s", line)
    return line


def track(
  items: Iterable[T],
  what: str,
  total: int | None = None,
  *,
  size: Callable[[T], int] | None = None,
  interval_s: float = DEFAULT_INTERVAL_S,
) -> Iterator[T]:
  """Yields `items` unchanged, logging progress after each one.

  Args:
    items: any iterable.
    what, total, interval_s: as for `Progress`; `total` defaults to
      `len(items)` when `items` has a length.
    size: units one item counts for (e.g. users in a batch); 1 if None.

  The final line is logged when the iterable is exhausted.
  """
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  bar = Progress(what, total, interval_s=interval_s)
  for item in items:
    yield item
    bar.update(1 if size is None else size(item))
  bar.done()
