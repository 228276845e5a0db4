"""The `cf_user_signal` evaluator: the CF score's ranks of prompt targets."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml1m
from ilm_jax import metric_writer
from ilm_jax.data import ilm_tasks, prompts, sources
from ilm_jax.evaluators import cf_signal, generative, registry
from ilm_jax.models import ilm, llm_loading

# Four items in 2-d and one user row [2, 1]: scores 2, 1, 3, -2, so items
# rank 2, 0, 1, 3 (0-based ranks 0, 1, 2, 3 for targets 2, 0, 1, 3).
ITEMS = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)


def test_target_metrics_by_hand():
  rows = np.tile([[2.0, 1.0]], (4, 1))
  values = cf_signal.target_metrics(rows, ITEMS, [2, 0, 1, 3], ks=(1, 2))
  np.testing.assert_array_equal(values["hr@1"], [1, 0, 0, 0])
  np.testing.assert_array_equal(values["hr@2"], [1, 1, 0, 0])
  np.testing.assert_allclose(values["ndcg@2"], [1, 1 / math.log2(3), 0, 0])


def test_target_metrics_ranks_ties_pessimistically():
  # Row [1, 0] scores items 0 and 2 equally (1): either one ranks second.
  values = cf_signal.target_metrics([[1.0, 0.0]] * 2, ITEMS, [0, 2], ks=(1,))
  np.testing.assert_array_equal(values["hr@1"], [0, 0])


def test_target_metrics_refuses_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\[n, d\] and \[num_items, d\]"):
    cf_signal.target_metrics(np.ones((2, 3)), ITEMS, [0, 1])
  with pytest.raises(ValueError, match="2 user rows but 1 targets"):
    cf_signal.target_metrics(np.ones((2, 2)), ITEMS, [0])


@pytest.fixture(scope="module")
def context():
  config = ml1m.get_config("tiny")
  dataset = sources.load_dataset(config.data)
  tokenizer = llm_loading.load_tokenizer(config.ilm.llm.checkpoint)
  sampler, _ = ilm_tasks.build_prompting(config, dataset, tokenizer)
  rng = np.random.default_rng(0)
  tables = dict(
    items=rng.normal(size=(dataset.num_items, 3)).astype(np.float32),
    users=rng.normal(size=(dataset.num_users, 3)).astype(np.float32),
  )
  return dict(dataset=dataset, sampler=sampler, tables=tables)


def _hr10_by_loop(tables, pairs) -> float:
  """HR@10 with an explicit count of the items scored at least as high."""
  hits = []
  for user, target in pairs:
    scores = [
      float(np.dot(tables["users"][user], item)) for item in tables["items"]
    ]
    above = sum(
      1 for i, s in enumerate(scores) if i != target and s >= scores[target]
    )
    hits.append(above < 10)
  return float(np.mean(hits))


@pytest.mark.parametrize("user_state", ["user", "sequence"])
def test_the_evaluator_scores_sampled_training_prompts_and_split_users(
  context, user_state
):
  """The pairs are written out here from the split and the sampler's
  requests: with 'sequence' states a user's row is num_users + the
  target's position (the state before it), in both prompt sets."""
  users, prompts = 5, 12
  dataset = context["dataset"]
  sampler, tables = context["sampler"], context["tables"]
  if user_state == "sequence":
    config = ml1m.get_config("tiny")
    config.ilm.data.user_state = "sequence"
    sampler, _ = ilm_tasks.build_prompting(
      config, dataset, llm_loading.load_tokenizer(config.ilm.llm.checkpoint)
    )
    # Each state points exactly at the item that follows it (unit items:
    # the target scores highest), so every prompt hits; the users' own
    # random rows do not.
    items = tables["items"] / np.linalg.norm(tables["items"], axis=1)[:, None]
    states = 10 * items[dataset.sequence_items]
    tables = dict(
      items=items,
      users=np.concatenate([tables["users"], states]).astype(np.float32),
    )
  (evaluator,) = registry.from_config(
    {
      "cf_signal": dict(
        type="cf_user_signal",
        split="test",
        tasks=("sequential", "straightforward"),
        num_users=users,
        num_prompts=prompts,
      )
    },
    sampler=sampler,
    dataset=dataset,
    seed=0,
  )
  out = dict(evaluator.run(dict(cf=tables)))
  chosen = generative.seeded_subset(dataset.num_users, users, 0)
  test = dataset.leave_one_out("test")
  shift = dataset.num_users if user_state == "sequence" else None
  for task in ("sequential", "straightforward"):
    drawn = [sampler.training_request(i, task=task) for i in range(prompts)]
    if shift is None:
      train_pairs = [(r.user, r.target_item) for r in drawn]
    else:
      train_pairs = [(r.user_row, r.target_item) for r in drawn]
      positions = [row - shift for row, _ in train_pairs]
      assert [t for _, t in train_pairs] == list(
        dataset.sequence_items[positions]
      )
    assert out[f"cf_signal/{task}/train_prompts/hr@10"] == pytest.approx(
      _hr10_by_loop(tables, train_pairs)
    )
    split_pairs = [
      (u if shift is None else shift + test.ends[u], test.targets[u])
      for u in chosen
    ]
    expected = _hr10_by_loop(tables, split_pairs)
    assert out[f"cf_signal/{task}/hr@10"] == pytest.approx(expected)
    if shift is not None:
      assert expected == 1.0
      assert out[f"cf_signal/{task}/ndcg@10"] == pytest.approx(1.0)
    else:
      assert expected < 1.0
    block = out[metric_writer.PER_USER]
    np.testing.assert_array_equal(block["user_ids"], chosen)
    # The per-user values add up to the reported mean.
    assert block[f"cf_signal/{task}/hr@10"].mean() == pytest.approx(expected)
  assert out["cf_signal/users"] == users
  assert out["cf_signal/train_prompts"] == prompts


def test_the_evaluator_refuses_a_task_without_a_user_row(context):
  with pytest.raises(ValueError, match=r"evals.bad.tasks has \['title'\]"):
    registry.from_config(
      {"bad": dict(type="cf_user_signal", split="test", tasks=("title",))},
      sampler=context["sampler"],
      dataset=context["dataset"],
    )


class _TwoTokenAdapter:
  """A stand-in adapter: entity row r -> soft tokens [r, tanh(r)]; the
  model's own flattening and normalisation."""

  adapter = "mlp"
  unit_soft_tokens = ilm.IlmModel.unit_soft_tokens

  def soft_tokens(self, params, entity_kind, entity_index, rng=None):
    del rng
    users = jnp.take(params["cf"]["users"], entity_index, axis=0)
    items = jnp.take(params["cf"]["items"], entity_index, axis=0)
    rows = jnp.where((entity_kind == prompts.USER)[..., None], users, items)
    return jnp.stack([rows, jnp.tanh(rows)], axis=-2)


def test_the_soft_token_signal_ranks_by_the_cosine_of_flattened_tokens(
  context,
):
  users = 6
  (evaluator,) = registry.from_config(
    {
      "cf_signal": dict(
        type="cf_user_signal", split="test", num_users=users, num_prompts=0
      )
    },
    sampler=context["sampler"],
    dataset=context["dataset"],
    model=_TwoTokenAdapter(),
    seed=0,
  )
  out = dict(evaluator.run(dict(cf=context["tables"])))

  def unit_tokens(row):
    flat = np.concatenate([row, np.tanh(row)])
    return flat / np.linalg.norm(flat)

  tables = dict(
    users=np.stack([unit_tokens(r) for r in context["tables"]["users"]]),
    items=np.stack([unit_tokens(r) for r in context["tables"]["items"]]),
  )
  chosen = generative.seeded_subset(context["dataset"].num_users, users, 0)
  test = context["dataset"].leave_one_out("test")
  target_of = dict(zip(test.users.tolist(), test.targets.tolist(), strict=True))
  expected = _hr10_by_loop(tables, [(u, target_of[int(u)]) for u in chosen])
  assert out["cf_signal/soft_tokens/hr@10"] == pytest.approx(expected)
  block = out[metric_writer.PER_USER]
  assert block["cf_signal/soft_tokens/hr@10"].mean() == pytest.approx(expected)
  # Not a vacuous check: some users miss, some hit.
  assert 0 < expected < 1
