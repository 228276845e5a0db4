"""glibc malloc against preloaded allocators, on the frozen LLM's step.

  python -m benchmarks.cpu_allocator --batch=4 --seq=128 --repeats=2
  python -m benchmarks.cpu_allocator --configs=glibc,mimalloc --repeats=0

An allocator is chosen per process, so each configuration runs in its own
child process, started through `ilm_jax.allocator.reexec_with_preload` (the
mechanism `python -m ilm_jax.main` uses) with `ILM_JAX_ALLOCATOR` set; the
children run round-robin (glibc, mimalloc, tcmalloc, glibc, ...) so that
the machine's load hits every configuration alike. Each child measures:

  fresh   GB/s of `x + 1` into a fresh [tokens, 49152] float32 buffer, the
          size of the vocabulary logits (benchmarks/llm_throughput.py's
          `fresh_buffer_gbps`): the page-fault cost of large buffers;
  fwd_bwd seconds of benchmarks/llm_throughput.py's forward + backward into
          the input embeddings through SmolLM2-135M (random weights of its
          shape), median of --repeats after one warm-up.

Configurations: glibc (`ILM_JAX_ALLOCATOR=system`), mimalloc (the
cmeel-mimalloc wheel as `reexec_with_preload` sets it up: never purge,
MIMALLOC_PURGE_DELAY=-1), mimalloc_purge10 (mimalloc's own default, freed
memory returned to the OS after 10 ms), mimalloc_purge1000 (after 1 s),
tcmalloc (/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 from
Debian's libtcmalloc-minimal4, the reference; skipped if absent). The last
line is a JSON object of the medians per configuration.
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

# Its flags --batch, --seq (fwd_bwd shape) and --repeats (timed fwd_bwd calls
# per process; 0: fresh-buffer test only) apply here too.
from benchmarks import llm_throughput as lt

FLAGS = flags.FLAGS
flags.DEFINE_list(
  "configs",
  ["glibc", "mimalloc", "mimalloc_purge10", "tcmalloc"],
  "Allocators.",
)
flags.DEFINE_integer("rounds", 2, "Round-robin rounds (processes per config).")
flags.DEFINE_bool("child", False, "Internal: measure in this process.")

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
CONFIGS = {
  "glibc": {"ILM_JAX_ALLOCATOR": "system"},
  "mimalloc": {"ILM_JAX_ALLOCATOR": "mimalloc"},
  "mimalloc_nopurge": {  # the same as "mimalloc"
    "ILM_JAX_ALLOCATOR": "mimalloc",
    "MIMALLOC_PURGE_DELAY": "-1",
  },
  "mimalloc_purge1000": {
    "ILM_JAX_ALLOCATOR": "mimalloc",
    "MIMALLOC_PURGE_DELAY": "1000",
  },
  "mimalloc_purge10": {
    "ILM_JAX_ALLOCATOR": "mimalloc",
    "MIMALLOC_PURGE_DELAY": "10",
  },
  "tcmalloc": {"ILM_JAX_ALLOCATOR": TCMALLOC},
}


def child():
  from ilm_jax import allocator

  allocator.reexec_with_preload()
  import time

  import numpy as np

  load_before = os.getloadavg()[0]
  FLAGS.weights, FLAGS.dtype = "random", "float32"
  tokens = FLAGS.batch * FLAGS.seq
  fresh = lt.fresh_buffer_gbps(tokens, 49_152)
  result = dict(
    allocator=allocator.loaded_allocator(), fresh_gbps=fresh, fwd_bwd_s=None
  )
  if FLAGS.repeats:
    config, params = lt.jax_model()
    ids = np.random.default_rng(0).integers(
      100, config.vocab_size, (FLAGS.batch, FLAGS.seq)
    )
    step = lt.jax_side(config, params, ids.astype(np.int32), 1)["fwd_bwd"]
    step()
    times = []
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    result["fwd_bwd_s"] = statistics.median(times)
  result["load"] = [load_before, os.getloadavg()[0]]
  print("RESULT " + json.dumps(result), flush=True)


def main(argv):
  del argv
  if FLAGS.child:
    child()
    return
  configs = [
    c for c in FLAGS.configs if c != "tcmalloc" or os.path.exists(TCMALLOC)
  ]
  print(f"load average before: {os.getloadavg()}; configs {configs}")
  runs = {c: [] for c in configs}
  for r in range(FLAGS.rounds):
    for c in configs:
      env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "ILM_JAX_ALLOCATOR_REEXEC")
      }
      env.update(CONFIGS[c])
      command = [
        sys.executable,
        "-m",
        "benchmarks.cpu_allocator",
        "--child",
        f"--batch={FLAGS.batch}",
        f"--seq={FLAGS.seq}",
        f"--repeats={FLAGS.repeats}",
      ]
      out = subprocess.run(command, env=env, capture_output=True, text=True)
      lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
      if not lines:
        print(f"{c}: failed\n{out.stderr[-3000:]}")
        continue
      res = json.loads(lines[-1][len("RESULT ") :])
      runs[c].append(res)
      step = res["fwd_bwd_s"]
      print(
        f"round {r} {c:17s} {res['allocator']}: fresh "
        f"{res['fresh_gbps']:.1f} GB/s, fwd_bwd "
        f"{'-' if step is None else f'{step:.2f} s'}, load "
        f"{res['load'][0]:.1f}-{res['load'][1]:.1f}",
        flush=True,
      )
  summary = {}
  base = None
  for c, rs in runs.items():
    if not rs:
      continue
    fresh = statistics.median(r["fresh_gbps"] for r in rs)
    steps = [r["fwd_bwd_s"] for r in rs if r["fwd_bwd_s"] is not None]
    step = statistics.median(steps) if steps else None
    summary[c] = dict(fresh_gbps=fresh, fwd_bwd_s=step, n=len(rs))
    if c == "glibc":
      base = step
  print("| allocator | fresh-buffer x + 1 | fwd_bwd | speedup vs glibc |")
  print("|---|---|---|---|")
  for c, s in summary.items():
    step = s["fwd_bwd_s"]
    speed = f"{base / step:.2f}x" if base and step else "-"
    cell = f"{step:.2f} s" if step else "-"
    print(f"| {c} | {s['fresh_gbps']:.1f} GB/s | {cell} | {speed} |")
  print(f"load average after: {os.getloadavg()}")
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
