r"""Throughput of the frozen LLM: ours (JAX) beside transformers' PyTorch Llama.

  python benchmarks/llm_throughput.py --batch=8 --seq=128 --new_tokens=32

Both sides run SmolLM2-135M-Instruct with the same dequantized GGUF weights
(ours through `llm_loading`, the reference through transformers' GGUF
reader) on the same token batches, and their repetitions are interleaved so
both see the same machine load. Measured:

  fwd_bwd   forward plus backward into the input embeddings only (params
            frozen, no weight gradients), mean next-token cross-entropy over
            all positions: what an adapter step costs in the LLM.
  forward   the same forward pass alone.
  decode    greedy generation with the KV cache: prefill of the batch, then
            new_tokens steps (no early stop), tokens/s = batch*new/time.

FLOPs are counted analytically (matmuls and attention, full T x T scores as
both implementations compute them; XLA's cost analysis counts a scanned
layer once, so it cannot serve). The matmul ceiling is measured in the same
run (numpy and jax 4096^3 float32); the allocator (see `allocator`) and the
load average are printed: other processes' load changes every figure.
"""

import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from ilm_jax import decoding, resources
from ilm_jax.models import llm, llm_loading

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Rows per batch.")
flags.DEFINE_integer("seq", 128, "Tokens per row (the prompt for decode).")
flags.DEFINE_integer("new_tokens", 32, "Generated tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (after one warm-up).")
flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16"],
  "Compute and param dtype of both sides.",
)
flags.DEFINE_bool("reference", True, "Also time transformers' PyTorch Llama.")
flags.DEFINE_integer(
  "torch_threads",
  0,
  "torch intra-op threads (0: torch's default). With other processes on "
  "the cores, torch's pool stalls much more than XLA's; 1 is fairer then.",
)
flags.DEFINE_enum(
  "weights",
  "smollm2",
  ["smollm2", "random"],
  "smollm2: the embedded GGUF on both sides. random: random weights of the "
  "same shape on each side (for machines without the GGUF; throughput "
  "does not depend on the values).",
)


def matmul_flops(config, tokens, seq):
  """Forward FLOPs: projections, MLP, lm_head, and T x T attention."""
  c = config
  per_layer = (
    2
    * c.hidden_size
    * (2 * c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim)
  )
  per_layer += 2 * 3 * c.hidden_size * c.intermediate_size
  dense = tokens * (c.num_layers * per_layer + 2 * c.hidden_size * c.vocab_size)
  attention = tokens * c.num_layers * 2 * 2 * seq * c.num_heads * c.head_dim
  return dense, attention


def allocator() -> str:
  """The malloc in use: glibc's, unless one is preloaded.

  It matters on CPU: glibc serves every buffer above 32 MiB (logits over
  the vocabulary, the stacked per-layer residuals) with a fresh mmap, so
  each step pays page faults on them; tcmalloc and jemalloc reuse memory.
  """
  return os.environ.get("LD_PRELOAD") or "glibc malloc"


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def ceiling_gflops():
  a = np.random.default_rng(0).random((4096, 4096), np.float32)
  numpy_time = min(timed(lambda: a @ a) for _ in range(3))
  x = jnp.asarray(a)
  dot = jax.jit(jnp.dot)
  jax_time = min(timed(lambda: dot(x, x).block_until_ready()) for _ in range(3))
  flops = 2 * 4096**3
  return flops / numpy_time / 1e9, flops / jax_time / 1e9


def fresh_buffer_gbps(rows, cols):
  """GB/s of `x + 1` into a new [rows, cols] float32 buffer (read + write).

  With the vocabulary as `cols` this is the size of the logits: the figure
  shows what page faults on fresh large buffers cost under `allocator()`.
  """
  x = jnp.zeros((rows, cols), jnp.float32)
  add = jax.jit(lambda a: a + 1)
  add(x).block_until_ready()
  seconds = min(timed(lambda: add(x).block_until_ready()) for _ in range(5))
  return 2 * x.nbytes / seconds / 1e9


def jax_side(config, params, ids, new_tokens):
  model = llm.Llama(config)
  targets = jnp.roll(ids, -1, axis=1)

  def loss(embeds, params):
    logits, _ = model.apply({"params": params}, input_embeds=embeds)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  embed = jax.jit(
    lambda p, i: model.apply({"params": p}, i, method=llm.Llama.embed)
  )
  embeds = embed(params, ids).astype(jnp.float32)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  forward = jax.jit(lambda e, p: model.apply({"params": p}, input_embeds=e)[0])
  return dict(
    fwd_bwd=lambda: jax.block_until_ready(fwd_bwd(embeds, params)),
    forward=lambda: forward(embeds, params).block_until_ready(),
    decode=lambda: decoding.greedy(
      model,
      params,
      prompt_ids=ids,
      max_new_tokens=new_tokens,
      eos_id=-1,
      pad_id=0,
    ).block_until_ready(),
  )


def torch_model(config, dtype):
  """transformers' Llama on the same weights (or random ones)."""
  if FLAGS.weights == "smollm2":
    (path,) = resources.fetch(resources.SMOLLM2_135M_INSTRUCT).values()
    model = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32
    )
  else:
    model = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        tie_word_embeddings=True,
      )
    )
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model.to(device, getattr(torch, dtype)).eval()
  return model.requires_grad_(False), device


def torch_side(config, ids, new_tokens, dtype):
  model, device = torch_model(config, dtype)
  ids = torch.from_numpy(np.asarray(ids)).long().to(device)
  targets = torch.roll(ids, -1, dims=1)
  embeds = model.get_input_embeddings()(ids).detach()

  def fwd_bwd():
    e = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=e, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
      logits.flatten(0, 1), targets.flatten()
    )
    loss.backward()

  def forward():
    with torch.no_grad():
      model(inputs_embeds=embeds, use_cache=False)

  def decode():
    with torch.no_grad():
      model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
      )

  def synced(fn):
    def run():
      fn()
      if device == "cuda":
        torch.cuda.synchronize()

    return run

  return dict(
    fwd_bwd=synced(fwd_bwd), forward=synced(forward), decode=synced(decode)
  )


def jax_model():
  """Our config and params: the embedded checkpoint or random weights."""
  dtype = jnp.dtype(FLAGS.dtype)
  if FLAGS.weights == "smollm2":
    config, params, _ = llm_loading.load_pretrained(
      "smollm2-135m-instruct", dtype=dtype, param_dtype=dtype
    )
    return config, params
  config = llm.SMOLLM2_135M.replace(dtype=dtype, param_dtype=dtype)
  shapes = jax.eval_shape(
    llm.Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )
  rng = np.random.default_rng(0)
  return config, jax.tree.map(
    lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype),
    nn.meta.unbox(shapes["params"]),
  )


def main(argv):
  del argv
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  config, params = jax_model()
  b, t, n = FLAGS.batch, FLAGS.seq, FLAGS.new_tokens
  ids = np.random.default_rng(0).integers(100, config.vocab_size, (b, t))
  ids = ids.astype(np.int32)
  print(f"devices: {jax.devices()}; torch threads: {torch.get_num_threads()}")
  print(f"load average before: {os.getloadavg()}; allocator: {allocator()}")
  numpy_ceiling, jax_ceiling = ceiling_gflops()
  print(
    f"matmul 4096^3 f32: numpy {numpy_ceiling:.0f} GFLOP/s, "
    f"jax {jax_ceiling:.0f} GFLOP/s"
  )
  print(
    f"x + 1 into a fresh [{b * t}, {config.vocab_size}] f32 buffer: "
    f"{fresh_buffer_gbps(b * t, config.vocab_size):.1f} GB/s"
  )
  ours = jax_side(config, params, ids, n)
  sides = {"jax": ours}
  if FLAGS.reference:
    sides["torch"] = torch_side(config, ids, n, FLAGS.dtype)
  dense, attention = matmul_flops(config, b * t, t)
  flops = dict(
    forward=dense + attention,
    # Input gradients only: one matmul per forward matmul, two
    # per attention matmul (scores and values both need them).
    fwd_bwd=2 * dense + 3 * attention,
  )
  print(
    f"FLOPs per step: forward {flops['forward'] / 1e9:.1f} G, "
    f"fwd_bwd {flops['fwd_bwd'] / 1e9:.1f} G"
  )
  print(
    f"shapes: batch {b} x {t} tokens, decode {n} new tokens; "
    f"our dtype {FLAGS.dtype}"
  )
  for task in ("fwd_bwd", "forward", "decode"):
    results = {name: [] for name in sides}
    for side in sides.values():
      side[task]()  # warm-up / compile, outside the interleaved timing
    for _ in range(FLAGS.repeats):
      for name, side in sides.items():
        results[name].append(timed(side[task]))
    for name, times in results.items():
      median = statistics.median(times)
      if task == "decode":
        rate = f"{b * n / median:8.1f} new tokens/s"
      else:
        rate = (
          f"{b * t / median:8.1f} tokens/s "
          f"{flops[task] / median / 1e9:6.1f} GFLOP/s"
        )
      print(
        f"{task:8s} {name:5s} median {median:7.3f} s "
        f"(min {min(times):.3f}, n={len(times)})  {rate}"
      )

  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
