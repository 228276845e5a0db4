r"""Serving latency of a trained ILM export, in one process.

  python -m benchmarks.serve_latency --workdir=DIR

Times, in order: loading the export and the LLM; compiling the decoders
(the service's warm-up); the first recommendation for a five-item history
(k=10, no reasons); a full chat turn with reasons (k=5); and batched
scoring (`recommend_batch`, k=10) as users/s after one untimed batch.
Reports the load average: other processes slow every figure down.
"""

import os
import time

import numpy as np
from absl import app, flags

from ilm_jax.serving import recommender, session

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir with an export.")
_BATCH_USERS = flags.DEFINE_integer("batch_users", 16, "Users timed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per search.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (median).")
flags.mark_flags_as_required(["workdir"])


def _median(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), times


def main(argv):
  del argv
  start = time.perf_counter()
  model = recommender.Recommender.from_workdir(_WORKDIR.value, warmup=False)
  load = time.perf_counter() - start
  compile_s = model.warmup()
  print(f"load {load:.1f}s  compile (warm-up) {compile_s:.1f}s")
  # Five popular items as the history.
  order = np.argsort(-np.array(model.catalog.popularity), kind="stable")
  history = [int(i) for i in order[:5]]
  start = time.perf_counter()
  first = model.recommend(history, k=10)
  print(
    f"first recommendation (5-item history, k=10): "
    f"{time.perf_counter() - start:.2f}s -> {first[0].title!r}"
  )
  median, times = _median(
    lambda: model.recommend(history, k=10), _REPEATS.value
  )
  print(f"recommend k=10 median {median:.2f}s  {np.round(times, 2)}")
  titles = [model.catalog.titles[i] for i in history[:2]]
  message = f"I loved {titles[0]} and {titles[1]}"

  def chat_turn():
    reply = model.chat(session.Session(), message, k=5)
    assert len(reply.items) == 5, reply.reply

  median, times = _median(chat_turn, _REPEATS.value)
  print(
    f"chat turn with reasons (k=5) median {median:.2f}s  {np.round(times, 2)}"
  )
  reply = model.chat(session.Session(), message, k=5)
  for item in reply.items:
    print(f"  {item.title}: {item.reason} [{item.reason_source}]")
  rng = np.random.default_rng(0)
  histories = [
    [int(i) for i in rng.choice(len(model.catalog), 5, replace=False)]
    for _ in range(_BATCH_USERS.value)
  ]
  size = _BATCH_SIZE.value
  model.recommend_batch(histories[:size], k=10, batch_size=size)  # compile
  start = time.perf_counter()
  model.recommend_batch(histories, k=10, batch_size=size)
  wall = time.perf_counter() - start
  print(
    f"batch: {len(histories)} users (batch {size}, k=10) in {wall:.1f}s = "
    f"{len(histories) / wall:.2f} users/s"
  )
  print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
