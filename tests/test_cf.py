"""The CF phase: MF recovers planted structure, exports reload bitwise, and
the phase writes every model's metrics (popularity checked in numpy)."""

import json

import jax
import numpy as np
import pytest

from configs import ml1m
from ilm_jax import checkpoint, data, sharding, train
from ilm_jax.data import pipeline, synthetic
from ilm_jax.models import cf_encoder
from ilm_jax.phases import cf
from tests import data_helpers

NUM_ITEMS, NUM_CLUSTERS = 40, 4  # the synthetic generator's defaults


@pytest.fixture(scope="module")
def tiny_config():
  return ml1m.get_config("tiny")


@pytest.fixture(scope="module")
def dataset(tiny_config):
  ds = data.load_dataset(tiny_config.data)
  assert ds.num_items == NUM_ITEMS and ds.item_ids[7] == "item_7"
  return ds


def _cluster(item):
  return synthetic.item_cluster(item, NUM_ITEMS, NUM_CLUSTERS)


def test_mf_recovers_the_planted_clusters(tmp_path, dataset):
  tiny_config = ml1m.get_config("tiny")  # modified below: not the fixture
  config = tiny_config.cf
  config.train.steps = 150
  config.optim.learning_rate = 0.05
  config.train.eval_every = 0
  config.train.best_metric = ""
  config.evals = {}
  mesh = sharding.make_mesh(tiny_config.mesh, jax.devices()[:1])
  result = train.train(
    cf.mf_task(dataset, config, mesh, seed=0),
    config,
    mesh=mesh,
    mesh_config=tiny_config.mesh,
    workdir=tmp_path,
  )
  items, users = cf_encoder.tables_from_params(result.params)
  # Users: the 10 best-scored items lie in the user's own cluster (chance:
  # 1 in 4).
  top10 = np.argsort(-(users @ items.T), axis=1)[:, :10]
  own = np.arange(dataset.num_users)[:, None] % NUM_CLUSTERS
  in_cluster = np.vectorize(_cluster)(top10) == own
  assert in_cluster.mean() > 0.8, in_cluster.mean()
  # Items: the most similar other item shares the cluster (chance 9/39).
  similarity = items @ items.T
  np.fill_diagonal(similarity, -np.inf)
  neighbours = similarity.argmax(axis=1)
  same = [_cluster(i) == _cluster(j) for i, j in enumerate(neighbours)]
  assert np.mean(same) > 0.8, np.mean(same)


def test_training_item_lists_never_hold_held_out_items(dataset):
  for interactions in ("all", "positive"):
    lists = pipeline.training_item_lists(dataset, interactions)
    for user, items in enumerate(lists):
      train_part = set(data_helpers.train_sequence(dataset, user).tolist())
      assert set(items.tolist()) <= train_part
  positives = pipeline.training_item_lists(dataset, "positive")
  assert sum(map(len, positives)) == len(dataset.user_item_pairs)


def test_exported_tables_reload_bitwise(tmp_path, dataset):
  rng = np.random.default_rng(0)
  items = rng.normal(size=(dataset.num_items, 8)).astype(np.float32)
  users = rng.normal(size=(dataset.num_users, 8)).astype(np.float32)
  cf_encoder.export_cf_tables(
    tmp_path / "export", items, users, dataset, dict(note="test")
  )
  got_items, got_users, metadata = cf_encoder.load_cf_tables(
    tmp_path / "export"
  )
  np.testing.assert_array_equal(got_items, items)
  np.testing.assert_array_equal(got_users, users)
  assert got_items.dtype == np.float32
  assert metadata["item_ids"] == dataset.item_ids
  assert metadata["user_ids"] == dataset.user_ids
  assert (metadata["embed_dim"], metadata["note"]) == (8, "test")
  with pytest.raises(checkpoint.CheckpointError, match="No CF export"):
    cf_encoder.load_cf_tables(tmp_path / "missing")


@pytest.fixture(scope="module")
def phase_run(tmp_path_factory, tiny_config):
  workdir = tmp_path_factory.mktemp("cf_phase")
  mesh = sharding.make_mesh(tiny_config.mesh)  # 8 devices
  summary = cf.run(tiny_config, workdir, mesh)
  return workdir, summary


@pytest.mark.slow
def test_phase_writes_metrics_of_every_model(phase_run):
  workdir, summary = phase_run
  names = {"hr@5", "hr@10", "ndcg@5", "ndcg@10", "users"}
  names |= {"coverage@1", "coverage@5", "coverage@10"}
  for model in ("mf", "popularity", "sasrec"):
    for split in ("valid", "test"):
      values = json.loads(
        (workdir / "metrics" / f"{model}_{split}.json").read_text()
      )
      scalars = {k for k, v in values.items() if isinstance(v, float)}
      assert scalars == names | {f"masked_{n}" for n in names}
      assert values["users"] == values["masked_users"] == 60
      assert summary[f"{model}/{split}/hr@10"] == values["hr@10"]
    assert summary[f"{model}/wall_time_s"] > 0


@pytest.mark.slow
def test_phase_exports_the_selected_mf_params(phase_run):
  workdir, summary = phase_run
  items, users, metadata = cf_encoder.load_cf_tables(workdir / "cf" / "export")
  best = checkpoint.load_params(workdir / "mf" / "best_params")
  np.testing.assert_array_equal(items, best["item_embedding"]["embedding"])
  np.testing.assert_array_equal(users, best["user_embedding"]["embedding"])
  assert metadata["model"]["embed_dim"] == items.shape[1]
  assert summary["export_dir"] == str(workdir / "cf" / "export")


@pytest.mark.slow
def test_phase_exports_sasrec_items_and_user_states(
  phase_run, dataset, tiny_config
):
  """`cf.tables=sasrec`'s export: SASRec's item table and, per user, the
  state after the training part, whose dot with the items is SASRec's own
  next-item score on that history."""
  workdir, summary = phase_run
  export = workdir / "sasrec" / "export"
  assert summary["sasrec_export_dir"] == str(export)
  items, users, metadata = cf_encoder.load_cf_tables(export)
  assert metadata["model"] == "sasrec"
  assert users.shape == (dataset.num_users, items.shape[1])
  params = checkpoint.load_params(workdir / "sasrec" / "best_params")
  np.testing.assert_array_equal(items, params["item_embedding"]["embedding"])
  model = cf.sasrec_model(dataset, tiny_config.cf)
  length = tiny_config.cf.sasrec.model.max_length
  some = np.array([0, 7, dataset.num_users - 1])
  # The training part items[:-2], written out from the full sequences.
  history = np.zeros((len(some), length), np.int32)
  mask = np.zeros((len(some), length), bool)
  for row, user in enumerate(some):
    train_part = dataset.sequence(user)[:-2][-length:]
    history[row, length - len(train_part) :] = train_part
    mask[row, length - len(train_part) :] = True
  scores = model.apply({"params": params}, history, mask)
  np.testing.assert_allclose(
    users[some] @ items.T, scores, rtol=1e-4, atol=1e-4
  )
  # The state before every interaction: at the valid target (position
  # len - 2 of each user) it is the user's row above.
  assert metadata["sequence_states"] is True
  states = cf_encoder.load_sequence_states(export, dataset.num_interactions)
  assert states.shape == (dataset.num_interactions, items.shape[1])
  valid_targets = dataset.sequence_offsets[1:] - 2
  np.testing.assert_allclose(states[valid_targets], users, rtol=1e-5, atol=1e-5)
  with pytest.raises(checkpoint.CheckpointError, match="interactions"):
    cf_encoder.load_sequence_states(export, dataset.num_interactions + 1)


def test_an_export_without_sequence_states_says_how_to_get_them(
  tmp_path, dataset
):
  items = np.zeros((dataset.num_items, 4), np.float32)
  users = np.zeros((dataset.num_users, 4), np.float32)
  states = np.ones((dataset.num_interactions, 4), np.float32)
  cf_encoder.export_cf_tables(
    tmp_path, items, users, dataset, sequence_states=states
  )
  np.testing.assert_array_equal(
    cf_encoder.load_sequence_states(tmp_path, dataset.num_interactions),
    states,
  )
  # Written again without them: the old states are gone, not stale.
  cf_encoder.export_cf_tables(tmp_path, items, users, dataset)
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"no sequence_states/.*--config.cf.sasrec.export_sequence_states=True",
  ):
    cf_encoder.load_sequence_states(tmp_path, dataset.num_interactions)
  with pytest.raises(ValueError, match="does not fit"):
    cf_encoder.export_cf_tables(
      tmp_path, items, users, dataset, sequence_states=items
    )


@pytest.mark.slow
def test_popularity_metrics_match_numpy(phase_run, dataset):
  workdir, _ = phase_run
  counts = np.bincount(
    np.concatenate(
      [
        data_helpers.train_sequence(dataset, u)
        for u in range(dataset.num_users)
      ]
    ),
    minlength=dataset.num_items,
  )
  ranks = []
  for user in range(dataset.num_users):
    target = data_helpers.test_target(dataset, user)
    # Pessimistic ties: every other item with an equal count comes first.
    ranks.append(int(np.sum(counts >= counts[target])) - 1)
  ranks = np.array(ranks)
  values = json.loads(
    (workdir / "metrics" / "popularity_test.json").read_text()
  )
  for k in (5, 10):
    np.testing.assert_allclose(values[f"hr@{k}"], np.mean(ranks < k))
    ndcg = np.where(ranks < k, 1 / np.log2(ranks + 2.0), 0.0).mean()
    np.testing.assert_allclose(values[f"ndcg@{k}"], ndcg, rtol=1e-6)
  # The file's per-user results: every user's rank and hit, by user id.
  per_user = values["per_user"]
  assert per_user["user_ids"] == list(range(dataset.num_users))
  np.testing.assert_array_equal(per_user["rank"], ranks)
  np.testing.assert_array_equal(per_user["hr@10"], ranks < 10)
  low, high = values["hr@10_ci95"]
  assert low < values["hr@10"] < high
  # Unmasked, every user gets the same list: coverage@k = k / items.
  for k in (1, 5, 10):
    assert values[f"coverage@{k}"] == k / dataset.num_items


def test_unknown_baseline_is_rejected():
  assert cf.selected_baselines("sasrec, popularity") == ["popularity", "sasrec"]
  assert cf.selected_baselines("") == []
  with pytest.raises(ValueError, match="bpr"):
    cf.selected_baselines("bpr")
