"""Metrics to TensorBoard event files, a JSON-lines file and JSON files.

Only process 0 writes; on other processes every call is a no-op, so the
trainer can call it unconditionally.

A metrics file (`WORKDIR/metrics/<name>_<split>.json`, `write_metrics`)
holds each metric's mean over users and, when the evaluators returned
per-user values, those values and a 95% interval per mean
(`stats.mean_interval`: Wilson for hit rates, bootstrap otherwise):

  {
    "sequential/seen/hr@10": 0.04,
    "sequential/seen/hr@10_ci95": [0.0, 0.1],
    "users": 50.0,
    "per_user": {
      "user_ids": [3, 17, ...],
      "sequential/seen/hr@10": [0.0, 1.0, ...],
      "sequential/seen/rank": [-1.0, 4.0, ...],
      ...
    },
    "train": {"steps": 160, "batch_size": 8, "prompts": 1280,
              "evaluated_step": 160, "seed": 0},
    "dataset": {"name": "ml100k", "users": 943, "items": 1349,
                "interactions": 99287, "interactions_digest": "..."}
  }

`per_user` arrays are aligned with `user_ids` (sorted); null marks a user
that one of the split's evaluators did not evaluate. Per-user keys that are
not means in the file (e.g. "rank") get no interval. "train" and "dataset"
are written by the trainer (`train.train`); "dataset" is
`ProcessedDataset.record()`, whose digest lets the eval phase pair two
files user by user only when they ranked the same users' sequences (files
from different data: an error, `phases/eval.check_one_dataset`).
"""

import json
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

from ilm_jax import stats

PER_USER = "per_user"  # the per-user block of a metrics file
USER_IDS = "user_ids"  # its user ids, int [users], sorted
INTERVAL_SUFFIX = "_ci95"  # "<metric>_ci95": [low, high]


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
  _write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _write_text(path: os.PathLike, text: str) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)
  logging.info("Wrote %s.", path)


def merge_per_user(blocks: list[Mapping]) -> dict[str, np.ndarray]:
  """One per-user block from several evaluators' blocks of one split.

  Args:
    blocks: each {USER_IDS: int [n], name: float [n], ...}; names must not
      repeat across blocks.

  Returns:
    {USER_IDS: int [m] (the sorted union), name: float64 [m], ...}, NaN
    where a block did not evaluate a user.

  Raises:
    ValueError: a metric name appears in two blocks, or a block repeats a
      user id.
  """
  ids = np.unique(np.concatenate([np.asarray(b[USER_IDS]) for b in blocks]))
  merged: dict[str, np.ndarray] = {USER_IDS: ids.astype(np.int64)}
  for block in blocks:
    block_ids = np.asarray(block[USER_IDS], np.int64)
    if len(np.unique(block_ids)) != len(block_ids):
      raise ValueError("A per-user block lists a user id twice.")
    rows = np.searchsorted(ids, block_ids)
    for name, values in block.items():
      if name == USER_IDS:
        continue
      if name in merged:
        raise ValueError(f"Per-user metric {name!r} comes from two blocks.")
      column = np.full(len(ids), np.nan)
      column[rows] = np.asarray(values, np.float64)
      merged[name] = column
  return merged


def read_per_user(payload: Mapping) -> dict[str, np.ndarray] | None:
  """The per-user block of a loaded metrics file as arrays (null -> NaN).

  Returns:
    {USER_IDS: int64 [users], name: float64 [users], ...}, or None when the
    file has no per-user results (written before they existed).
  """
  block = payload.get(PER_USER)
  if not block:
    return None
  arrays = {USER_IDS: np.asarray(block[USER_IDS], np.int64)}
  for name, values in block.items():
    if name != USER_IDS:
      arrays[name] = np.array(
        [np.nan if v is None else v for v in values], np.float64
      )
  return arrays


def _json_number(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def is_proportion(name: str) -> bool:
  """Whether per-user values of metric `name` are 0 or 1: hits (HR@k) or
  shares (`share_*`), which get Wilson intervals."""
  last = name.rsplit("/", 1)[-1].removeprefix("masked_")
  return last.startswith(("hr@", "share_"))


def _set_interval(payload: dict, name: str, values: np.ndarray) -> None:
  evaluated = values[~np.isnan(values)]
  if len(evaluated):
    interval = stats.mean_interval(evaluated, proportion=is_proportion(name))
    payload[name + INTERVAL_SUFFIX] = [_json_number(v) for v in interval]


def with_current_intervals(payload: Mapping) -> dict:
  """A loaded metrics file with its intervals recomputed from its per-user
  values by today's `stats.mean_interval` (files keep the intervals of the
  code that wrote them; tables should not)."""
  payload = dict(payload)
  per_user = read_per_user(payload)
  for name, values in (per_user or {}).items():
    if name != USER_IDS and name in payload:
      _set_interval(payload, name, values)
  return payload


def metrics_payload(
  scalars: Mapping[str, float],
  per_user: Mapping[str, np.ndarray] | None = None,
  extra: Mapping | None = None,
) -> dict:
  """What `write_metrics` writes (see the module docstring).

  Args:
    scalars: metric name -> mean over users (or any scalar).
    per_user: optional {USER_IDS: int [n], name: float [n], ...} (NaN: not
      evaluated). Each name that is also a scalar gets "<name>_ci95".
    extra: further JSON-serialisable top-level entries (e.g. "train").

  Returns:
    A JSON-serialisable dict.
  """
  payload: dict = {k: _to_float(v) for k, v in scalars.items()}
  if per_user:
    ids = np.asarray(per_user[USER_IDS], np.int64)
    order = np.argsort(ids, kind="stable")
    block = {USER_IDS: ids[order].tolist()}
    for name, values in per_user.items():
      if name == USER_IDS:
        continue
      values = np.asarray(values, np.float64)[order]
      block[name] = [_json_number(v) for v in values]
      if name in payload:
        _set_interval(payload, name, values)
    payload.setdefault("users", float(len(ids)))
    payload[PER_USER] = block
  payload.update(extra or {})
  return payload


def _dumps(payload: Mapping) -> str:
  """Indented JSON; intervals on one line; per-user arrays last, one a line."""
  rest = {k: v for k, v in payload.items() if k != PER_USER}
  text = json.dumps(rest, indent=2, sort_keys=True)
  # [low, high] on one line.
  text = re.sub(
    r"\[\n\s+([^\s,\[\]{}]+),\n\s+([^\s,\[\]{}]+)\n\s+\]", r"[\1, \2]", text
  )
  if PER_USER not in payload:
    return text + "\n"
  block = payload[PER_USER]
  lines = ",\n".join(
    f"    {json.dumps(name)}: {json.dumps(block[name])}"
    for name in sorted(block, key=lambda n: (n != USER_IDS, n))
  )
  head = text[: text.rindex("}")].rstrip()
  separator = "," if rest else ""
  return f"{head}{separator}\n  {json.dumps(PER_USER)}: {{\n{lines}\n  }}\n}}\n"


def write_metrics(
  path: os.PathLike,
  scalars: Mapping[str, float],
  per_user: Mapping[str, np.ndarray] | None = None,
  extra: Mapping | None = None,
) -> None:
  """Writes a metrics file (process 0 only) atomically; see metrics_payload.

  Intervals are computed on process 0 only (seeded: rewriting the same
  results gives the same file).
  """
  if jax.process_index() != 0:
    return
  _write_text(path, _dumps(metrics_payload(scalars, per_user, extra)))
