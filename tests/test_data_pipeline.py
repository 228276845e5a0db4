"""Grain sources and the training iterator: hand-computed examples, exact resume."""

import json
import pathlib

import grain
import numpy as np
import pytest

from ilm_jax.data import movielens, pipeline, processing, sources

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
  return pipeline.ExampleDataset(n, lambda i: {"index": i}, "indices")


def test_sequential_examples_hand_computed(fixture_ds):
  # User 0 (1m_1) watched T M S H A = items 4 2 3 1 0 (titles sort A H M S T).
  assert fixture_ds.sequence(0).tolist() == [4, 2, 3, 1, 0]
  train = pipeline.sequential_examples(fixture_ds, "train", max_history=2)
  assert len(train) == 10  # 5 users x (5 - 3) prefixes
  first, second = train[0], train[1]
  assert first["user"] == 0 and first["target"] == 2
  assert first["history"].tolist() == [0, 4] and first[
    "history_mask"
  ].tolist() == [False, True]
  assert second["target"] == 3 and second["history"].tolist() == [4, 2]
  assert second["history_mask"].tolist() == [True, True]
  assert train[2]["user"] == 1
  assert (
    first["history"].dtype == np.int32 and first["target"].dtype == np.int32
  )

  valid = pipeline.sequential_examples(fixture_ds, "valid", max_history=4)[0]
  assert valid["history"].tolist() == [0, 4, 2, 3] and valid["target"] == 1
  assert valid["history_mask"].tolist() == [False, True, True, True]
  test = pipeline.sequential_examples(fixture_ds, "test", max_history=2)[0]
  assert test["history"].tolist() == [3, 1] and test["target"] == 0
  with pytest.raises(ValueError, match="Unknown split"):
    pipeline.sequential_examples(fixture_ds, "dev", 2)


def test_pair_and_text_sources(fixture_ds):
  pairs = pipeline.item_item_pairs(fixture_ds)
  assert len(pairs) == 10 and pairs[0] == {"item": 4, "positive_item": 2}
  positives = pipeline.user_item_pairs(fixture_ds)
  assert positives[1] == {"user": 0, "item": 2}
  texts = pipeline.item_texts(fixture_ds)
  assert len(texts) == 5
  assert texts[2]["title"] == "Les Misérables (1995)"
  assert texts[2]["text"].startswith("Les Misérables (1995). Genres:")


def test_iterator_state_round_trips_across_an_epoch_boundary(synthetic_ds):
  examples = pipeline.sequential_examples(synthetic_ds, "train", max_history=5)
  assert pipeline.steps_per_epoch(examples, 8) == len(examples) // 8 == 36

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
    pipeline.shard_indices(31, 3, 3)
  with pytest.raises(ValueError, match="batch_size 40 exceeds"):
    pipeline.training_iterator(index_dataset(31), batch_size=40, seed=0)


def test_any_map_dataset_and_batch_transform(fixture_ds):
  fast = pipeline.user_item_pairs(fixture_ds)
  generic = fast.map(
    lambda e: {"user": e["user"], "item": e["item"]}
  )  # not an ExampleDataset
  assert isinstance(generic, grain.MapDataset) and not isinstance(
    generic, pipeline.ExampleDataset
  )
  a = pipeline.training_iterator(fast, batch_size=3, seed=2)
  b = pipeline.training_iterator(generic, batch_size=3, seed=2)
  for _ in range(5):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["user"], y["user"])
    np.testing.assert_array_equal(x["item"], y["item"])

  def count_words(batch):
    return {
      "item": batch["item"],
      "words": np.array([len(t.split()) for t in batch["text"]]),
    }

  it = pipeline.training_iterator(
    pipeline.item_texts(fixture_ds), batch_size=5, seed=0, transform=count_words
  )
  batch = next(it)
  assert sorted(batch["item"].tolist()) == [0, 1, 2, 3, 4]
  assert batch["words"][batch["item"].tolist().index(2)] == len(
    "Les Misérables (1995). Genres: Drama, Musical.".split()
  )


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
