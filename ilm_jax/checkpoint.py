"""Orbax checkpoints: train state plus data-iterator state, and param exports.

A training checkpoint at `WORKDIR/<phase>/checkpoints/<step>/` holds two
items saved together: `state` (params, optimizer state, step) and `data`
(the grain iterator state as JSON), so a resumed run sees exactly the batches
an uninterrupted run would. Param-only exports (the best params of a phase,
the trained adapter) use a plain `StandardCheckpointer` directory.
"""

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupted or does not fit the current model."""


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing a tree of jax Arrays."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None)
    ),
    tree,
  )


def _restore_error(where: str, error: Exception) -> CheckpointError:
  return CheckpointError(
    f"Cannot restore the checkpoint at {where}: it is corrupted or was "
    f"written for a different model/config ({type(error).__name__}: "
    f"{error}). Point the run at a fresh --workdir, or fix the config to "
    "match the checkpoint."
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
    self, abstract_state: Any, step: int | None = None
  ) -> tuple[Any, dict]:
    """Restores `step` (default: latest) into the given abstract state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint under {self.directory}.")
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # orbax raises many types; all mean the same here
      raise _restore_error(f"{self.directory}/{step}", e) from e
    return restored["state"], restored["data"]

  def close(self) -> None:
    self._manager.close()


def restore_from_path(
  path: os.PathLike, abstract_state: Any
) -> tuple[Any, dict]:
  """Restores an explicit `resume_from` path: a step dir or a checkpoints dir.

  Args:
    path: `.../checkpoints` (latest step is taken) or `.../checkpoints/<n>`.
    abstract_state: the expected structure, shapes, dtypes and shardings.

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


def save_params(path: os.PathLike, params: Any) -> None:
  """Writes a param tree to `path` (overwritten if present), synchronously."""
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params, force=True)
  logging.info("Saved params to %s.", path)


def load_params(path: os.PathLike, abstract_params: Any | None = None) -> Any:
  """Reads a param tree written by `save_params`.

  Args:
    path: the directory given to `save_params`.
    abstract_params: optional target structure (shapes, dtypes, shardings);
      without it the arrays come back as saved, on the default device.
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"No exported params at {path}.")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path, abstract_params)
  except Exception as e:  # see TrainCheckpointer.restore
    raise _restore_error(str(path), e) from e
