"""Optax optimizers from config, with freezing declared as regex rules.

`config.<phase>.optim.frozen` lists regexes over '/'-joined parameter paths
(e.g. `llm/.*`). Matching leaves are routed to `optax.set_to_zero()` inside
an `optax.multi_transform`, so they hold no optimizer state (no Adam
moments) and receive zero updates; the trainer additionally never computes
their gradients and passes them through untouched, so they stay bitwise
equal to what was loaded.
"""

from typing import Any

import jax
import ml_collections
import optax

from ilm_jax import tree_utils

TRAINABLE, FROZEN = "trainable", "frozen"


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
  # A callable mask: inside multi_transform the frozen leaves are already
  # pruned, so the mask must be computed on the tree optax hands us.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def frozen_mask(params: Any, optim_config: ml_collections.ConfigDict) -> Any:
  """True for every leaf that a `frozen` regex of the config matches."""
  return tree_utils.regex_mask(params, optim_config.frozen)


def make(
  optim_config: ml_collections.ConfigDict, params: Any, total_steps: int
) -> tuple[optax.GradientTransformation, Any, optax.Schedule]:
  """Builds the optimizer for `params`.

  Args:
    optim_config: a phase's `optim` section.
    params: the (unboxed) parameter tree or its abstract shapes.
    total_steps: schedule length.

  Returns:
    (optimizer, frozen mask tree, learning-rate schedule).
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
  labels = jax.tree.map(lambda frozen: FROZEN if frozen else TRAINABLE, mask)
  tx = optax.multi_transform(
    {TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()}, labels
  )
  return tx, mask, schedule
