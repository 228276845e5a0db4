r"""One-accelerator check of the phase-2 train step: prompts/s and MFU.

  python -m benchmarks.gpu_check --config=configs/ml1m_llama3_1b.py \
    --batch_size=16 --steps=20

Runs in a few minutes on one GPU (or TPU chip) with no data and no weights:
the phase-2 params come from `compile_check.ilm_step_inputs` (random, the
config's frozen LLM architecture, bfloat16 as the config says), the batch is
random token ids of the config's prompt length with soft-token slots and
answer tokens in place, and the step is the trainer's own
(`train.make_train_step`, adapter gradients only, AdamW). After two untimed
steps (compile) it times `--steps` steps and prints

  prompts/s   batch size x steps / seconds
  MFU         analytic frozen-LLM FLOPs per step (compile_check.
              llm_step_flops, the Q-Former's few are left out) x steps/s
              over the device's peak bf16 FLOP/s (PEAK_TFLOPS by device
              kind; unknown kinds, e.g. CPU, print no MFU).

`--tiny` swaps in a 2-layer LLM, 32-token prompts and batch 4 so the script
runs on a CPU in seconds (its test).
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ilm_jax import compile_check, optim, train, tree_utils
from ilm_jax.models import llm, llm_loading

# Dense bf16 peak FLOP/s per device, from vendor datasheets (no sparsity).
PEAK_TFLOPS = {
  "NVIDIA H100 80GB HBM3": 989.0,
  "NVIDIA H200": 989.0,
  "NVIDIA A100-SXM4-80GB": 312.0,
  "NVIDIA A100-SXM4-40GB": 312.0,
  "NVIDIA L4": 121.0,
  "TPU v5 lite": 197.0,
  "TPU v5": 459.0,
  "TPU v4": 275.0,
}
TINY_LLM = llm.LlamaConfig(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
)


def random_batch(abstract: dict, vocab: int, items: int, tokens_per: int):
  """A phase-2 batch of the abstract shapes: every row a full prompt whose
  first entities' soft tokens follow a short prefix and whose last quarter
  is the answer."""
  rng = np.random.default_rng(0)
  b, length = abstract["input_ids"].shape
  entities = abstract["entity_index"].shape[1]
  batch = {k: np.zeros(v.shape, v.dtype) for k, v in abstract.items()}
  batch["input_ids"] = rng.integers(0, vocab, (b, length)).astype(np.int32)
  batch["targets"] = np.roll(batch["input_ids"], -1, axis=1)
  batch["attention_mask"][:] = True
  batch["loss_mask"][:, -length // 4 : -1] = True
  batch["soft_entity"][:] = -1
  soft = min(entities * tokens_per, length // 2)
  batch["soft_entity"][:, 4 : 4 + soft] = np.arange(soft) // tokens_per
  batch["soft_slot"][:, 4 : 4 + soft] = np.arange(soft) % tokens_per
  batch["entity_index"] = rng.integers(0, items, (b, entities)).astype(np.int32)
  batch["entity_mask"][:] = True
  return batch


def run(config, batch_size: int, steps: int, tiny: bool = False) -> dict:
  """Times the phase-2 step; returns prompts/s, step seconds and MFU."""
  config.ilm.train.batch_size = batch_size
  if tiny:
    config.ilm.data.max_len = 32
    config.ilm.model.max_target_tokens = 8
  architecture = llm_loading.architecture
  if tiny:
    llm_loading.architecture = lambda *a, **k: TINY_LLM
  try:
    init, loss_fn, abstract = compile_check.ilm_step_inputs(
      config, compile_check.ML1M_ITEMS, compile_check.ML1M_USERS
    )
    model_flops = compile_check.llm_step_flops(config)
  finally:
    llm_loading.architecture = architecture
  params = tree_utils.unbox(jax.jit(init)(jax.random.key(0)))
  tx, frozen, schedule = optim.make(config.ilm.optim, params, steps + 2)
  state, frozen_params = train.initial_state(params, tx, frozen)
  task = train.Task("gpu_check", init, loss_fn, train_iterator=None)
  jitted = jax.jit(
    train.make_train_step(task, tx, frozen, schedule), donate_argnums=0
  )

  def step(state, batch, rng):
    return jitted(state, frozen_params, batch, rng)

  vocab = jax.tree.leaves(params["llm"]["embedding"])[0].shape[0]
  batch = random_batch(
    abstract,
    vocab,
    compile_check.ML1M_ITEMS,
    config.ilm.model.tokens_per_entity,
  )
  batch = jax.device_put(batch)
  rng = jax.random.key(1)
  for _ in range(2):  # compile, then one more untimed
    state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  device = jax.devices()[0].device_kind
  peak = PEAK_TFLOPS.get(device)
  result = dict(
    device=device,
    step_s=seconds,
    prompts_per_s=batch_size / seconds,
    model_tflops_per_step=model_flops / 1e12,
    loss=float(metrics["loss"]),
    mfu=None if peak is None else model_flops / seconds / (peak * 1e12),
  )
  print(
    f"{device}: {result['prompts_per_s']:.1f} prompts/s, "
    f"{seconds * 1e3:.1f} ms/step, "
    f"{result['model_tflops_per_step']:.3f} TFLOP/step, MFU "
    + ("n/a (unknown peak)" if peak is None else f"{result['mfu']:.1%}")
  )
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  run(f.config, f.batch_size, f.steps, f.tiny)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", lock_config=False)
  flags.DEFINE_integer("batch_size", 16, "prompts per step")
  flags.DEFINE_integer("steps", 20, "timed steps")
  flags.DEFINE_bool("tiny", False, "2-layer LLM, CPU-sized")
  app.run(main)
