"""Orbax checkpoints: train state plus data-iterator state, and param exports.

A training checkpoint at `WORKDIR/<phase>/checkpoints/<step>/` holds two
items saved together: `state` (params, optimizer state, step) and `data`
(the grain iterator state as JSON), so a resumed run sees exactly the batches
an uninterrupted run would. Param-only exports (the best params of a phase,
the trained adapter) use a plain `StandardCheckpointer` directory.

Topology independence: whatever mesh and device count wrote a checkpoint,
it restores on any other. Orbax refuses to restore an array without a
target sharding when the writer's devices differ from the reader's, so
every restore here passes one: the target's own sharding where it has one,
else the default placement (`default_sharding`). A target whose tree or
shapes differ from the checkpoint's is reported as written for a different
model, before any read; only a failing read is reported as possibly
corrupted.

Atomic overwrite: `save_params` writes into a sibling `<name>.saving/`,
moves the previous export to `<name>.old/`, renames the new one into place
and deletes the old one. A process killed at any point leaves a complete
export loadable at `<name>` or, for the instant between the two renames,
at `<name>.old` (which `load_params` and the next `save_params` recover).
"""

import glob
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

# Written by `save_params(..., record=...)` inside the export, so a record
# and the params it describes are swapped into place together.
RECORD_FILE = "record.json"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not fit the current model."""


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing a tree of jax Arrays."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None)
    ),
    tree,
  )


def default_sharding() -> jax.sharding.Sharding:
  """Where arrays restored without a target sharding go.

  One process: the default device (`jax.devices()[0]`). Several processes:
  replicated over all devices, so every process holds the whole array and
  the result is a valid global array.
  """
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _with_shardings(tree: Any) -> Any:
  """Fills a missing sharding on each leaf with `default_sharding()`."""
  fallback = default_sharding()

  def fill(leaf):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=fallback)

  return jax.tree.map(fill, tree)


def _path_str(path) -> str:
  return "/".join(
    str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    for k in path
  )


def _check_fits(where: str, saved: Any, target: Any) -> None:
  """Raises CheckpointError naming the first tree or shape difference."""
  saved_leaves = {
    _path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)
  }
  target_leaves = {
    _path_str(p): leaf
    for p, leaf in jax.tree_util.tree_leaves_with_path(target)
  }
  problems = []
  missing = sorted(set(target_leaves) - set(saved_leaves))
  extra = sorted(set(saved_leaves) - set(target_leaves))
  if missing:
    problems.append(f"the model has {missing[:5]} which the checkpoint lacks")
  if extra:
    problems.append(f"the checkpoint has {extra[:5]} which the model lacks")
  for key in sorted(set(saved_leaves) & set(target_leaves)):
    saved_shape = tuple(getattr(saved_leaves[key], "shape", ()) or ())
    target_shape = tuple(np.shape(target_leaves[key]))
    if saved_shape != target_shape:
      problems.append(
        f"{key!r} is {saved_shape} in the checkpoint but {target_shape} in "
        "the model"
      )
      break
  if problems:
    raise CheckpointError(
      f"The checkpoint at {where} is valid but was written for a different "
      f"model/config: {'; '.join(problems)}. Point the run at a fresh "
      "--workdir, or fix the config to match the checkpoint."
    )


def _under_trace(error: Exception) -> bool:
  """Whether a restore failed because it ran inside a JAX trace."""
  while error is not None:
    if isinstance(error, jax.errors.JAXTypeError) or "Tracer" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _read_error(where: str, error: Exception) -> CheckpointError:
  if _under_trace(error):
    # The files are fine: orbax builds concrete arrays, which a trace
    # (jit, eval_shape, grad) cannot hold.
    return CheckpointError(
      f"Cannot read the checkpoint at {where} inside a JAX transformation "
      "(jit / eval_shape / grad): orbax must read outside any trace. Read it "
      "before tracing, e.g. in Task.load_params rather than Task.init_params "
      f"({type(error).__name__}: {str(error)[:300]})."
    )
  return CheckpointError(
    f"Cannot read the checkpoint at {where}: its files are incomplete or "
    f"corrupted ({type(error).__name__}: {str(error)[:500]}). Delete it or "
    "point the run at a fresh --workdir."
  )


class TrainCheckpointer:
  """Saves and restores (train state, data-iterator state) by step."""

  def __init__(self, directory: os.PathLike, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
      item_handlers=dict(
        state=ocp.StandardCheckpointHandler(),
        data=ocp.JsonCheckpointHandler(),
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(
    self, abstract_state: Any | None = None, step: int | None = None
  ) -> tuple[Any, dict]:
    """Restores `step` (default: latest), written on any device count.

    Args:
      abstract_state: target structure, shapes, dtypes and (optionally)
        shardings; leaves without a sharding get `default_sharding()`. None:
        the saved structure, every array on `default_sharding()`.
      step: which step; None for the latest.

    Returns:
      (state, data-iterator state dict).

    Raises:
      CheckpointError: no checkpoint; a target that differs from the saved
        tree or shapes ("different model/config"); unreadable files
        ("incomplete or corrupted").
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint under {self.directory}.")
    where = f"{self.directory}/{step}"
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
    except Exception as e:  # orbax raises many types; all mean the same here
      raise _read_error(where, e) from e
    if saved is None:
      raise _read_error(where, FileNotFoundError("no state metadata"))
    if abstract_state is None:
      abstract_state = saved
    else:
      _check_fits(where, saved, abstract_state)
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_with_shardings(abstract_state)),
          data=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # see above
      raise _read_error(where, e) from e
    return restored["state"], restored["data"]

  def close(self) -> None:
    self._manager.close()


def restore_from_path(
  path: os.PathLike, abstract_state: Any | None = None
) -> tuple[Any, dict]:
  """Restores an explicit `resume_from` path: a step dir or a checkpoints dir.

  Args:
    path: `.../checkpoints` (latest step is taken) or `.../checkpoints/<n>`.
    abstract_state: see `TrainCheckpointer.restore`.

  Returns:
    (state, data-iterator state).
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"resume_from={path} does not exist.")
  if path.name.isdigit() and (path / "state").exists():
    checkpointer = TrainCheckpointer(path.parent)
    step = int(path.name)
  else:
    checkpointer = TrainCheckpointer(path)
    step = None
  try:
    return checkpointer.restore(abstract_state, step)
  finally:
    checkpointer.close()


def _sibling(path: pathlib.Path, suffix: str) -> pathlib.Path:
  return path.with_name(path.name + suffix)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _recover(path: pathlib.Path) -> None:
  """Puts back `<name>.old` if a swap was interrupted between its renames."""
  old = _sibling(path, ".old")
  if jax.process_index() == 0 and not path.exists() and old.exists():
    logging.warning("Recovering %s from an interrupted overwrite.", path)
    os.replace(old, path)
  _sync(f"recover:{path}")


def save_params(
  path: os.PathLike, params: Any, record: dict | None = None
) -> None:
  """Writes a param tree to `path`, replacing any previous one atomically.

  The new tree is written to `<path>.saving/`, then swapped in by renames;
  a kill at any moment leaves the previous export (or the new, complete
  one) loadable by `load_params`. Synchronous; every process must call it.

  Args:
    path: the export directory.
    params: a tree of arrays (any sharding).
    record: optional JSON-able dict stored inside the export
      (`record.json`), swapped in together with the params; see
      `load_record`.
  """
  path = pathlib.Path(path).absolute()
  saving, old = _sibling(path, ".saving"), _sibling(path, ".old")
  _recover(path)
  if jax.process_index() == 0:  # writes killed before (orbax's tmp too)
    for stale in path.parent.glob(glob.escape(saving.name) + "*"):
      shutil.rmtree(stale)
  _sync(f"clean:{path}")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(saving, params)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    if record is not None:
      (saving / RECORD_FILE).write_text(json.dumps(record, indent=1))
    if old.exists():
      shutil.rmtree(old)
    if path.exists():
      os.replace(path, old)
    os.replace(saving, path)
    if old.exists():
      shutil.rmtree(old)
  _sync(f"swap:{path}")
  logging.info("Saved params to %s.", path)


def load_record(path: os.PathLike) -> dict | None:
  """The `record` saved with the export at `path`, or None if it has none."""
  path = pathlib.Path(path).absolute()
  for candidate in (path, _sibling(path, ".old")):
    if candidate.exists():
      record = candidate / RECORD_FILE
      return json.loads(record.read_text()) if record.exists() else None
  return None


def load_params(path: os.PathLike, abstract_params: Any | None = None) -> Any:
  """Reads a param tree written by `save_params` on any device count.

  Args:
    path: the directory given to `save_params`.
    abstract_params: optional target structure (shapes, dtypes, shardings);
      leaves without a sharding, and every leaf when there is no target,
      come back on `default_sharding()` (one process: the default device).

  Raises:
    CheckpointError: no export at `path`; a target whose tree or shapes
      differ ("different model/config"); unreadable files.
  """
  path = pathlib.Path(path).absolute()
  if not path.exists() and _sibling(path, ".old").exists():
    path = _sibling(path, ".old")  # an overwrite stopped between renames
  if not path.exists():
    raise CheckpointError(f"No exported params at {path}.")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      saved = checkpointer.metadata(path).item_metadata
      saved = getattr(saved, "tree", saved)
      if saved is None:
        raise FileNotFoundError("no item metadata")
      if abstract_params is None:
        abstract_params = saved
      else:
        _check_fits(str(path), saved, abstract_params)
      return checkpointer.restore(path, _with_shardings(abstract_params))
  except CheckpointError:
    raise
  except Exception as e:  # see TrainCheckpointer.restore
    raise _read_error(str(path), e) from e
