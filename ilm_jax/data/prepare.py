r"""Builds a processed dataset from its source files and reports what it did.

  python -m ilm_jax.data.prepare --dataset=ml1m --out=/tmp/ml1m
  python -m ilm_jax.data.prepare --dataset=grouplens --path=~/ml-1m --out=/tmp/gl

`--dataset` is one of ml1m, ml100k (packaged), grouplens, openp5, amazon
(files under `--path`), synthetic. Progress lines go to stdout; the LAST line
is one JSON object: users, items, interactions (after k-core),
train_examples, valid, test, dropped (rows dropped, by reason) and more.

The dataset is always rebuilt from the source files (the processed cache is
not read), written to `--out` (arrays.npz, dataset.json, stats.json; read it
back with ilm_jax.data.cache.load), and also stored in the processed cache
so `load_dataset` with the same options finds it.
"""

import json
import sys
import time

from absl import app, flags

from ilm_jax import resources
from ilm_jax.data import cache, files, processing, sources

_DATASET = flags.DEFINE_string(
  "dataset", "ml1m", f"One of {', '.join(sources.DATASETS)}."
)
_PATH = flags.DEFINE_string(
  "path", "", "Directory with user-supplied files (grouplens, openp5, amazon)."
)
_OUT = flags.DEFINE_string(
  "out", None, "Directory to write the processed dataset to.", required=True
)
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir", "", "Processed-dataset cache root; empty = the resource cache."
)
_MIN_INTERACTIONS = flags.DEFINE_integer(
  "min_interactions",
  5,
  "k of the k-core filter (>= 3: the split needs three items per user).",
  lower_bound=processing.MIN_SEQUENCE_LENGTH,
)
_POSITIVE_RATING = flags.DEFINE_float(
  "positive_rating", 4.0, "User-item positives need rating >= this."
)
_ENRICH = flags.DEFINE_boolean(
  "enrich_metadata", True, "MovieLens: add director/writer/cast from movies.db."
)
_WRITE_CACHE = flags.DEFINE_boolean(
  "write_cache", True, "Also store the result in the processed cache."
)


def _progress(message: str) -> None:
  print(f"[prepare] {message}", flush=True)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  data_config = {
    "dataset": _DATASET.value,
    "path": _PATH.value,
    "cache_dir": _CACHE_DIR.value,
    "min_interactions": _MIN_INTERACTIONS.value,
    "positive_rating": _POSITIVE_RATING.value,
    "enrich_metadata": _ENRICH.value,
  }
  try:
    sources.dataset_name(data_config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None

  start = time.perf_counter()
  try:
    found = sources.locate(data_config)
    dataset = sources.build(data_config, found, progress=_progress)
  except (*files.USER_INPUT_ERRORS, resources.ResourceError) as e:
    # The message says what is wrong and where; a traceback adds nothing.
    sys.exit(f"prepare: {type(e).__name__}: {e}")
  if found:
    dataset.stats["fingerprint"] = cache.fingerprint(
      found, sources.options(data_config)
    )
  out = cache.save(dataset, _OUT.value)
  _progress(f"wrote {out}")
  if _WRITE_CACHE.value and found:
    root = sources.cache_root(data_config)
    entry = cache.save(
      dataset, cache.entry(root, dataset.name, dataset.stats["fingerprint"])
    )
    _progress(f"cached as {entry}")
  _progress(f"done in {time.perf_counter() - start:.2f}s")
  sys.stdout.write(json.dumps(dataset.stats, ensure_ascii=False) + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
