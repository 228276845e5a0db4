"""The processed-dataset cache, load_dataset, and the prepare command line."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ilm_jax import data
from ilm_jax.data import cache, sources

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture
def openp5_config(tmp_path):
  shutil.copytree(FIXTURES / "openp5", tmp_path / "openp5")
  return {
    "dataset": "openp5",
    "path": str(tmp_path / "openp5"),
    "cache_dir": str(tmp_path / "cache"),
  }


def assert_same(a, b):
  for name in (
    "name",
    "user_ids",
    "item_ids",
    "item_titles",
    "item_texts",
    "item_attributes",
    "stats",
  ):
    assert getattr(a, name) == getattr(b, name), name
  for name in (
    "sequence_offsets",
    "sequence_items",
    "timestamps",
    "item_item_pairs",
    "user_item_pairs",
  ):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert getattr(a, name).dtype == getattr(b, name).dtype
  np.testing.assert_array_equal(a.ratings, b.ratings)  # NaN == NaN here


def test_cache_hit_miss_and_invalidation(openp5_config, monkeypatch):
  first = data.load_dataset(openp5_config)
  key = first.stats["fingerprint"]
  assert (
    pathlib.Path(openp5_config["cache_dir"])
    / "processed"
    / f"openp5-{key}"
    / "arrays.npz"
  ).is_file()

  def no_build(*args, **kwargs):
    raise AssertionError("processed again")

  monkeypatch.setattr(sources, "build", no_build)
  assert_same(data.load_dataset(openp5_config), first)
  # max_history shapes pipeline examples only: same cache entry.
  assert_same(data.load_dataset(openp5_config | {"max_history": 3}), first)
  # A processing option or a source file that changes means a rebuild.
  with pytest.raises(AssertionError, match="processed again"):
    data.load_dataset(openp5_config | {"min_interactions": 3})
  sequences = pathlib.Path(openp5_config["path"]) / "user_sequence.txt"
  sequences.write_text(sequences.read_text() + "8 1 2 3 4 5\n")
  with pytest.raises(AssertionError, match="processed again"):
    data.load_dataset(openp5_config)
  monkeypatch.undo()
  rebuilt = data.load_dataset(openp5_config)
  assert rebuilt.stats["fingerprint"] != key and rebuilt.num_users == 6


def test_k3_keeps_user_six(openp5_config):
  # With k=3, only X (one rating) goes; user 6 keeps J T M S.
  ds = data.load_dataset(openp5_config | {"min_interactions": 3})
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (6, 6, 33)
  assert ds.stats["dropped"]["kcore_item"] == 1


def test_save_load_round_trip(tmp_path, openp5_config):
  ds = data.load_dataset(openp5_config)
  assert_same(cache.load(cache.save(ds, tmp_path / "copy")), ds)
  # Cache entries are first-writer-wins; --out directories are replaced.
  other = sources.load_dataset({"dataset": "synthetic"})
  assert_same(
    cache.load(cache.save(other, tmp_path / "copy", overwrite=False)), ds
  )
  assert (
    sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
  )
  assert_same(cache.load(cache.save(other, tmp_path / "copy")), other)
  cache.save(ds, tmp_path / "copy")
  meta = json.loads((tmp_path / "copy" / "dataset.json").read_text())
  meta["format_version"] = -1
  (tmp_path / "copy" / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="format version -1"):
    cache.load(tmp_path / "copy")


def run_prepare(*args):
  return subprocess.run(
    [sys.executable, "-m", "ilm_jax.data.prepare", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    check=False,
    timeout=120,
  )


def test_prepare_cli_contract(tmp_path, openp5_config):
  out = tmp_path / "out"
  proc = run_prepare(
    "--dataset=openp5",
    f"--path={openp5_config['path']}",
    f"--out={out}",
    f"--cache_dir={tmp_path / 'cache'}",
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert any(line.startswith("[prepare] read 34 rows") for line in lines)
  stats = json.loads(lines[-1])
  assert {
    k: stats[k]
    for k in (
      "users",
      "items",
      "interactions",
      "train_examples",
      "valid",
      "test",
    )
  } == {
    "users": 5,
    "items": 5,
    "interactions": 25,
    "train_examples": 10,
    "valid": 5,
    "test": 5,
  }
  assert stats["dropped"] == {
    "blank_lines": 1,
    "users_without_items": 1,
    "duplicate_rows": 0,
    "kcore_item": 5,
    "kcore_user": 4,
  }
  assert cache.load(out).stats == stats
  # The run also filled the cache that load_dataset reads.
  assert sources.load_dataset(openp5_config).stats == stats

  bad = run_prepare("--dataset=movielens", f"--out={out}")
  assert bad.returncode != 0
  assert (
    "valid names are: ml1m, ml100k, grouplens, openp5, amazon, synthetic"
    in bad.stderr
  )
  missing = run_prepare(
    "--dataset=amazon", f"--path={tmp_path / 'nothing'}", f"--out={out}"
  )
  assert missing.returncode != 0
  assert "Expected a directory with Amazon 5-core reviews" in missing.stderr
