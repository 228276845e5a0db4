"""Examples per phase, the grain training iterator and the eval batcher."""

import json
import pathlib

import numpy as np
import pytest

from ilm_jax.data import movielens, pipeline, processing, sources
from tests import data_helpers

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def fixture_ds():
  path = FIXTURES / "recbole_ml1m"
  return processing.process(
    movielens.read_recbole("ml1m", path / "ml-1m.inter", path / "ml-1m.item")
  )


@pytest.fixture(scope="module")
def synthetic_ds():
  return sources.load_dataset({"dataset": "synthetic"})


def index_dataset(n):
  """Elements {"index": i}, so batches show which examples were drawn."""
  return pipeline.Examples(n, lambda i: {"index": i}, "indices")


def test_sequential_examples_hand_computed(fixture_ds):
  # User 0 (1m_1) watched T M S H A = items 4 2 3 1 0 (titles sort A H M S T).
  assert fixture_ds.sequence(0).tolist() == [4, 2, 3, 1, 0]
  train = pipeline.sequential_examples(fixture_ds, "train", max_history=2)
  assert len(train) == 10  # 5 users x (5 - 3) prefixes
  first, second = (data_helpers.element(train, i) for i in (0, 1))
  assert first["user"] == 0 and first["target"] == 2
  assert first["history"].tolist() == [0, 4] and first[
    "history_mask"
  ].tolist() == [False, True]
  assert second["target"] == 3 and second["history"].tolist() == [4, 2]
  assert second["history_mask"].tolist() == [True, True]
  assert data_helpers.element(train, 2)["user"] == 1
  assert (
    first["history"].dtype == np.int32 and first["target"].dtype == np.int32
  )

  valid = data_helpers.element(
    pipeline.sequential_examples(fixture_ds, "valid", max_history=4), 0
  )
  assert valid["history"].tolist() == [0, 4, 2, 3] and valid["target"] == 1
  assert valid["history_mask"].tolist() == [False, True, True, True]
  test = data_helpers.element(
    pipeline.sequential_examples(fixture_ds, "test", max_history=2), 0
  )
  assert test["history"].tolist() == [3, 1] and test["target"] == 0
  with pytest.raises(ValueError, match="Unknown split"):
    pipeline.sequential_examples(fixture_ds, "dev", 2)


def test_phase_examples_hand_computed(fixture_ds):
  # Sequences (processing order): user 0 is 4 2 3 1 0; training part 4 2 3.
  pairs = fixture_ds.item_item_pairs
  assert len(pairs) == 10 and pairs[0].tolist() == [4, 2]
  assert fixture_ds.user_item_pairs[1].tolist() == [0, 2]
  assert len(fixture_ds.item_texts) == 5
  assert fixture_ds.item_titles[2] == "Les Misérables (1995)"
  assert fixture_ds.item_texts[2].startswith("Les Misérables (1995). Genres:")

  mf = pipeline.mf_examples(fixture_ds, "all")
  first = data_helpers.element(mf, 0)
  assert first["user"] == 0
  assert first["item_counts"].tolist() == [0, 0, 1, 1, 1]  # items 4 2 3

  item_table = np.arange(5, dtype=np.float32)[:, None] * [1, -1]
  user_table = 10 + np.arange(5, dtype=np.float32)[:, None] * [1, 1]
  text_ids = np.arange(5)[:, None] * [1, 1, 1]
  qformer = pipeline.qformer_examples(
    fixture_ds, item_table, user_table, text_ids, text_ids > 0
  )
  assert len(qformer) == 10
  batch = qformer.gather([0, 1])
  # Example 0: pair (4, 2) and user-item pair 0; example 1: pair (2, 3) and
  # user-item pair 7919 % len.
  ui = fixture_ds.user_item_pairs[[0, 7919 % len(fixture_ds.user_item_pairs)]]
  np.testing.assert_array_equal(batch["item_cf"][:, 0], [4, 2])
  np.testing.assert_array_equal(batch["pair_cf"][:, 0], [2, 3])
  np.testing.assert_array_equal(batch["text_ids"][:, 0], [4, 2])
  np.testing.assert_array_equal(batch["user_cf"][:, 0], 10 + ui[:, 0])
  np.testing.assert_array_equal(batch["user_item_cf"][:, 0], ui[:, 1])


def test_iterator_state_round_trips_across_an_epoch_boundary(synthetic_ds):
  examples = pipeline.sequential_examples(synthetic_ds, "train", max_history=5)
  assert len(examples) // 8 == 36  # batches per epoch

  it = pipeline.training_iterator(examples, batch_size=8, seed=7)
  for _ in range(33):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state == {"next_index": 33}
  expected = [next(it) for _ in range(7)]  # crosses into epoch 2

  resumed = pipeline.training_iterator(examples, batch_size=8, seed=7)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == {"user", "history", "history_mask", "target"}
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_epochs_are_permutations_and_reshuffle():
  it = pipeline.training_iterator(index_dataset(30), batch_size=4, seed=0)
  epoch1 = np.concatenate([next(it)["index"] for _ in range(7)])  # 30 // 4
  epoch2 = np.concatenate([next(it)["index"] for _ in range(7)])
  assert len(set(epoch1.tolist())) == 28 and len(set(epoch2.tolist())) == 28
  assert epoch1.tolist() != epoch2.tolist()
  again = pipeline.training_iterator(index_dataset(30), batch_size=4, seed=0)
  assert next(again)["index"].tolist() == epoch1[:4].tolist()
  other = pipeline.training_iterator(index_dataset(30), batch_size=4, seed=1)
  assert next(other)["index"].tolist() != epoch1[:4].tolist()


def test_processes_get_disjoint_shards():
  drawn = []
  for process_index in range(3):
    it = pipeline.training_iterator(
      index_dataset(31),
      batch_size=5,
      seed=0,
      process_index=process_index,
      process_count=3,
    )
    epoch = np.concatenate(
      [next(it)["index"] for _ in range(2)]
    )  # shard of 10 or 11
    assert (epoch % 3 == process_index).all()
    drawn.append(set(epoch.tolist()))
  assert not (drawn[0] & drawn[1]) and not (drawn[1] & drawn[2])
  with pytest.raises(ValueError, match="process_index 3 not in"):
    pipeline.training_iterator(index_dataset(31), 5, 0, 3, 3)
  with pytest.raises(ValueError, match="batch_size 40 exceeds"):
    pipeline.training_iterator(index_dataset(31), batch_size=40, seed=0)


def test_stacked_examples_match_the_vectorised_gather(fixture_ds):
  fast = pipeline.sequential_examples(fixture_ds, "train", max_history=3)
  slow = pipeline.stacked(
    len(fast), lambda i: data_helpers.element(fast, i), "one by one"
  )
  a = pipeline.training_iterator(fast, batch_size=3, seed=2)
  b = pipeline.training_iterator(slow, batch_size=3, seed=2)
  for _ in range(5):
    x, y = next(a), next(b)
    assert set(x) == set(y) == {"user", "history", "history_mask", "target"}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
      assert x[key].dtype == y[key].dtype


def test_eval_batches_pad_and_mask():
  batches = list(pipeline.eval_batches(index_dataset(10), batch_size=4))
  assert [b["index"].tolist() for b in batches] == [
    [0, 1, 2, 3],
    [4, 5, 6, 7],
    [8, 9, 8, 8],
  ]
  assert batches[-1]["mask"].tolist() == [True, True, False, False]
  shard = list(
    pipeline.eval_batches(
      index_dataset(10), batch_size=4, process_index=1, process_count=2
    )
  )
  assert [b["index"].tolist() for b in shard] == [[1, 3, 5, 7], [9, 9, 9, 9]]
  own_mask = pipeline.Examples(3, lambda i: {"mask": i}, "masked")
  with pytest.raises(ValueError, match="must not have a 'mask'"):
    next(pipeline.eval_batches(own_mask, 2))


def test_eval_batches_same_count_on_every_process():
  # 11 examples over 3 processes: shards of 4, 4 and 3; batches of 3 -> every
  # process takes 2 steps, the last process's second batch is all padding.
  got = []
  for process_index in range(3):
    batches = pipeline.eval_batches(index_dataset(11), 3, process_index, 3)
    got.append([(b["index"].tolist(), b["mask"].tolist()) for b in batches])
  assert got[0] == [([0, 3, 6], [True] * 3), ([9, 9, 9], [True, False, False])]
  assert got[1] == [
    ([1, 4, 7], [True] * 3),
    ([10, 10, 10], [True, False, False]),
  ]
  assert got[2] == [([2, 5, 8], [True] * 3), ([0, 0, 0], [False] * 3)]
