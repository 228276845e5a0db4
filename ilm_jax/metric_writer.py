"""Metrics to TensorBoard event files, a JSON-lines file and the console.

Only process 0 writes; on other processes every call is a no-op, so the
trainer can call it unconditionally.
"""

import json
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging


def _to_float(value) -> float:
  return float(np.asarray(value))


def tensorboard_tag(name: str) -> str:
  """`name` with what TensorBoard rejects (e.g. "@" in hr@10) as "_".

  TensorBoard would rename it anyway, with a warning per metric and step;
  metrics.jsonl keeps the original names.
  """
  return re.sub(r"[^\w.\-/]", "_", name)


class MetricWriter:
  """Writes scalars to `<logdir>/events.*` and `<logdir>/metrics.jsonl`."""

  def __init__(self, logdir: os.PathLike):
    self._active = jax.process_index() == 0
    self._logdir = pathlib.Path(logdir)
    self._tb = None
    self._jsonl = None
    if self._active:
      self._logdir.mkdir(parents=True, exist_ok=True)
      # Imported here so that processes > 0 never touch the event files.
      import tensorboardX  # noqa: PLC0415

      self._tb = tensorboardX.SummaryWriter(str(self._logdir))
      self._jsonl = open(self._logdir / "metrics.jsonl", "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(tensorboard_tag(name), value, step)
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()

  def write_text(self, step: int, name: str, text: str) -> None:
    if self._active:
      self._tb.add_text(name, text, step)

  def flush(self) -> None:
    if self._active:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()
      self._active = False


def write_json(path: os.PathLike, payload: Mapping) -> None:
  """Writes a JSON file (process 0 only) atomically."""
  if jax.process_index() != 0:
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)
  logging.info("Wrote %s.", path)
