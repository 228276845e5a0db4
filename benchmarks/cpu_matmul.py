"""GFLOP/s of the frozen LLM's matmuls on CPU: jnp f32, jnp bf16, oneDNN bf16.

  python -m benchmarks.cpu_matmul                  # shapes, then the stack
  python -m benchmarks.cpu_matmul --stack=false --tokens=1280

Shapes are SmolLM2-135M's dense layers (hidden 576, MLP 1536, q 576,
k/v 192, tied vocabulary head 49152) at M = batch x sequence tokens, each
forward shape and its backward into the inputs (dx = dy @ W^T). Variants:

  f32     jnp.dot, float32 operands (what llm.py runs today)
  bf16    jnp.dot, bfloat16 operands, float32 result (XLA's own kernels);
          the backward reads the weight transposed
  bf16_wt the same with the weight's transpose stored (a second, row-major
          copy for dx = dy @ W^T; for the tied head, E^T for the forward)
  onednn  ilm_jax.ops.onednn_matmul: the oneDNN custom call, bfloat16
          operands, float32 result (AMX or AVX512-BF16 kernels)

All variants of a shape run interleaved in this one process (repetition r
of every variant before repetition r + 1), so other processes' load hits
them alike; the table gives medians and the load average around each
shape. With --stack, the same variants run a standalone 30-layer SmolLM2-shaped
decoder stack (no vocabulary head), forward and forward + backward into the
input embeddings, weights frozen (cast to bf16 once, outside the step, for
the bf16 variants). The last line is a JSON object of every median.
"""

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ilm_jax.models import llm
from ilm_jax.ops import onednn_matmul as om

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["512", "1280"], "M values (batch x sequence).")
flags.DEFINE_integer("repeats", 5, "Interleaved timed repetitions.")
flags.DEFINE_float("min_time", 0.05, "Seconds per timed repetition (loops).")
flags.DEFINE_bool("stack", True, "Also time the 30-layer stack.")
flags.DEFINE_bool("shapes", True, "Time the single matmul shapes.")
flags.DEFINE_integer("stack_batch", 8, "Stack: rows.")
flags.DEFINE_integer("stack_seq", 160, "Stack: tokens per row.")
flags.DEFINE_integer("stack_repeats", 3, "Stack: interleaved repetitions.")

_SMOLLM2 = llm.SMOLLM2_135M
HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = (
  _SMOLLM2.hidden_size,
  _SMOLLM2.intermediate_size,
  _SMOLLM2.num_heads,
  _SMOLLM2.num_kv_heads,
  _SMOLLM2.head_dim,
  _SMOLLM2.num_layers,
  _SMOLLM2.vocab_size,
)
# name -> (K, N, weight stored transposed): forward shapes; ".bwd" adds dx.
SHAPES = {
  "q/o": (HIDDEN, HIDDEN, False),
  "k/v": (HIDDEN, KV_HEADS * HEAD_DIM, False),
  "gate/up": (HIDDEN, MLP, False),
  "down": (MLP, HIDDEN, False),
  "head (tied, W^T)": (HIDDEN, VOCAB, True),
}


def cpu_summary() -> str:
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and not model:
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  flags = om.cpu_flags()
  isa = [
    f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f") if f in flags
  ]
  return f"{model}; {os.cpu_count()} cores; {' '.join(isa) or 'no avx512'}"


def load() -> str:
  return f"{os.getloadavg()[0]:.1f}"


def time_interleaved(fns: dict, repeats: int, min_time: float) -> dict:
  """Median seconds per call of each fn, repetitions interleaved."""
  loops = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn())  # compile
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < min_time:
      jax.block_until_ready(fn())
      n += 1
    loops[name] = max(n, 1)
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(loops[name]):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / loops[name])
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_variants(m, k, n, transpose_w, backward):
  rng = np.random.default_rng(0)
  w = jnp.asarray(
    rng.normal(size=(n, k) if transpose_w else (k, n)) * 0.02, jnp.float32
  )
  if backward:  # dx[M, K] = dy[M, N] @ W^T: the weight read the other way
    x = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    transpose_w = not transpose_w
  else:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  # The stored transpose: row-major in the order this product reads it.
  wt = jnp.asarray(np.asarray(wb).T.copy()) if transpose_w else wb

  def make(use_ffi, a, b, transpose):
    f = jax.jit(
      lambda a, b: om.matmul_2d(a, b, transpose_w=transpose, use_ffi=use_ffi)
    )
    return lambda: f(a, b)

  fns = {
    "f32": make(False, x, w, transpose_w),
    "bf16": make(False, xb, wb, transpose_w),
    "bf16_wt": make(False, xb, wt, False),
  }
  if om.available()[0]:
    fns["onednn"] = make(True, xb, wb, transpose_w)
  return fns


VARIANTS = ("f32", "bf16", "bf16_wt", "onednn")


def shapes_table(results):
  tokens = [int(t) for t in FLAGS.tokens]
  print(
    "| M | shape (K x N) | f32 | bf16 | bf16, W^T stored | oneDNN bf16 "
    "| oneDNN / f32 | oneDNN / best jnp | load |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for m in tokens:
    for name, (k, n, t) in SHAPES.items():
      for backward in (False, True):
        kk, nn = (n, k) if backward else (k, n)
        label = f"{name}{' dx' if backward else ''} ({kk} x {nn})"
        before = load()
        med = time_interleaved(
          matmul_variants(m, k, n, t, backward), FLAGS.repeats, FLAGS.min_time
        )
        flops = 2 * m * k * n
        g = {v: flops / s / 1e9 for v, s in med.items()}
        results[f"M{m} {label}"] = g
        one = g.get("onednn", float("nan"))
        best = max(g["f32"], g["bf16"], g["bf16_wt"])
        cells = " | ".join(f"{g.get(v, float('nan')):.0f}" for v in VARIANTS)
        print(
          f"| {m} | {label} | {cells} | {one / g['f32']:.2f} "
          f"| {one / best:.2f} | {before}-{load()} |",
          flush=True,
        )


def stack_params(dtype, transposes=False):
  rng = np.random.default_rng(0)
  shapes = dict(
    q=(HIDDEN, HEADS * HEAD_DIM),
    k=(HIDDEN, KV_HEADS * HEAD_DIM),
    v=(HIDDEN, KV_HEADS * HEAD_DIM),
    o=(HEADS * HEAD_DIM, HIDDEN),
    gate=(HIDDEN, MLP),
    up=(HIDDEN, MLP),
    down=(MLP, HIDDEN),
  )
  params = {
    name: jnp.asarray(rng.normal(size=(LAYERS, *shape)) * 0.02, dtype)
    for name, shape in shapes.items()
  }
  if transposes:  # stored once, as a frozen model would keep them
    for name in shapes:
      params[name + "_t"] = jnp.asarray(
        np.swapaxes(np.asarray(params[name]), 1, 2).copy()
      )
  return params


def stack_forward(params, x, matmul):
  """SmolLM2's 30 decoder layers (RMSNorm, GQA causal attention, SwiGLU).

  `matmul(x, w, w_t)` computes every dense projection (`w_t`: the stored
  transpose or None); attention scores and values stay float32 einsums, as
  in llm.py. Returns the final hidden.
  """
  b, t, _ = x.shape
  causal = jnp.tril(jnp.ones((t, t), bool))

  def norm(h):
    return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-5)

  def layer(h, p):
    def dense(a, name):
      return matmul(a, p[name], p.get(name + "_t"))

    a = norm(h)
    q = dense(a, "q").reshape(b, t, KV_HEADS, -1, HEAD_DIM)
    k = dense(a, "k").reshape(b, t, KV_HEADS, HEAD_DIM)
    v = dense(a, "v").reshape(b, t, KV_HEADS, HEAD_DIM)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * HEAD_DIM**-0.5
    s = jnp.where(causal, s, -1e9)
    o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, -1), v)
    h = h + dense(o.reshape(b, t, -1), "o")
    a = norm(h)
    mlp = jax.nn.silu(dense(a, "gate")) * dense(a, "up")
    return h + dense(mlp, "down"), None

  return jax.lax.scan(layer, x, params)[0]


def stack_flops(tokens, seq, backward):
  per_layer = 2 * HIDDEN * (2 * HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM)
  per_layer += 2 * 3 * HIDDEN * MLP
  dense = tokens * LAYERS * per_layer
  attention = tokens * LAYERS * 2 * 2 * seq * HEADS * HEAD_DIM
  return 2 * dense + 3 * attention if backward else dense + attention


def stack_table(results):
  b, t = FLAGS.stack_batch, FLAGS.stack_seq
  x = jnp.asarray(
    np.random.default_rng(1).normal(size=(b, t, HIDDEN)), jnp.float32
  )
  p32 = stack_params(jnp.float32)
  p16 = stack_params(jnp.bfloat16)
  p16t = stack_params(jnp.bfloat16, transposes=True)
  variants = {
    "f32": (p32, lambda a, w, w_t: a @ w),
    "bf16": (p16, lambda a, w, w_t: om.frozen_matmul(a, w, use_ffi=False)),
    "bf16_wt": (
      p16t,
      lambda a, w, w_t: om.frozen_matmul(a, w, w_t=w_t, use_ffi=False),
    ),
  }
  if om.available()[0]:
    variants["onednn"] = (
      p16,
      lambda a, w, w_t: om.frozen_matmul(a, w, use_ffi=True),
    )
  print(
    f"\n30-layer stack, {b} x {t} tokens (seconds per call, GFLOP/s):\n"
    "| pass | f32 | bf16 | bf16, W^T stored | oneDNN bf16 "
    "| speedup over f32: bf16 / bf16 W^T / oneDNN | load |"
  )
  print("|---|---|---|---|---|---|---|")
  for backward in (False, True):
    fns = {}
    for name, (p, mm) in variants.items():
      if backward:
        f = jax.jit(
          jax.grad(lambda x, p, mm=mm: jnp.sum(stack_forward(p, x, mm) ** 2))
        )
      else:
        f = jax.jit(lambda x, p, mm=mm: stack_forward(p, x, mm))
      fns[name] = lambda f=f, p=p: f(x, p)
    before = load()
    med = time_interleaved(fns, FLAGS.stack_repeats, 0)
    flops = stack_flops(b * t, t, backward)
    label = "fwd+bwd (dx)" if backward else "forward"
    results[f"stack {label}"] = {k: v for k, v in med.items()}

    def cell(name, med=med, flops=flops):
      s = med.get(name, float("nan"))
      return f"{s:.3f} s ({flops / s / 1e9:.0f})"

    cells = " | ".join(cell(v) for v in VARIANTS)
    speed = " / ".join(
      f"{med['f32'] / med.get(v, float('nan')):.2f}" for v in VARIANTS[1:]
    )
    print(f"| {label} | {cells} | {speed} | {before}-{load()} |", flush=True)


def main(argv):
  del argv
  ok, why = om.available()
  print(f"cpu: {cpu_summary()}")
  print(
    f"jax {jax.__version__}; oneDNN op: {why if ok else 'unavailable: ' + why}"
    f"; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
  )
  print(f"load average before: {os.getloadavg()}")
  results = {}
  if FLAGS.shapes:
    shapes_table(results)
  if FLAGS.stack:
    stack_table(results)
  print(f"load average after: {os.getloadavg()}")
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
