"""A small regression task for testing the trainer core.

Params have a frozen `embed` part (like the frozen LLM) and a trainable
`head`. Runnable as a script so tests can kill and resume a real process:

  python -m tests.toy_task --workdir=DIR --steps=60 --step_delay=0.05
"""

import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from configs import common
from ilm_jax import sharding, train

IN_DIM, HIDDEN, NUM_EXAMPLES = 8, 16, 256


def config(
  steps: int = 30, batch_size: int = 16, frozen=("embed/.*",), mesh_shape=None
) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.mesh = common.mesh_config(**(mesh_shape or {}))
  cfg.toy = ml_collections.ConfigDict(
    dict(
      optim=common.optim_config(
        lr=1e-2, warmup_steps=3, weight_decay=1e-4, frozen=frozen
      ),
      train=common.train_config(
        steps=steps, batch_size=batch_size, log_every=5, checkpoint_every=5
      ),
    )
  )
  return cfg


def examples() -> list[dict]:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_EXAMPLES, IN_DIM)).astype(np.float32)
  y = np.sin(x @ rng.normal(size=(IN_DIM,))).astype(np.float32)
  return [dict(x=x[i], y=y[i]) for i in range(NUM_EXAMPLES)]


def init_params(rng):
  k1, k2 = jax.random.split(rng)
  return dict(
    embed=dict(w=jax.random.normal(k1, (IN_DIM, HIDDEN)) / IN_DIM**0.5),
    head=dict(w=jax.random.normal(k2, (HIDDEN, 1)) * 0.1, b=jnp.zeros((1,))),
  )


def loss_fn(params, batch, rng):
  hidden = jnp.tanh(batch["x"] @ params["embed"]["w"])
  # Dropout-like noise from the step rng, so resume must restore rng use.
  hidden *= jax.random.bernoulli(rng, 0.9, hidden.shape) / 0.9
  pred = (hidden @ params["head"]["w"] + params["head"]["b"])[:, 0]
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, dict(pred_mean=jnp.mean(pred))


def make_task(batch_size: int, step_delay: float = 0.0) -> train.Task:
  def slow(example):
    time.sleep(step_delay)
    return example

  # Each process takes its slice of every global batch (as the real
  # pipelines shard by process index), so any process count sees the same
  # global batches.
  per_process = batch_size // jax.process_count()
  start = jax.process_index() * per_process

  def own_slice(batch):
    return {k: v[start : start + per_process] for k, v in batch.items()}

  dataset = (
    grain.MapDataset.source(examples())
    .shuffle(seed=1)
    .repeat()
    .map(slow)
    .batch(batch_size, drop_remainder=True)
    .map(own_slice)
  )
  return train.Task(
    name="toy",
    init_params=init_params,
    loss_fn=loss_fn,
    train_iterator=iter(dataset.to_iter_dataset()),
  )


def run(cfg, workdir, devices=None, step_delay=0.0) -> train.TrainResult:
  mesh = sharding.make_mesh(cfg.mesh, devices)
  task = make_task(cfg.toy.train.batch_size, step_delay / 16)
  return train.train(
    task,
    cfg.toy,
    mesh=mesh,
    mesh_config=cfg.mesh,
    workdir=workdir,
    seed=cfg.seed,
  )


FLAGS = flags.FLAGS


def _define_flags():
  """The script's flags, defined only when it runs as a script: the tests
  import this module beside CLIs (ilm_jax.chat, ...) with flags of the
  same names."""
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.DEFINE_integer("steps", 60, "Training steps.")
  flags.DEFINE_float("step_delay", 0.0, "Seconds of data loading per batch.")
  flags.DEFINE_string("params_out", "", "Write final params here (npz).")


def main(argv):
  del argv
  result = run(
    config(steps=FLAGS.steps),
    FLAGS.workdir,
    jax.devices()[:1],
    FLAGS.step_delay,
  )
  if FLAGS.params_out:
    flat = {
      "/".join(str(k.key) for k in path): np.asarray(v)
      for path, v in jax.tree_util.tree_leaves_with_path(result.params)
    }
    np.savez(FLAGS.params_out, **flat)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
