r"""Phase-2 throughput: the ILM training step and generative evaluation.

  python -m benchmarks.ilm_throughput --config=configs/ml1m.py:cpu \
    --workdir=/tmp/ilm_ml1m

Needs a workdir where the cf phase (and, for the Q-Former adapter, the
qformer phase) already ran: the benchmark builds the real phase-2 task
(ilm_jax/phases/ilm.py: frozen SmolLM2, CF tables, Q-Former, prompts) and
times:

  train   the trainer's own jitted step (train.make_train_step: grads for
          the adapter only, AdamW, the config's freeze rules) on batches
          from the phase's grain pipeline, after two untimed steps; as
          steps/s, examples/s, tokens/s (padded, and the real share) and
          achieved GFLOP/s from an analytic count of the step's matmuls
          (XLA's own cost analysis counts the scanned LLM layer body once,
          so it undercounts 30-layer SmolLM2 several-fold).
  eval    users/s of the generative ranking evaluator (trie-constrained
          beam search over all titles, seen and unseen templates) on
          `--eval_users` users, after one untimed pass that compiles.

Params are the run's initialisation (speed does not depend on values).
Reports the load average: other processes slow every figure down.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import llm_throughput
from ilm_jax import optim, sharding, train, tree_utils
from ilm_jax.phases import ilm as ilm_phase

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/ml1m.py:cpu", "Experiment config."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "A workdir with the cf (and qformer) phase outputs."
)
_STEPS = flags.DEFINE_integer("steps", 6, "Timed training steps.")
_EVAL_USERS = flags.DEFINE_integer(
  "eval_users", 16, "Users evaluated (0: skip the evaluation timing)."
)


def step_flops(model, batch_size, max_len, entities) -> dict[str, float]:
  """Analytic matmul FLOPs of one phase-2 training step, by part.

  LLM: forward over every position (the vocabulary head only over the
  `max_target_tokens` scored ones), then the backward pass into its inputs
  only (its weights are frozen: one more forward's worth of matmuls).
  Q-Former (queries only, every entity slot of the batch) and projector:
  forward and backward with weight gradients (3x forward).
  """
  c = model.llm.config
  tokens = batch_size * max_len
  dense, attention = llm_throughput.matmul_flops(c, tokens, max_len)
  head = 2 * c.hidden_size * c.vocab_size
  llm_forward = (
    dense
    - tokens * head
    + batch_size * model.max_target_tokens * head
    + attention
  )
  flops = dict(llm=2.0 * llm_forward, adapter=0.0)
  if model.qformer is not None:
    q = model.qformer.config
    nq, h, cf_tokens = q.num_queries, q.hidden_size, q.num_cf_tokens
    per_layer = nq * (
      2 * 4 * h * h + 2 * 2 * nq * h + 2 * 2 * h * q.intermediate_size
    )
    cross_layers = -(-q.num_layers // q.cross_attention_freq)
    per_cross = nq * (2 * 2 * h * h + 2 * 2 * cf_tokens * h)
    per_cross += 2 * 2 * cf_tokens * h * h  # keys and values of CF tokens
    per_entity = q.num_layers * per_layer + cross_layers * per_cross
    per_entity += nq * 2 * h * c.hidden_size  # the linear projector
    flops["adapter"] = 3.0 * batch_size * entities * per_entity
  return flops


def time_training(task, phase_config, mesh, steps: int) -> dict:
  """Steps/s of the trainer's own step on the phase's batches."""
  params = tree_utils.unbox(task.init_params(jax.random.key(0)))
  tx, frozen_mask, schedule = optim.make(phase_config.optim, params, steps)
  state = dict(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  # Not donated (unlike the trainer): the frozen LLM arrays are shared with
  # the params the evaluation timing builds afterwards.
  step_fn = jax.jit(train.make_train_step(task, tx, frozen_mask, schedule))
  batch = sharding.put_global_batch(next(task.train_iterator), mesh)
  rng = jax.random.key(1)
  compiled = step_fn.lower(state, batch, rng).compile()
  real_tokens = []
  for i in range(steps + 2):  # two untimed steps: warm caches
    if i == 2:
      jax.block_until_ready(state)
      start = time.perf_counter()
    real_tokens.append(float(np.mean(batch["attention_mask"])))
    state, _ = compiled(state, batch, rng)
    batch = sharding.put_global_batch(next(task.train_iterator), mesh)
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - start
  return dict(
    steps_per_s=steps / elapsed,
    entity_slots=int(batch["entity_kind"].shape[1]),
    real_token_share=float(np.mean(real_tokens)),
  )


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.mesh)
  phase2 = ilm_phase.make_task(config, _WORKDIR.value)
  ilm_config = config.ilm
  print(
    f"ILM adapter={ilm_config.model.adapter}, LLM "
    f"{ilm_config.llm.checkpoint} ({ilm_config.llm.dtype}); "
    f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
    f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
    f"allocator: {llm_throughput.allocator()}"
  )
  batch_size, max_len = ilm_config.train.batch_size, ilm_config.data.max_len
  figures = time_training(phase2.task, ilm_config, mesh, _STEPS.value)
  rate = figures["steps_per_s"]
  flops = step_flops(phase2.model, batch_size, max_len, figures["entity_slots"])
  total = sum(flops.values())
  print(
    f"train (batch {batch_size} x {max_len} tokens): {rate:.3f} steps/s, "
    f"{rate * batch_size:.2f} examples/s, "
    f"{rate * batch_size * max_len:,.0f} tokens/s "
    f"({figures['real_token_share']:.0%} real); "
    f"{total / 1e9:,.0f} GFLOP/step (LLM {flops['llm'] / 1e9:,.0f}, "
    f"adapter {flops['adapter'] / 1e9:,.1f}; analytic) = "
    f"{total * rate / 1e9:.1f} GFLOP/s"
  )
  if not _EVAL_USERS.value:
    return

  ranking = next(
    e
    for e in phase2.task.evaluators
    if e.config["type"] == "generative_ranking"
  )
  ranking.users = ranking.users[: _EVAL_USERS.value]
  params = tree_utils.unbox(phase2.task.init_params(jax.random.key(0)))
  list(ranking.run(params))  # compiles
  start = time.perf_counter()
  results = dict(ranking.run(params))
  elapsed = time.perf_counter() - start
  prompts = 2 * len(ranking.config["tasks"]) * len(ranking.users)
  print(
    f"eval (generative ranking, {ranking.num_beams} beams, batch "
    f"{ranking.batch_size}, tasks {list(ranking.config['tasks'])}, seen + "
    f"unseen): {prompts} prompts of {int(results['users'])} users in "
    f"{elapsed:.1f} s = {prompts / elapsed:.2f} prompts/s, "
    f"{len(ranking.users) / elapsed:.2f} users/s"
  )
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
