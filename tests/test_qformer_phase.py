"""Phase 1 end to end on planted data, and its bad-input errors."""

import types

import jax
import numpy as np
import optax
import pytest

from configs import ml1m
from ilm_jax.data import pipeline
from ilm_jax.evaluators import retrieval
from ilm_jax.models import qformer

# One distinct word per item: the text names the item, the CF vector is the
# item's random code, so item <-> text retrieval is learnable from ITC alone.
WORDS = (
  "apple river stone cloud tiger piano garden rocket candle forest mirror "
  "island violin desert castle bridge window dragon silver meadow harbor "
  "lantern thunder orchard canyon glacier falcon velvet compass marble "
  "saddle temple"
).split()


def _planted(num_items=32, cf_dim=8):
  dataset = types.SimpleNamespace(
    name="planted",
    item_texts=[f"the {w}" for w in WORDS[:num_items]],
    item_ids=[f"item_{i}" for i in range(num_items)],
    num_items=num_items,
    num_users=3,
  )
  table = np.random.default_rng(0).normal(size=(num_items, cf_dim))
  return dataset, table.astype(np.float32)


def _tiny_config(cf_dim=8):
  config = ml1m.get_config("tiny").qformer.model
  config.update(cf_dim=cf_dim, max_text_len=8)
  config.losses = dict(itc=1.0, itm=1.0, itg=0.0, ii=0.0, ui=0.0)
  return config


@pytest.mark.slow
def test_pretraining_on_planted_data_raises_recall_far_above_chance():
  dataset, table = _planted()
  config = _tiny_config()
  ids, mask, truncated = pipeline.tokenize_item_texts(dataset, 8)
  assert truncated == 0
  evaluator = retrieval.ItemTextRetrieval(
    "retrieval",
    dict(split="test"),
    dataset=dataset,
    model_config=config,
    item_table=table,
    text_ids=ids,
    text_mask=mask,
  )
  params = qformer.init_params(config, jax.random.key(0))
  before = dict(evaluator.run(params))

  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, batch, rng):
    grads, _ = jax.grad(
      lambda p: qformer.phase1_losses(p, batch, rng, config), has_aux=True
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  for number in range(200):
    rows = rng.permutation(len(table))[:16]
    batch = dict(item_cf=table[rows], text_ids=ids[rows], text_mask=mask[rows])
    params, opt_state = step(params, opt_state, batch, jax.random.key(number))
  after = dict(evaluator.run(params))

  chance = 1 / len(table)  # recall@1 of a random ranking
  assert before["i2t/recall@1"] < 5 * chance, before
  for direction in ("i2t", "t2i"):
    assert after[f"{direction}/recall@1"] >= 0.5, after  # 16x chance
    assert after[f"{direction}/recall@5"] >= 0.9, after


def test_an_item_with_empty_text_is_named():
  dataset, _ = _planted(4)
  dataset.item_texts[2] = "  "
  with pytest.raises(ValueError, match=r"'item_2' \(index 2\) has an empty"):
    pipeline.tokenize_item_texts(dataset, 8)


def test_long_texts_are_truncated_and_counted():
  dataset, _ = _planted(4)
  dataset.item_texts[1] = " ".join(WORDS)  # 32 words > 8 tokens
  ids, mask, truncated = pipeline.tokenize_item_texts(dataset, 8)
  assert truncated == 1
  assert ids.shape == (4, 8) and mask[1].all() and not mask[0].all()


def test_itg_evaluator_compiles_once_across_runs(monkeypatch):
  dataset, table = _planted(8)
  config = _tiny_config()
  ids, mask, _ = pipeline.tokenize_item_texts(dataset, 8)
  evaluator = retrieval.TextGenerationLoss(
    "itg",
    dict(split="valid", num_items=8, batch_size=4),
    dataset=dataset,
    model_config=config,
    item_table=table,
    text_ids=ids,
    text_mask=mask,
  )
  traces = []
  phase1_losses = qformer.phase1_losses

  def counting(*args, **kwargs):
    traces.append(1)  # runs once per trace, not per call of the jitted fn
    return phase1_losses(*args, **kwargs)

  monkeypatch.setattr(qformer, "phase1_losses", counting)
  params = qformer.init_params(config, jax.random.key(0))
  first = dict(evaluator.run(params))
  second = dict(evaluator.run(jax.tree.map(lambda x: x * 1.0, params)))
  assert len(traces) == 1
  assert first == second and first["itg/loss"] > 0
