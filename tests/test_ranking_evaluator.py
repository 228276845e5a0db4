"""Full-ranking evaluator: numpy-computed expectations, masking, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common as config_common
from ilm_jax import metric_writer, sharding
from ilm_jax.data import sources
from ilm_jax.evaluators import ranking, registry


@pytest.fixture(scope="module")
def dataset():
  return sources.load_dataset(dict(dataset="synthetic"))


def _mesh(num_devices):
  return sharding.make_mesh(
    config_common.mesh_config(), jax.devices()[:num_devices]
  )


def _evaluate(dataset, score_fn, params, mesh, **overrides):
  config = dict(type="ranking", split="test", batch_size=16) | overrides
  (evaluator,) = registry.from_config(
    {"under_test": config}, dataset=dataset, score_fn=score_fn, mesh=mesh
  )
  return {
    name: value
    for name, value in evaluator.run(params)
    if name != metric_writer.PER_USER
  }


def _per_user(dataset, score_fn, params, mesh, **overrides):
  config = dict(type="ranking", split="test", batch_size=16) | overrides
  (evaluator,) = registry.from_config(
    {"under_test": config}, dataset=dataset, score_fn=score_fn, mesh=mesh
  )
  results = list(evaluator.run(params))
  (block,) = [value for name, value in results if name == "per_user"]
  return dict(results), block


def _index_order_scores(params, batch):
  # Item 0 scores highest, then item 1, ...: the target's rank is the
  # number of candidate items with a smaller index.
  del params
  shape = (batch["user"].shape[0], 40)
  return jnp.broadcast_to(-jnp.arange(40, dtype=jnp.float32), shape)


def _expected_index_order_metrics(dataset, split, masked):
  drop = 1 if split == "test" else 2
  ranks, lists = [], []
  for user in range(dataset.num_users):
    sequence = dataset.sequence(user)
    target = sequence[-drop]
    history = set(sequence[:-drop].tolist()) if masked else set()
    ranks.append(sum(1 for i in range(target) if i not in history))
    # The user's list: candidates by index, the history left out.
    lists.append([i for i in range(40) if i not in history][:10])
  ranks = np.array(ranks)
  expected = {}
  for k in (1, 5, 10):
    if k > 1:
      expected[f"hr@{k}"] = np.mean(ranks < k)
      expected[f"ndcg@{k}"] = np.mean(
        np.where(ranks < k, 1 / np.log2(ranks + 2.0), 0.0)
      )
    # Unmasked, everyone gets items 0..k-1: coverage k / 40.
    listed = {i for items in lists for i in items[:k]}
    expected[f"coverage@{k}"] = len(listed) / 40
    if not masked:
      assert expected[f"coverage@{k}"] == k / 40
  return expected


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("masked", [False, True])
def test_metrics_match_ranks_computed_in_numpy(dataset, split, masked):
  assert dataset.num_items == 40
  got = _evaluate(
    dataset,
    _index_order_scores,
    {},
    _mesh(1),
    split=split,
    mask_history=masked,
  )
  expected = _expected_index_order_metrics(dataset, split, masked)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)
  # 60 users in batches of 16: the padded last batch counts 12 users.
  assert got["users"] == dataset.num_users == 60


def test_an_oracle_scores_one_everywhere(dataset):
  def oracle(params, batch):
    del params
    return jax.nn.one_hot(batch["target"], 40)

  got = _evaluate(dataset, oracle, {}, _mesh(1), split="valid")
  # Each list: the target, then the other items (all scored 0) lowest id
  # first.
  coverage = {}
  for k in (1, 5, 10):
    listed = set()
    for user in range(dataset.num_users):
      target = int(dataset.sequence(user)[-2])
      listed |= {target, *[i for i in range(40) if i != target][: k - 1]}
    coverage[k] = len(listed) / 40
  assert got == {
    "hr@5": 1.0,
    "hr@10": 1.0,
    "ndcg@5": 1.0,
    "ndcg@10": 1.0,
    "coverage@1": pytest.approx(coverage[1]),
    "coverage@5": pytest.approx(coverage[5]),
    "coverage@10": pytest.approx(coverage[10]),
    "users": 60.0,
  }


def test_prefix_and_ks_name_the_metrics(dataset):
  got = _evaluate(
    dataset,
    _index_order_scores,
    {},
    _mesh(1),
    ks=(1, 20),
    prefix="masked_",
    mask_history=True,
  )
  assert list(got) == [
    "masked_hr@1",
    "masked_hr@20",
    "masked_ndcg@1",
    "masked_ndcg@20",
    "masked_coverage@1",
    "masked_coverage@20",
    "masked_users",
  ]


def test_eight_device_mesh_equals_one_device(dataset):
  rng = np.random.default_rng(0)
  params = {
    "users": jnp.asarray(rng.normal(size=(60, 8)), jnp.float32),
    "items": jnp.asarray(rng.normal(size=(40, 8)), jnp.float32),
  }

  def dot_scores(params, batch):
    return params["users"][batch["user"]] @ params["items"].T

  results = []
  for devices, mesh_shape in ((1, {}), (8, dict(data=4, fsdp=2))):
    mesh = sharding.make_mesh(
      config_common.mesh_config(**mesh_shape), jax.devices()[:devices]
    )
    placed = jax.device_put(params, sharding.replicated(mesh))
    results.append(
      _evaluate(dataset, dot_scores, placed, mesh, mask_history=True)
    )
  one, eight = results
  assert one.keys() == eight.keys()
  for name in one:
    np.testing.assert_allclose(eight[name], one[name], rtol=1e-6, atol=0)
  assert 0 < one["hr@10"] < 1  # a real ranking, not a degenerate one


def test_batch_size_is_rounded_up_to_the_data_shards(dataset):
  (evaluator,) = registry.from_config(
    {"v": dict(type="ranking", split="valid", batch_size=10)},
    dataset=dataset,
    score_fn=_index_order_scores,
    mesh=_mesh(8),
  )
  assert evaluator.batch_size == 16


def test_unknown_split_and_tie_policy_are_rejected(dataset):
  with pytest.raises(ValueError, match="split"):
    _evaluate(dataset, _index_order_scores, {}, _mesh(1), split="train")
  with pytest.raises(ValueError, match="ties"):
    _evaluate(dataset, _index_order_scores, {}, _mesh(1), ties="random")


def test_exclusion_mask_by_hand():
  mask = ranking.exclusion_mask([np.array([0, 2]), np.array([], int)], 4)
  np.testing.assert_array_equal(
    mask, [[True, False, True, False], [False, False, False, False]]
  )


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "expected"])
def test_per_user_results_add_up_to_the_means(dataset, ties):
  def tied_scores(params, batch):
    # Items 0-9 tie at the top, then index order: many tied targets.
    del params
    scores = -jnp.arange(40, dtype=jnp.float32)
    scores = jnp.where(jnp.arange(40) < 10, 0.0, scores)
    return jnp.broadcast_to(scores, (batch["user"].shape[0], 40))

  got, block = _per_user(
    dataset, tied_scores, {}, _mesh(8), ties=ties, prefix="m_", batch_size=24
  )
  # Every user once (60 users in batches of 24, the last one padded).
  np.testing.assert_array_equal(np.sort(block["user_ids"]), np.arange(60))
  assert got["m_users"] == len(block["user_ids"]) == 60
  for name in ("m_hr@5", "m_hr@10", "m_ndcg@5", "m_ndcg@10"):
    np.testing.assert_allclose(
      np.mean(block[name], dtype=np.float64), got[name], rtol=1e-12
    )
  # Ranks by hand: a target among items 0-9 ties with the other 9 of
  # them; a target t >= 10 has exactly t items above it.
  targets = np.array([dataset.sequence(int(u))[-1] for u in block["user_ids"]])
  tied_rank = {"pessimistic": 9.0, "optimistic": 0.0, "expected": 4.5}[ties]
  expected = np.where(targets < 10, tied_rank, targets)
  np.testing.assert_array_equal(block["m_rank"], expected)
  if ties != "expected":
    np.testing.assert_array_equal(block["m_hr@10"], expected < 10)


def test_disabled_evaluators_are_skipped(dataset):
  config = dict(type="ranking", split="test", batch_size=16)
  evaluators = registry.from_config(
    {"kept": config, "skipped": config | {"enabled": False}},
    dataset=dataset,
    score_fn=_index_order_scores,
    mesh=_mesh(1),
  )
  assert [evaluator.name for evaluator in evaluators] == ["kept"]
