"""Helpers shared by the experiment configs."""

import contextlib

import ml_collections

# Config sizes: `full` is the accelerator run, `cpu` finishes on a 2-core
# machine within an hour, `tiny` is for tests (seconds).
MODES = ("full", "cpu", "tiny")


def parse_mode(arg: str | None, modes=MODES) -> str:
  """Returns the size mode named by a config argument (`configs/x.py:cpu`),
  one of `modes` (a config file with more sizes passes its own)."""
  mode = arg or "full"
  if mode not in modes:
    raise ValueError(
      f"Unknown config argument {mode!r}; expected one of {tuple(modes)}."
    )
  return mode


@contextlib.contextmanager
def locked(config: ml_collections.ConfigDict):
  """Locks `config` for the block: fields can change, none can be added.

  Size overrides run inside it, so a misspelt field raises instead of
  adding a field that nothing reads.
  """
  config.lock()
  try:
    yield config
  finally:
    config.unlock()


def mesh_config(data: int = -1, fsdp: int = 1, model: int = 1):
  """A named device mesh; -1 takes the devices the other axes leave."""
  return ml_collections.ConfigDict(
    dict(
      # Axis sizes in mesh order. The batch is split over (data, fsdp);
      # parameters are split over fsdp (largest divisible dim) and model.
      shape=dict(data=data, fsdp=fsdp, model=model),
      # Logical axis name -> mesh axis (or None), for modules that annotate
      # their params with flax logical partitioning (the LLM).
      # Tuples, like every sequence in these configs, so that the
      # command line can override them.
      logical_axis_rules=(
        ("batch", ("data", "fsdp")),
        ("vocab", "model"),
        ("embed", "fsdp"),
        ("heads", "model"),
        ("kv_heads", None),
        ("mlp", "model"),
        ("head_dim", None),
      ),
    )
  )


def optim_config(
  lr: float,
  warmup_steps: int = 0,
  weight_decay: float = 0.0,
  frozen=(),
):
  """An optax AdamW with warmup + cosine decay and regex freezing.

  The schedule's length is the phase's `train.steps` (optim.py reads it
  there), so the optimizer section holds no step count of its own.
  """
  return ml_collections.ConfigDict(
    dict(
      learning_rate=lr,
      warmup_steps=warmup_steps,
      schedule="cosine",  # or "constant"
      weight_decay=weight_decay,
      b1=0.9,
      b2=0.999,
      grad_clip_norm=1.0,  # 0 disables clipping
      # Regexes over '/'-joined param paths: matching leaves are frozen
      # (no optimizer state, never updated; gradients still flow through).
      frozen=tuple(frozen),
      # (regex, multiplier) pairs over the same paths: the first match
      # scales that leaf's learning rate (and its decoupled weight decay).
      # A tuple, so the command line can set it:
      # --config.ilm.optim.lr_mults="(('qformer/.*', 0.1),)".
      lr_mults=(),
    )
  )


def train_config(
  steps: int,
  batch_size: int,
  log_every: int = 50,
  checkpoint_every: int = 500,
  eval_every: int = 0,
):
  """The trainer's loop settings (ilm_jax/train.py) for one phase."""
  return ml_collections.ConfigDict(
    dict(
      steps=steps,
      batch_size=batch_size,  # global, across all processes and devices
      log_every=log_every,
      checkpoint_every=checkpoint_every,
      keep_checkpoints=2,
      # A checkpoints dir or step dir to start from when the workdir has
      # none of its own (restore order step 2; see ilm_jax/train.py).
      resume_from="",
      eval_every=eval_every,  # 0: evaluate once at the end
      # Validation metric that selects the exported ("best") params;
      # empty: the last step is exported. Never a test metric.
      best_metric="",
    )
  )
