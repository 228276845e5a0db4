"""OpenP5 processing: k-core, index assignment, leakage, synthetic data, errors."""

import collections
import hashlib
import pathlib

import numpy as np
import pytest

from ilm_jax.data import (
  files,
  movielens,
  openp5,
  pipeline,
  processing,
  raw,
  sources,
  synthetic,
)
from tests import data_helpers

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


def test_kcore_repeats_until_stable():
  # k=2. Item 2 has one row -> dropped; user 1 then has one row -> dropped;
  # item 1 then has one row (user 0) -> dropped; user 0 keeps items 0 and 3.
  users = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3])
  items = np.array([0, 1, 3, 1, 2, 0, 3, 0, 3])
  keep, counts = processing.kcore(users, items, 2)
  assert keep.tolist() == [
    True,
    False,
    True,
    False,
    False,
    True,
    True,
    True,
    True,
  ]
  assert counts == {"kcore_item": 2, "kcore_user": 1, "kcore_rounds": 3}


def test_natural_order_ignores_appearance_order():
  assert processing.natural_order(["u10", "u2", "u1", "1m_12", "1m_3"]) == [
    "1m_3",
    "1m_12",
    "u1",
    "u2",
    "u10",
  ]
  assert processing.natural_order(["B00X", "A9", "A10"]) == [
    "A9",
    "A10",
    "B00X",
  ]


def build(rows, k=3, ratings=True):
  builder = raw.InteractionBuilder(with_ratings=ratings)
  for user, item, t, *rating in rows:
    builder.add(user, item, t, *rating)
  return processing.process(
    builder.build("toy", {}, "toy rows"), min_interactions=k
  )


def test_indices_do_not_depend_on_first_appearance():
  # Three users rate x, y, z (a 3-core); file order lists b, c, a and z first.
  rows = [
    (u, item, t, 5.0)
    for u in ("b", "c", "a")
    for t, item in enumerate(("z", "y", "x"))
  ]
  forward = build(rows)
  backward = build(rows[::-1])
  assert forward.user_ids == backward.user_ids == ["a", "b", "c"]
  assert forward.item_ids == backward.item_ids == ["x", "y", "z"]
  assert forward.sequence(1).tolist() == [2, 1, 0]  # b: z y x


def test_tied_timestamps_keep_file_order():
  builder = raw.InteractionBuilder(with_ratings=False)
  for user in ("u", "v", "w"):
    for item, t in (("c", 7), ("a", 7), ("b", 7), ("d", 1)):
      builder.add(user, item, t)
  ds = processing.process(
    builder.build("toy", {}, "toy rows"), min_interactions=3
  )
  # d is earliest; c, a, b share a timestamp and keep file order (not id order).
  assert [ds.item_ids[i] for i in ds.sequence(0)] == ["d", "c", "a", "b"]
  assert ds.stats["tied_timestamps"] == 3 * 2


def test_min_interactions_below_three_is_rejected():
  with pytest.raises(
    ValueError, match=r"min_interactions must be >= 3 .*; got 2\."
  ):
    build([("u", "i", 1, 1.0)], k=2)


def test_empty_after_filtering_says_so():
  data = openp5.read(openp5.find(FIXTURES / "openp5"))
  with pytest.raises(
    files.EmptyDatasetError,
    match=r"openp5: no interactions left after 10-core filtering of 34 rows",
  ):
    processing.process(data, min_interactions=10)


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(
    ValueError,
    match=(
      r"Unknown dataset 'ml20m'; valid names are: "
      "ml1m, ml100k, grouplens, openp5, amazon, synthetic"
    ),
  ):
    sources.load_dataset({"dataset": "ml20m"})


def assert_no_leakage(ds, max_history=50):
  """No valid/test target enters the training inputs of the same user.

  Checked by item value, which is exact when no user repeats an item (true
  for all datasets passed here, asserted below), and by the split sizes.
  """
  for u in range(ds.num_users):
    assert len(np.unique(ds.sequence(u))) == len(ds.sequence(u))
  train = pipeline.sequential_examples(ds, "train", max_history)
  batch = train.gather(np.arange(len(train)))
  seen = collections.defaultdict(set)
  for u, history, mask, target in zip(
    batch["user"],
    batch["history"],
    batch["history_mask"],
    batch["target"],
    strict=True,
  ):
    seen[int(u)].update(history[mask].tolist())
    seen[int(u)].add(int(target))
  for u in range(ds.num_users):
    assert data_helpers.valid_target(ds, u) not in seen[u]
    assert data_helpers.test_target(ds, u) not in seen[u]
  valid = pipeline.sequential_examples(ds, "valid", max_history).gather(
    np.arange(ds.num_users)
  )
  for u in range(ds.num_users):
    assert (
      data_helpers.test_target(ds, u)
      not in valid["history"][u][valid["history_mask"][u]]
    )
    assert valid["target"][u] == data_helpers.valid_target(ds, u)
  for u, i in ds.user_item_pairs:
    assert i not in (
      data_helpers.valid_target(ds, u),
      data_helpers.test_target(ds, u),
    )
  split_items = {
    (u, data_helpers.valid_target(ds, u)) for u in range(ds.num_users)
  } | {(u, data_helpers.test_target(ds, u)) for u in range(ds.num_users)}
  users_of_pairs = np.repeat(
    np.arange(ds.num_users), np.maximum(ds.sequence_lengths - 3, 0)
  )
  for u, (a, b) in zip(users_of_pairs, ds.item_item_pairs, strict=True):
    assert (u, a) not in split_items and (u, b) not in split_items


def test_leave_one_out_by_hand():
  # Sequences [5 4 3 2 1 0] and [0 1 2]: user 1's training part is [0].
  ds = processing.ProcessedDataset(
    name="hand",
    user_ids=["a", "b"],
    item_ids=[str(i) for i in range(6)],
    item_titles=[str(i) for i in range(6)],
    item_texts=[str(i) for i in range(6)],
    item_attributes={},
    sequence_offsets=np.array([0, 6, 9]),
    sequence_items=np.array([5, 4, 3, 2, 1, 0, 0, 1, 2], np.int32),
    ratings=np.zeros(9, np.float32),
    timestamps=np.arange(9),
    item_item_pairs=np.zeros((0, 2), np.int32),
    user_item_pairs=np.zeros((0, 2), np.int32),
    stats={},
  )
  train = ds.leave_one_out("train")
  # Targets items[1:-2] of user 0; user 1 has no training target.
  assert train.users.tolist() == [0, 0, 0]
  assert train.targets.tolist() == [4, 3, 2]
  assert [h.tolist() for h in train.histories()] == [[5], [5, 4], [5, 4, 3]]
  valid = ds.leave_one_out("valid")
  assert valid.targets.tolist() == [1, 1]
  assert [h.tolist() for h in valid.histories()] == [[5, 4, 3, 2], [0]]
  test = ds.leave_one_out("test")
  assert test.targets.tolist() == [0, 2]
  assert test.history(1).tolist() == [0, 1]
  history, mask = test.padded_histories(np.array([1, 0]), 3)
  assert history.tolist() == [[0, 0, 1], [3, 2, 1]]
  assert mask.tolist() == [[False, True, True], [True, True, True]]
  with pytest.raises(ValueError, match="Unknown split"):
    ds.leave_one_out("dev")


def test_record_digest_covers_every_sequence_in_order():
  def dataset(offsets, items, titles="abcdef"):
    return processing.ProcessedDataset(
      name="hand",
      user_ids=[str(u) for u in range(len(offsets) - 1)],
      item_ids=[str(i) for i in range(6)],
      item_titles=list(titles),
      item_texts=list(titles),
      item_attributes={},
      sequence_offsets=np.array(offsets),
      sequence_items=np.array(items, np.int32),
      ratings=np.zeros(len(items), np.float32),
      timestamps=np.arange(len(items)),
      item_item_pairs=np.zeros((0, 2), np.int32),
      user_item_pairs=np.zeros((0, 2), np.int32),
      stats={},
    )

  base = dataset([0, 3, 5], [5, 4, 3, 0, 1])
  # An independent digest: SHA-256 of the int64 bytes, offsets then items.
  data = np.array([0, 3, 5] + [5, 4, 3, 0, 1], "<i8").tobytes()
  assert base.record() == dict(
    name="hand",
    users=2,
    items=6,
    interactions=5,
    interactions_digest=hashlib.sha256(data).hexdigest()[:16],
  )
  digest = base.record()["interactions_digest"]
  # Titles are not covered; a swapped order, a moved boundary are.
  assert dataset([0, 3, 5], [5, 4, 3, 0, 1], "uvwxyz").record() == base.record()
  for other in (
    dataset([0, 3, 5], [4, 5, 3, 0, 1]),
    dataset([0, 2, 5], [5, 4, 3, 0, 1]),
  ):
    assert other.record()["interactions_digest"] != digest


def test_no_leakage_on_fixture_and_synthetic():
  path = FIXTURES / "recbole_ml1m"
  assert_no_leakage(
    processing.process(
      movielens.read_recbole("ml1m", path / "ml-1m.inter", path / "ml-1m.item")
    )
  )
  assert_no_leakage(sources.load_dataset({"dataset": "synthetic"}))


def test_synthetic_is_deterministic_with_planted_clusters():
  a = processing.process(synthetic.generate(seed=3))
  b = processing.process(synthetic.generate(seed=3))
  c = processing.process(synthetic.generate(seed=4))
  assert a.sequence_items.tolist() == b.sequence_items.tolist()
  assert a.sequence_items.tolist() != c.sequence_items.tolist()
  assert (a.num_users, a.num_items) == (60, 40)
  assert a.item_ids == [f"item_{i}" for i in range(40)]
  assert a.user_ids[:3] == ["user_0", "user_1", "user_2"]
  cluster = np.arange(40) * 4 // 40
  # Most interactions are with the user's cluster, all positives are.
  users = np.repeat(np.arange(60), a.sequence_lengths)
  in_cluster = cluster[a.sequence_items] == users % 4
  assert in_cluster.mean() > 0.75
  assert (cluster[a.user_item_pairs[:, 1]] == a.user_item_pairs[:, 0] % 4).all()
  same = cluster[a.item_item_pairs[:, 0]] == cluster[a.item_item_pairs[:, 1]]
  assert same.mean() > 0.6
  assert (
    a.item_texts[0]
    == "Action Story 0. Genres: Action. Description: A bright action film."
  )


def test_repeated_interactions_are_kept_and_counted():
  # Review data can hold the same (user, item) twice at different times: a
  # repeat interaction, kept (OpenP5 keeps them), counted, and the resulting
  # self-pair is left out of item pairs.
  rows = [
    (u, item, 10 * t) for u in ("u", "v", "w") for t, item in enumerate("abcd")
  ]
  rows.insert(1, ("u", "a", 5))  # u: a a b c d
  builder = raw.InteractionBuilder(with_ratings=False)
  for row in rows:
    builder.add(*row)
  ds = processing.process(builder.build("toy", {}, "toy rows"), 3)
  assert ds.sequence(0).tolist() == [0, 0, 1, 2, 3]
  assert ds.stats["duplicate_user_item"] == 1
  assert ds.stats["dropped"]["duplicate_rows"] == 0
  # u's training part a a b gives (a, a) skipped and (a, b); v, w give (a, b).
  assert ds.item_item_pairs.tolist() == [[0, 1], [0, 1], [0, 1]]
  assert ds.stats["item_item_self_pairs_skipped"] == 1


def test_exact_duplicate_rows_are_dropped_and_counted():
  # An exact duplicate line (same user, item, time and rating) is one event
  # recorded twice: the copies are dropped before the k-core, so they can
  # neither keep a user above k nor become a test target equal to the last
  # history item. A same-time row with another rating is not a copy.
  builder = raw.InteractionBuilder(with_ratings=True)
  rows = [
    (user, item, t, 5.0 - t)
    for user in ("u", "v", "w")
    for t, item in enumerate("abc")
  ]
  rows += [("u", "c", 2, 3.0), ("u", "c", 2, 3.0)]  # two copies of u's c
  rows += [("v", "c", 2, 1.0)]  # same time, other rating: kept
  for row in rows:
    builder.add(*row)
  data = builder.build("toy", {}, "toy rows")
  expected = [True] * 9 + [False, False, True]
  assert processing.first_occurrences(data).tolist() == expected
  ds = processing.process(data, 3)
  assert ds.stats["dropped"]["duplicate_rows"] == 2
  assert ds.stats["raw_interactions"] == 12
  assert ds.stats["interactions"] == 10
  assert ds.sequence(0).tolist() == [0, 1, 2]  # u: a b c, no second c
  assert ds.sequence(1).tolist() == [0, 1, 2, 2]
  assert ds.stats["duplicate_user_item"] == 1  # v's c at rating 3 and 1


def test_duplicates_cannot_keep_a_user_in_the_k_core():
  # w has 2 distinct rows plus a copy: 3 rows, but only 2 events -> the
  # 3-core drops w (counted under kcore_user, the copy under duplicate_rows).
  builder = raw.InteractionBuilder(with_ratings=False)
  for user in ("u", "v", "w", "x"):
    for t, item in enumerate("abc"):
      if user != "w" or item != "c":
        builder.add(user, item, t)
  builder.add("w", "b", 1)
  ds = processing.process(builder.build("toy", {}, "toy rows"), 3)
  assert ds.user_ids == ["u", "v", "x"]
  assert ds.stats["dropped"] == {
    "duplicate_rows": 1,
    "kcore_item": 0,
    "kcore_user": 2,
  }
