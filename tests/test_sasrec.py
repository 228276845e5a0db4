"""SASRec: shapes, causality, padding, the loss budget and training windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax.data import pipeline, processing
from ilm_jax.models import sasrec
from tests import data_helpers

NUM_ITEMS, LENGTH, DIM = 12, 6, 8


@pytest.fixture(scope="module")
def model_and_params():
  model = sasrec.SASRec(
    num_items=NUM_ITEMS,
    max_length=LENGTH,
    embed_dim=DIM,
    num_layers=2,
    num_heads=2,
    mlp_dim=16,
    dropout_rate=0.1,
  )
  items = jnp.zeros((1, LENGTH), jnp.int32)
  params = model.init(jax.random.key(0), items, jnp.ones((1, LENGTH), bool))
  return model, params["params"]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_shapes_and_parameter_count(model_and_params):
  model, params = model_and_params
  items = jnp.arange(2 * LENGTH).reshape(2, LENGTH) % NUM_ITEMS
  mask = jnp.ones((2, LENGTH), bool)
  hidden = model.apply({"params": params}, items, mask, method=model.encode)
  assert hidden.shape == (2, LENGTH, DIM)
  assert model.apply({"params": params}, items, mask).shape == (2, NUM_ITEMS)
  attention = 4 * (DIM * DIM + DIM)  # q, k, v, out kernels and biases
  mlp = DIM * 16 + 16 + 16 * DIM + DIM
  norms = 2 * 2 * DIM
  expected = (
    NUM_ITEMS * DIM  # item embedding, shared with the output layer
    + LENGTH * DIM  # positions
    + 2 * (attention + mlp + norms)
    + 2 * DIM  # final norm
  )
  assert _count(params) == expected


def test_outputs_are_causal(model_and_params):
  model, params = model_and_params
  items = jnp.array([[1, 2, 3, 4, 5, 6]])
  changed = items.at[0, 4].set(9)
  mask = jnp.ones((1, LENGTH), bool)
  a = model.apply({"params": params}, items, mask, method=model.encode)
  b = model.apply({"params": params}, changed, mask, method=model.encode)
  np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[0, 4:], b[0, 4:])


def test_padding_values_do_not_matter(model_and_params):
  model, params = model_and_params
  mask = jnp.array([[False, False, True, True, True, True]])
  a = jnp.array([[0, 0, 3, 4, 5, 6]])
  b = jnp.array([[7, 11, 3, 4, 5, 6]])
  scores_a = model.apply({"params": params}, a, mask)
  scores_b = model.apply({"params": params}, b, mask)
  np.testing.assert_allclose(scores_a, scores_b, rtol=1e-6, atol=1e-6)


def _loss(model, params, batch, fraction):
  return model.apply(
    {"params": params},
    batch["inputs"],
    batch["targets"],
    batch["target_mask"],
    deterministic=True,
    target_fraction=fraction,
    method=model.loss,
  )


def test_loss_budget_skips_only_what_does_not_fit(model_and_params):
  model, params = model_and_params
  mask = np.zeros((2, LENGTH), bool)
  mask[0, 3:] = True  # 3 real targets
  mask[1, 5:] = True  # 1 real target: 4 of 12 positions in all
  rng = np.random.default_rng(0)
  batch = dict(
    inputs=jnp.asarray(rng.integers(0, NUM_ITEMS, (2, LENGTH))),
    targets=jnp.asarray(rng.integers(0, NUM_ITEMS, (2, LENGTH))),
    target_mask=jnp.asarray(mask),
  )
  full_loss, full_metrics = _loss(model, params, batch, 1.0)
  # By hand: the mean negative log-likelihood over the 4 real targets.
  hidden = model.apply(
    {"params": params},
    batch["inputs"],
    batch["target_mask"],
    method=model.encode,
  )
  log_probs = jax.nn.log_softmax(
    model.apply({"params": params}, hidden, method=model.scores)
  )
  picked = np.take_along_axis(
    np.asarray(log_probs), np.asarray(batch["targets"])[..., None], -1
  )[..., 0]
  np.testing.assert_allclose(full_loss, -picked[mask].mean(), rtol=1e-5)
  assert float(full_metrics["targets_per_batch"]) == 4

  # A budget of 6 of 12 positions holds all 4 real targets: same loss.
  half_loss, half_metrics = _loss(model, params, batch, 0.5)
  np.testing.assert_allclose(half_loss, full_loss, rtol=1e-6)
  assert float(half_metrics["skipped_targets"]) == 0
  # A budget of 2 keeps the first two real targets in row-major order.
  small_loss, small_metrics = _loss(model, params, batch, 2 / 12)
  np.testing.assert_allclose(small_loss, -picked[0, 3:5].mean(), rtol=1e-5)
  assert float(small_metrics["skipped_targets"]) == 2


def _dataset(sequences, num_items):
  """A ProcessedDataset with exactly these sequences (no k-core)."""
  items = np.concatenate(sequences).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
  return processing.ProcessedDataset(
    name="toy",
    user_ids=[f"u{u}" for u in range(len(sequences))],
    item_ids=[f"i{i}" for i in range(num_items)],
    item_titles=[f"t{i}" for i in range(num_items)],
    item_texts=[f"t{i}" for i in range(num_items)],
    item_attributes={},
    sequence_offsets=offsets.astype(np.int64),
    sequence_items=items,
    ratings=np.full(len(items), 5.0, np.float32),
    timestamps=np.arange(len(items), dtype=np.int64),
    item_item_pairs=np.zeros((0, 2), np.int32),
    user_item_pairs=np.zeros((0, 2), np.int32),
    stats={},
  )


def test_training_windows_by_hand():
  ds = _dataset([[0, 1, 2, 3, 4, 5, 6], [6, 5, 4]], num_items=7)
  windows = pipeline.sasrec_windows(ds, max_length=3)
  assert len(windows) == 1  # user 1's training part (one item) has no pair
  example = data_helpers.element(windows, 0)
  # User 0: training part [0..4]; last 3 (input, next) pairs.
  np.testing.assert_array_equal(example["inputs"], [1, 2, 3])
  np.testing.assert_array_equal(example["targets"], [2, 3, 4])
  assert example["target_mask"].all()
  long_window = data_helpers.element(
    pipeline.sasrec_windows(ds, max_length=6), 0
  )
  np.testing.assert_array_equal(long_window["inputs"], [0, 0, 0, 1, 2, 3])
  np.testing.assert_array_equal(long_window["targets"], [0, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(
    long_window["target_mask"], [False, False, True, True, True, True]
  )


def test_user_states_are_the_last_hidden_state_and_score_by_dot(
  model_and_params,
):
  """5 windows in batches of 2 (the last call padded): states equal the
  last column of `encode`, and state . item equals SASRec's score."""
  model, params = model_and_params
  rng = np.random.default_rng(0)
  items = rng.integers(0, NUM_ITEMS, (5, LENGTH)).astype(np.int32)
  mask = np.arange(LENGTH)[None, :] >= rng.integers(0, LENGTH - 1, (5, 1))
  states = sasrec.user_states(model, params, items, mask, batch_size=2)
  assert states.shape == (5, DIM) and states.dtype == jnp.float32
  hidden = model.apply({"params": params}, items, mask, method=model.encode)
  np.testing.assert_allclose(states, hidden[:, -1], rtol=1e-5, atol=1e-6)
  table = params["item_embedding"]["embedding"]
  scores = model.apply({"params": params}, items, mask)
  np.testing.assert_allclose(states @ table.T, scores, rtol=1e-4, atol=1e-5)


def test_sequence_states_match_one_full_window_per_position(
  model_and_params,
):
  """Users of 1, 3 and 11 items (11 > max_length 6): row p equals the
  last state of the max_length window of the items before p, computed one
  position at a time; each user's first row is zeros."""
  model, params = model_and_params
  offsets = np.array([0, 1, 4, 15])
  items = np.random.default_rng(1).integers(0, NUM_ITEMS, 15).astype(np.int32)
  states = sasrec.sequence_states(model, params, offsets, items, batch_size=4)
  assert states.shape == (15, DIM) and states.dtype == np.float32
  for user in range(3):
    start = offsets[user]
    np.testing.assert_array_equal(states[start], np.zeros(DIM))
    for p in range(start + 1, offsets[user + 1]):
      before = items[max(start, p - LENGTH) : p]
      window = np.zeros(LENGTH, np.int32)
      window[LENGTH - len(before) :] = before
      mask = np.arange(LENGTH) >= LENGTH - len(before)
      hidden = model.apply(
        {"params": params}, window[None], mask[None], method=model.encode
      )
      np.testing.assert_allclose(
        states[p], hidden[0, -1], rtol=1e-5, atol=1e-5, err_msg=f"p={p}"
      )
