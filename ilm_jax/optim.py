"""Optax optimizers from config, with freezing declared as regex rules.

`config.<phase>.optim.frozen` lists regexes over '/'-joined parameter paths
(e.g. `llm/.*`). Freezing has one mechanism: a `Partition` splits the params
into a trainable and a frozen half once, and only the trainable half is
differentiated, updated by the optimizer (so frozen leaves hold no Adam
moments) and saved in training checkpoints. The frozen half is an input of
every step, never an output, so it stays bitwise equal to what was loaded.

`config.<phase>.optim.lr_mults` scales the learning rate of parameter groups,
as (regex, multiplier) pairs in the manner of big_vision's optax config: the
first pattern that fully matches a leaf's path sets its multiplier, other
leaves keep 1. The multiplier scales AdamW's whole update, so a group's
decoupled weight decay scales with its learning rate, as with a PyTorch
parameter group's `lr`. A pattern that matches no trainable leaf is an error
(a typo would otherwise train at the full rate unnoticed), except a pattern
written for an optional group (`<group>/...`) that this model does not have:
phase 2 declares its adapter parts optional, so `(('qformer/.*', 0.1),)` in
the config leaves the MLP and text-only baselines at the base rate.
"""

import dataclasses
import re
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

from ilm_jax import tree_utils


def learning_rate_schedule(
  optim_config: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
  """Linear warmup, then constant or cosine decay to zero at `total_steps`."""
  peak = optim_config.learning_rate
  warmup = optim_config.warmup_steps
  if optim_config.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif optim_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  else:
    raise ValueError(
      f"optim.schedule={optim_config.schedule!r}: expected 'constant' or "
      "'cosine'."
    )
  if warmup <= 0:
    return decay
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup), decay], [warmup]
  )


def _matrices_only(params: Any) -> Any:
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def parse_lr_mults(
  lr_mults: tuple[tuple[str, float], ...],
) -> list[tuple[re.Pattern, float]]:
  """Compiles `optim.lr_mults` (regex, multiplier) pairs.

  Raises:
    ValueError: an entry is not a (regex, number >= 0) pair, or its regex
      does not compile; the message shows the command-line form.
  """
  if isinstance(lr_mults, str) or not isinstance(lr_mults, tuple | list):
    raise ValueError(
      f"optim.lr_mults={lr_mults!r}: expected a tuple of (regex, multiplier"
      " >= 0) pairs, e.g. --config.ilm.optim.lr_mults=\"(('qformer/.*', 0.1),)\"."
    )
  compiled = []
  for entry in lr_mults:
    if (
      not isinstance(entry, tuple | list)
      or len(entry) != 2
      or not isinstance(entry[0], str)
      or isinstance(entry[1], bool)
      or not isinstance(entry[1], int | float)
      or not entry[1] >= 0
    ):
      raise ValueError(
        f"optim.lr_mults entry {entry!r}: expected a (regex, multiplier >= 0)"
        " pair."
      )
    try:
      compiled.append((re.compile(entry[0]), float(entry[1])))
    except re.error as error:
      raise ValueError(
        f"optim.lr_mults regex {entry[0]!r} does not compile: {error}."
      ) from error
  return compiled


def lr_multipliers(
  paths: list[str],
  lr_mults: tuple[tuple[str, float], ...],
  optional_groups: tuple[str, ...] = (),
) -> dict[str, float]:
  """The learning-rate multiplier of each trainable path.

  Args:
    paths: '/'-joined parameter paths of the trainable leaves.
    lr_mults: (regex, multiplier) pairs; the first fully matching regex wins.
    optional_groups: top-level parameter groups that some models of the
      phase lack; a regex written as '<group>/...' for one of them that no
      trainable path has is skipped (logged) instead of raising.

  Returns:
    {path: multiplier}, 1.0 where no regex matches.

  Raises:
    ValueError: as `parse_lr_mults`, or a regex matches no trainable leaf (a
      typo would otherwise train at the full rate unnoticed).
  """
  compiled = parse_lr_mults(lr_mults)
  multipliers = {}
  used = set()
  for path in paths:
    multipliers[path] = 1.0
    for index, (pattern, multiplier) in enumerate(compiled):
      if pattern.fullmatch(path):
        multipliers[path] = multiplier
        used.add(index)
        break
  present = {path.split("/")[0] for path in paths}
  for index, (pattern, _) in enumerate(compiled):
    if index in used:
      continue
    group = pattern.pattern.split("/")[0]
    if group in optional_groups and group not in present:
      logging.info(
        "optim.lr_mults regex %r skipped: this model has no %r parameters.",
        pattern.pattern,
        group,
      )
    else:
      raise ValueError(
        f"optim.lr_mults regex {pattern.pattern!r} matches no trainable "
        "parameter (trainable paths start with: "
        f"{', '.join(sorted(present))})."
      )
  return multipliers


def _scale_by_path(multipliers: dict[str, float]):
  """Multiplies each leaf of a flat {path: update} dict by its multiplier."""

  def update(updates, state, params=None):
    del params
    return {
      path: u if multipliers[path] == 1.0 else u * multipliers[path]
      for path, u in updates.items()
    }, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def frozen_mask(params: Any, optim_config: ml_collections.ConfigDict) -> Any:
  """True for every leaf that a `frozen` regex of the config matches."""
  return tree_utils.regex_mask(params, optim_config.frozen)


@dataclasses.dataclass(frozen=True)
class Partition:
  """Splits trees shaped like the params into trainable and frozen halves.

  Each half is a flat dict {'/'-joined path: leaf} (what the optimizer
  state, the checkpoints and the step's arguments hold); `join` puts the
  halves back into the params tree.

  Attributes:
    treedef: the params tree structure.
    paths: the '/'-joined path of each leaf, in leaf order.
    frozen: per leaf, True if frozen.
  """

  treedef: Any
  paths: tuple[str, ...]
  frozen: tuple[bool, ...]

  @classmethod
  def from_mask(cls, mask: Any) -> "Partition":
    """From a frozen mask (a bool per leaf, as `frozen_mask` returns)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(mask)
    return cls(
      treedef,
      tuple(tree_utils.path_str(path) for path, _ in flat),
      tuple(bool(leaf) for _, leaf in flat),
    )

  def split(self, tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen) flat dicts of a tree shaped like the params."""
    halves = ({}, {})
    for path, is_frozen, leaf in zip(
      self.paths, self.frozen, self.treedef.flatten_up_to(tree), strict=True
    ):
      halves[is_frozen][path] = leaf
    return halves

  def join(self, trainable: dict[str, Any], frozen: dict[str, Any]) -> Any:
    """The params tree from its two halves."""
    return self.treedef.unflatten(
      [
        (frozen if is_frozen else trainable)[path]
        for path, is_frozen in zip(self.paths, self.frozen, strict=True)
      ]
    )


def make(
  optim_config: ml_collections.ConfigDict,
  params: Any,
  total_steps: int,
  optional_groups: tuple[str, ...] = (),
) -> tuple[optax.GradientTransformation, Any, optax.Schedule]:
  """Builds the optimizer for the trainable half of `params`.

  Args:
    optim_config: a phase's `optim` section.
    params: the (unboxed) parameter tree or its abstract shapes.
    total_steps: schedule length.
    optional_groups: see `lr_multipliers`.

  Returns:
    (optimizer, frozen mask tree, learning-rate schedule). The optimizer
    acts on `Partition.from_mask(mask).split(params)[0]`, the trainable
    half; it never sees a frozen leaf.
  """
  schedule = learning_rate_schedule(optim_config, total_steps)
  mask = frozen_mask(params, optim_config)
  # Weight decay applies to matrices only, not to biases, norms or scalars.
  chain = []
  if optim_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  chain.append(
    optax.adamw(
      schedule,
      b1=optim_config.b1,
      b2=optim_config.b2,
      weight_decay=optim_config.weight_decay,
      mask=_matrices_only,
    )
  )
  lr_mults = tuple(optim_config.get("lr_mults", ()))
  if lr_mults:
    partition = Partition.from_mask(mask)
    paths = [
      path
      for path, is_frozen in zip(partition.paths, partition.frozen, strict=True)
      if not is_frozen
    ]
    chain.append(
      _scale_by_path(lr_multipliers(paths, lr_mults, optional_groups))
    )
  return optax.chain(*chain), mask, schedule
