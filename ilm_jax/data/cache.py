"""On-disk processed datasets: arrays plus JSON metadata, keyed by fingerprint.

A processed dataset is a directory:

  arrays.npz     sequence_offsets, sequence_items, ratings, timestamps,
                 item_item_pairs, user_item_pairs (plain numpy, no pickles)
  dataset.json   name, user_ids, item_ids, item_titles, item_texts,
                 item_attributes, stats, format version
  stats.json     the stats alone, for people and scripts

The cache keeps such directories under `<cache_dir>/processed/<name>-<key>`,
where the key is a sha256 over the source files' contents and the options
that change the result (see `fingerprint`). Editing a source file, changing
an option, or bumping FORMAT_VERSION after a processing change gives a new
key, so stale results are never read back.
"""

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from ilm_jax.data import processing

# Bump when processing or the on-disk layout changes meaning.
# 2: exact duplicate rows dropped (dropped["duplicate_rows"]); stats gain
#    implausible_timestamps and the sequential-id figures.
FORMAT_VERSION = 2

_ARRAYS = (
  "sequence_offsets",
  "sequence_items",
  "ratings",
  "timestamps",
  "item_item_pairs",
  "user_item_pairs",
)
_JSON_FIELDS = (
  "name",
  "user_ids",
  "item_ids",
  "item_titles",
  "item_texts",
  "item_attributes",
  "stats",
)


def _file_digest(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def fingerprint(source_files: dict[str, os.PathLike], options: dict) -> str:
  """Returns a key that changes when any input to processing changes.

  Args:
    source_files: role ("inter", "movies_db", ...) -> path. Contents are
      hashed, not paths or times, so a moved but identical file still hits.
    options: JSON-serialisable processing options (dataset, k, threshold,
      enrichment, ...).

  Returns:
    A 16-hex-digit key.
  """
  payload = {
    "format_version": FORMAT_VERSION,
    "options": options,
    "files": {
      role: _file_digest(pathlib.Path(path))
      for role, path in sorted(source_files.items())
    },
  }
  encoded = json.dumps(payload, sort_keys=True).encode()
  return hashlib.sha256(encoded).hexdigest()[:16]


def save(
  dataset: processing.ProcessedDataset,
  directory: os.PathLike,
  overwrite: bool = True,
) -> pathlib.Path:
  """Writes `dataset` to `directory` atomically.

  Args:
    dataset: what to write.
    directory: the target directory (created).
    overwrite: replace an existing directory. Cache entries pass False: an
      entry with the same key holds the same result, and several processes
      of one job may race to write it; the first one wins.

  Returns:
    The directory.
  """
  directory = pathlib.Path(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  # Write next to the target and rename, so a reader never sees half a
  # dataset and two writers cannot interleave files.
  tmp = pathlib.Path(
    tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.")
  )
  tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal directory
  try:
    np.savez(
      tmp / "arrays.npz", **{name: getattr(dataset, name) for name in _ARRAYS}
    )
    meta = {name: getattr(dataset, name) for name in _JSON_FIELDS}
    meta["format_version"] = FORMAT_VERSION
    with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
      json.dump(meta, f, ensure_ascii=False)
    with open(tmp / "stats.json", "w", encoding="utf-8") as f:
      json.dump(dataset.stats, f, indent=2, ensure_ascii=False)
    if directory.exists() and overwrite:
      shutil.rmtree(directory)
    try:
      os.replace(tmp, directory)
    except OSError:
      if overwrite or not directory.exists():
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another writer got there first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def load(directory: os.PathLike) -> processing.ProcessedDataset:
  """Reads a dataset written by `save`.

  Args:
    directory: the dataset directory.

  Returns:
    The ProcessedDataset.

  Raises:
    FileNotFoundError: the directory lacks the dataset files.
    ValueError: it was written by a different FORMAT_VERSION.
  """
  directory = pathlib.Path(directory)
  with open(directory / "dataset.json", encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{directory} holds format version {meta.get('format_version')}, this "
      f"code reads {FORMAT_VERSION}; prepare it again."
    )
  with np.load(directory / "arrays.npz", allow_pickle=False) as arrays:
    fields = {name: arrays[name] for name in _ARRAYS}
  return processing.ProcessedDataset(
    **fields, **{name: meta[name] for name in _JSON_FIELDS}
  )


def entry(cache_dir: os.PathLike, name: str, key: str) -> pathlib.Path:
  """The directory a dataset with this name and key is cached under."""
  return pathlib.Path(cache_dir) / "processed" / f"{name}-{key}"


def lookup(
  cache_dir: os.PathLike, name: str, key: str
) -> processing.ProcessedDataset | None:
  """Returns the cached dataset, or None on a miss (or an unreadable entry)."""
  directory = entry(cache_dir, name, key)
  if not (directory / "dataset.json").is_file():
    return None
  try:
    return load(directory)
  except (OSError, ValueError, KeyError):
    # A damaged or outdated entry is rebuilt rather than trusted.
    return None
