"""The real MovieLens-100K files (recbole==1.2.1 wheel), end to end.

Checks the published OpenP5 sizes, an independent pure-Python rendering of
the protocol, the GroupLens reader on the same data written in the original
layout, and leakage over every training example.
"""

import collections

import numpy as np
import pytest

from ilm_jax import resources
from ilm_jax.data import movielens, pipeline, processing, sources
from tests import data_helpers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ml100k():
  try:
    found = sources.locate({"dataset": "ml100k", "enrich_metadata": False})
  except resources.ResourceError as e:  # offline and not cached
    pytest.skip(f"ML-100K not available: {e}")
  return found, sources.build(
    {"dataset": "ml100k", "enrich_metadata": False}, found
  )


def reference_sequences(inter_path, k=5):
  """The protocol written out plainly: k-core until stable, stable time sort."""
  rows = []
  with open(inter_path, encoding="utf-8") as f:
    next(f)
    for line in f:
      user, item, _, timestamp = line.rstrip("\r\n").split("\t")
      rows.append((user, item, float(timestamp)))
  while True:
    users = collections.Counter(r[0] for r in rows)
    items = collections.Counter(r[1] for r in rows)
    kept = [r for r in rows if users[r[0]] >= k and items[r[1]] >= k]
    if len(kept) == len(rows):
      break
    rows = kept
  sequences = collections.defaultdict(list)
  for user, item, _ in sorted(rows, key=lambda r: r[2]):  # sorted() is stable
    sequences[user].append(item)
  return sequences


def test_openp5_sizes(ml100k):
  _, ds = ml100k
  stats = ds.stats
  assert (stats["users"], stats["items"], stats["interactions"]) == (
    943,
    1349,
    99287,
  )
  assert stats["train_examples"] == 99287 - 3 * 943
  assert stats["dropped"] == {
    "duplicate_rows": 0,
    "kcore_item": 100000 - 99287,
    "kcore_user": 0,
  }
  assert ds.user_ids[:3] == ["1", "2", "3"] and ds.item_ids[:3] == [
    "1",
    "2",
    "3",
  ]
  assert ds.item_titles[0] == "Toy Story (1995)"


def test_matches_plain_reference(ml100k):
  found, ds = ml100k
  reference = reference_sequences(found["inter"])
  assert len(reference) == ds.num_users
  for u, user_id in enumerate(ds.user_ids):
    assert [ds.item_ids[i] for i in ds.sequence(u)] == reference[user_id]


def test_grouplens_layout_gives_the_same_dataset(ml100k, tmp_path):
  found, ds = ml100k
  # Write the RecBole copy out in GroupLens' own ml-100k layout.
  inter = found["inter"].read_text(encoding="utf-8").splitlines()[1:]
  (tmp_path / "u.data").write_text("\n".join(inter) + "\n", encoding="latin-1")
  lines = []
  for line in found["item"].read_text(encoding="utf-8").splitlines()[1:]:
    item_id, title, year, genres = line.split("\t")
    flags = [
      "1" if g in genres.split() else "0" for g in movielens.ML100K_GENRES
    ]
    year = year if year.isdigit() else ""
    lines.append(
      "|".join(
        [item_id, f"{title} ({year})" if year else title, "", "", "", *flags]
      )
    )
  (tmp_path / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
  grouplens = processing.process(
    movielens.read_grouplens(movielens.find_grouplens(tmp_path))
  )
  assert grouplens.user_ids == ds.user_ids and grouplens.item_ids == ds.item_ids
  np.testing.assert_array_equal(grouplens.sequence_offsets, ds.sequence_offsets)
  np.testing.assert_array_equal(grouplens.sequence_items, ds.sequence_items)
  np.testing.assert_array_equal(grouplens.user_item_pairs, ds.user_item_pairs)
  assert (
    grouplens.item_titles == ds.item_titles
    and grouplens.item_texts == ds.item_texts
  )


def test_no_validation_or_test_target_in_training_inputs(ml100k):
  _, ds = ml100k
  valid = np.array(
    [data_helpers.valid_target(ds, u) for u in range(ds.num_users)]
  )
  test = np.array(
    [data_helpers.test_target(ds, u) for u in range(ds.num_users)]
  )
  # No user rates a movie twice in ML-100K, so item values identify positions.
  assert ds.stats["duplicate_user_item"] == 0
  train = pipeline.sequential_examples(ds, "train", max_history=200)
  batch = train.gather(np.arange(len(train)))
  assert len(train) == ds.stats["train_examples"]
  user = batch["user"]
  for held_out in (valid, test):
    assert not (batch["target"] == held_out[user]).any()
    assert not (
      (batch["history"] == held_out[user][:, None]) & batch["history_mask"]
    ).any()
  valid_batch = pipeline.sequential_examples(
    ds, "valid", max_history=200
  ).gather(np.arange(ds.num_users))
  assert not (
    (valid_batch["history"] == test[:, None]) & valid_batch["history_mask"]
  ).any()
  pair_users = ds.user_item_pairs[:, 0]
  assert not (ds.user_item_pairs[:, 1] == valid[pair_users]).any()
  assert not (ds.user_item_pairs[:, 1] == test[pair_users]).any()
