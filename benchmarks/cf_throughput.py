r"""Throughput of the CF phase's models: full-ranking evaluation and training.

  python -m benchmarks.cf_throughput --config=configs/ml1m.py:cpu

Measured on the configured dataset (ML-1M by default) with the phase's own
tasks and evaluators (ilm_jax/phases/cf.py), params at initialisation
(speed does not depend on their values):

  eval    users/s of the full-ranking evaluator over every user (valid
          split), unmasked and with history masking; one untimed pass first
          compiles.
  train   steps/s of the jitted train step (value_and_grad + AdamW, the
          batch fetched from the task's grain iterator inside the timing),
          as examples/s: users/s and (user, item) pairs/s for MF, user
          windows/s and target positions/s for SASRec.

Reports the load average too: other processes on a shared machine slow
every figure down.
"""

import os
import time

import jax
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from ilm_jax import data, sharding
from ilm_jax.phases import cf

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/ml1m.py:cpu", "Experiment config."
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps per model.")
_MODELS = flags.DEFINE_list("models", ["mf", "sasrec"], "Models to time.")


def _time_eval(evaluator, params) -> float:
  list(evaluator.run(params))  # compiles
  start = time.perf_counter()
  results = dict(evaluator.run(params))
  elapsed = time.perf_counter() - start
  users = results[evaluator.prefix + "users"]
  return users / elapsed


def _time_training(task, phase_config, mesh, steps: int) -> tuple[float, dict]:
  params = task.init_params(jax.random.key(0))
  tx = optax.adamw(phase_config.optim.learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, aux), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
      params, batch, rng
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  rng = jax.random.key(1)
  sums: dict[str, float] = {}
  for i in range(steps + 2):  # two untimed steps: compile, warm caches
    if i == 2:
      jax.block_until_ready(params)
      start = time.perf_counter()
    batch = sharding.put_global_batch(next(task.train_iterator), mesh)
    params, opt_state, aux = step(params, opt_state, batch, rng)
    if i >= 2:
      for key, value in aux.items():
        sums[key] = sums.get(key, 0.0) + float(value)
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - start
  return steps / elapsed, {k: v / elapsed for k, v in sums.items()}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.mesh)
  dataset = data.load_dataset(config.data)
  print(
    f"{dataset.name}: {dataset.num_users} users, {dataset.num_items} items; "
    f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
    f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
  )
  for name in _MODELS.value:
    if name == "mf":
      task = cf.mf_task(dataset, config.cf, mesh, config.seed)
      phase_config = config.cf
      units = {"pairs_per_batch": "pairs/s"}
    else:
      task = cf.sasrec_task(dataset, config.cf, mesh, config.seed)
      phase_config = config.cf.sasrec
      units = {"targets_per_batch": "target positions/s"}
    params = jax.device_put(
      task.init_params(jax.random.key(0)), sharding.replicated(mesh)
    )
    for evaluator in task.evaluators:
      if evaluator.split != "valid":
        continue
      rate = _time_eval(evaluator, params)
      masked = "masked" if evaluator.mask_history else "unmasked"
      print(
        f"{name} eval ({masked}, batch {evaluator.batch_size}): "
        f"{rate:,.0f} users/s"
      )
    steps_per_s, per_s = _time_training(task, phase_config, mesh, _STEPS.value)
    batch_size = phase_config.train.batch_size
    extra = ", ".join(f"{per_s[k]:,.0f} {u}" for k, u in units.items())
    print(
      f"{name} train (batch {batch_size}): {steps_per_s:.2f} steps/s, "
      f"{steps_per_s * batch_size:,.0f} examples/s, {extra}"
    )
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
