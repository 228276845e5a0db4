"""Phase-1 losses against hand-computed values."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax import losses


def _lse(*values):
  return math.log(sum(math.exp(v) for v in values))


def test_duplicate_mask_marks_identical_rows_only():
  cf = jnp.array(
    [[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [1.0, 2.001], [0.0, 0.0], [0.0, 0.0]]
  )
  expected = np.eye(6, dtype=bool)
  expected[0, 2] = expected[2, 0] = True
  expected[4, 5] = expected[5, 4] = True
  np.testing.assert_array_equal(losses.duplicate_mask(cf), expected)


# Two items with two queries each, two texts; E = 2.
ITEM_FEATURES = jnp.array([[[1.0, 0.0], [0.6, -0.8]], [[0.0, 1.0], [0.6, 0.8]]])
TEXT_FEATURES = jnp.array([[1.0, 0.0], [0.0, 1.0]])


def test_item_text_similarity_is_max_over_queries():
  # item0: max(1, .6)=1 and max(0, -.8)=0; item1: max(0, .6) and max(1, .8).
  np.testing.assert_allclose(
    losses.item_text_similarity(ITEM_FEATURES, TEXT_FEATURES),
    [[1.0, 0.0], [0.6, 1.0]],
    atol=1e-6,
  )


def test_item_text_contrastive_loss_by_hand():
  loss, metrics = losses.item_text_contrastive_loss(
    ITEM_FEATURES, TEXT_FEATURES, temperature=0.5, label_smoothing=0.1
  )

  # Logits = sim / 0.5 = [[2, 0], [1.2, 2]]; smoothed targets 0.95 / 0.05.
  def row(pos, neg):
    lse = _lse(pos, neg)
    return 0.95 * (lse - pos) + 0.05 * (lse - neg)

  i2t = (row(2.0, 0.0) + row(2.0, 1.2)) / 2
  t2i = (row(2.0, 1.2) + row(2.0, 0.0)) / 2  # columns [2, 1.2] and [0, 2]
  np.testing.assert_allclose(metrics["a2b_loss"], i2t, rtol=1e-6)
  np.testing.assert_allclose(metrics["b2a_loss"], t2i, rtol=1e-6)
  np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-6)
  assert float(metrics["accuracy"]) == 1.0


def test_contrastive_loss_asymmetric_directions_and_duplicates():
  sim = jnp.array([[0.0, 1.0], [0.5, 0.0]])
  _, metrics = losses.symmetric_contrastive_loss(sim, 1.0)
  a2b = ((_lse(0, 1) - 0) + (_lse(0.5, 0) - 0)) / 2
  b2a = ((_lse(0, 0.5) - 0) + (_lse(1, 0) - 0)) / 2
  np.testing.assert_allclose(metrics["a2b_loss"], a2b, rtol=1e-6)
  np.testing.assert_allclose(metrics["b2a_loss"], b2a, rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.0  # both rows prefer the other
  # Same item twice: both columns are positives, target mass 1/2 each.
  loss, metrics = losses.symmetric_contrastive_loss(
    sim, 1.0, positive_mask=jnp.ones((2, 2), bool)
  )
  a2b = ((_lse(0, 1) - 0.5) + (_lse(0.5, 0) - 0.25)) / 2
  np.testing.assert_allclose(metrics["a2b_loss"], a2b, rtol=1e-6)
  assert float(metrics["accuracy"]) == 1.0


def test_query_set_contrastive_loss_mean_pools_queries():
  items = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
  pairs = jnp.array([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]])
  # Pooled: items [1,1]/sqrt2, [1,0]; pairs [0,1], [.8,.4] -> [2,1]/sqrt5.
  sim = np.array(
    [[1 / math.sqrt(2), 3 / math.sqrt(10)], [0.0, 2 / math.sqrt(5)]]
  )
  np.testing.assert_allclose(
    losses.pooled_similarity(items, pairs), sim, atol=1e-6
  )
  loss, metrics = losses.query_set_contrastive_loss(items, pairs, 0.5)
  logits = sim / 0.5
  a2b = (
    (_lse(*logits[0]) - logits[0, 0]) + (_lse(*logits[1]) - logits[1, 1])
  ) / 2
  b2a = (
    (_lse(*logits[:, 0]) - logits[0, 0]) + (_lse(*logits[:, 1]) - logits[1, 1])
  ) / 2
  np.testing.assert_allclose(loss, (a2b + b2a) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["b2a_loss"], b2a, rtol=1e-5)


def test_item_text_matching_loss_by_hand():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  loss, metrics = losses.item_text_matching_loss(logits, jnp.array([1, 0, 0]))
  expected = (math.log(1 + math.e**2) + math.log(1 + math.e) + math.log(2)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 1 / 3)  # only the tie


def test_hard_negatives_follow_softmax_without_positives():
  logits = jnp.array([[5.0, 1.0, 0.0], [0.0, 5.0, 2.0], [3.0, 0.0, 5.0]])
  keys = jax.random.split(jax.random.key(0), 4000)
  sample = jax.jit(jax.vmap(losses.sample_hard_negatives, (0, None, None)))
  text_for_item, item_for_text = sample(keys, logits, jnp.eye(3, dtype=bool))
  text_for_item, item_for_text = map(np.asarray, (text_for_item, item_for_text))
  assert not (text_for_item == np.arange(3)).any()
  assert not (item_for_text == np.arange(3)).any()
  # Item 0 picks text 1 w.p. e^1/(e^1+e^0); text 0 picks item 2 w.p.
  # e^3/(e^0+e^3).
  np.testing.assert_allclose(
    (text_for_item[:, 0] == 1).mean(), math.e / (math.e + 1), atol=0.03
  )
  np.testing.assert_allclose(
    (item_for_text[:, 0] == 2).mean(), math.e**3 / (1 + math.e**3), atol=0.03
  )
  # Items 0 and 1 are the same item: item 0's only negative is text 2.
  same = jnp.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
  text_for_item, _ = sample(keys[:200], logits, same)
  assert (np.asarray(text_for_item)[:, 0] == 2).all()


def test_text_generation_loss_by_hand():
  # One sequence [BOS, 2, 1(pad)]: the only target is token 2, from row 0.
  logits = jnp.array([[[1.0, 0.0, 2.0], [5.0, 5.0, -5.0], [0.0, 0.0, 9.0]]])
  loss, metrics = losses.text_generation_loss(
    logits, jnp.array([[0, 2, 1]]), jnp.array([[1, 1, 0]]), label_smoothing=0.1
  )
  lse = _lse(1.0, 0.0, 2.0)
  expected = 0.9 * (lse - 2.0) + 0.1 * (lse - (1.0 + 0.0 + 2.0) / 3)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(metrics["num_tokens"]) == 1.0
  assert float(metrics["token_accuracy"]) == 1.0


def test_text_generation_loss_averages_over_tokens_not_sequences():
  logits = jnp.array(
    [[[0.0, 1.0], [9.0, 9.0], [9.0, 9.0]], [[0.0, 2.0], [3.0, 0.0], [9.0, 9.0]]]
  )
  ids = jnp.array([[0, 1, 0], [0, 1, 0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  loss, metrics = losses.text_generation_loss(logits, ids, mask, 0.0)
  # Targets: seq0 token 1 (row [0,1]); seq1 tokens 1 ([0,2]) and 0 ([3,0]).
  expected = ((_lse(0, 1) - 1) + (_lse(0, 2) - 2) + (_lse(3, 0) - 3)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(metrics["num_tokens"]) == 3.0


def test_contrastive_loss_uses_global_batch_when_sharded():
  # conftest.py gives the test process 8 virtual CPU devices.
  devices = np.array(jax.devices())
  assert devices.size >= 2, "run under tests/conftest.py (8 CPU devices)"
  mesh = jax.sharding.Mesh(devices, ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)

  def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

  batch = 2 * devices.size  # two rows per device
  items, texts = (
    unit(rng.normal(size=(batch, 3, 4))),
    unit(rng.normal(size=(batch, 4))),
  )
  fn = jax.jit(
    lambda a, b: losses.item_text_contrastive_loss(a, b, 0.1)[0],
    in_shardings=(shard, shard),
  )
  sharded_items = jax.device_put(items, shard)
  assert len(sharded_items.sharding.device_set) == devices.size
  loss = fn(sharded_items, jax.device_put(texts, shard))
  # Plain numpy over the global batch: every other row is a negative.
  logits = np.einsum("iqe,te->itq", items, texts).max(-1) / 0.1
  targets = 0.9 * np.eye(batch) + 0.1 / batch

  def cross_entropy(x):
    log_probs = x - x.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    return -(targets * log_probs).sum(1).mean()

  expected = (cross_entropy(logits) + cross_entropy(logits.T)) / 2
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))


def test_l2_normalize_value_and_gradient_by_hand():
  x = jnp.array([3.0, 4.0])
  np.testing.assert_allclose(losses.l2_normalize(x), [0.6, 0.8], rtol=1e-6)
  # d/dx sum(x / |x|) = (1 - x (x . 1) / |x|^2) / |x| = ([1, 1] - [3, 4] *
  # 7 / 25) / 5 = [0.032, -0.024].
  grad = jax.grad(lambda v: losses.l2_normalize(v).sum())(x)
  np.testing.assert_allclose(grad, [0.032, -0.024], rtol=1e-5)


def test_l2_normalize_has_finite_gradient_at_zero():
  # Below eps the function is x / eps: value 0, gradient 1 / eps. The
  # max(norm, eps) form gives NaN here.
  zeros = jnp.zeros((2, 3))
  np.testing.assert_array_equal(losses.l2_normalize(zeros), zeros)
  grad = jax.grad(lambda v: losses.l2_normalize(v).sum())(zeros)
  assert bool(jnp.isfinite(grad).all())
  np.testing.assert_allclose(grad, np.full((2, 3), 1e12), rtol=1e-5)


def test_contrastive_losses_have_finite_gradients_for_zero_features():
  # A collapsed Q-Former can output exactly-zero query sets.
  zeros = jnp.zeros((4, 3, 2))

  def ii(a):
    return losses.query_set_contrastive_loss(a, a, 0.07)[0]

  loss, grad = jax.value_and_grad(ii)(zeros)
  np.testing.assert_allclose(loss, math.log(4), rtol=1e-6)  # all logits 0
  assert bool(jnp.isfinite(grad).all())


def test_same_text_mask_ignores_padding():
  ids = jnp.array([[2, 5, 7, 0], [2, 5, 7, 9], [2, 5, 7, 0], [2, 5, 8, 0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
  # Rows 0 and 1 differ only under padding: identical texts. Row 2 has a
  # fourth real token (0), row 3 another third token.
  expected = np.eye(4, dtype=bool)
  expected[0, 1] = expected[1, 0] = True
  np.testing.assert_array_equal(losses.same_text_mask(ids, mask), expected)


def test_duplicate_pair_counts_by_hand():
  # Rows 0, 1: one item (and one text). Rows 2, 3: different items with one
  # text. Row 4: alone.
  same_item = np.eye(5, dtype=bool)
  same_item[0, 1] = same_item[1, 0] = True
  same_text = same_item.copy()
  same_text[2, 3] = same_text[3, 2] = True
  counts = losses.duplicate_pair_counts(
    jnp.asarray(same_item), jnp.asarray(same_text)
  )
  assert {k: float(v) for k, v in counts.items()} == {
    "duplicate_item_pairs": 1.0,
    "duplicate_text_pairs": 1.0,
    "rows_without_negative": 0.0,
  }
  everything = jnp.ones((3, 3), bool)
  counts = losses.duplicate_pair_counts(everything, everything)
  assert float(counts["duplicate_item_pairs"]) == 3.0  # C(3, 2)
  assert float(counts["duplicate_text_pairs"]) == 0.0  # same items already
  assert float(counts["rows_without_negative"]) == 3.0


def test_hard_negatives_never_draw_a_token_identical_text():
  # Rows 0 and 1 are different items with the same text: with flat logits
  # the only negatives of item 0 are texts 2 and 3 (and items 2, 3 of
  # text 0), each drawn half the time.
  ids = jnp.array([[2, 3, 4], [2, 3, 4], [2, 5, 6], [2, 7, 8]])
  positives = losses.same_text_mask(ids, jnp.ones_like(ids)) | jnp.eye(
    4, dtype=bool
  )
  keys = jax.random.split(jax.random.key(3), 2000)
  sample = jax.jit(jax.vmap(losses.sample_hard_negatives, (0, None, None)))
  text_for_item, item_for_text = map(
    np.asarray, sample(keys, jnp.zeros((4, 4)), positives)
  )
  for drawn in (text_for_item, item_for_text):
    assert set(np.unique(drawn[:, 0])) == {2, 3}
    assert set(np.unique(drawn[:, 1])) == {2, 3}
    np.testing.assert_allclose((drawn[:, 0] == 2).mean(), 0.5, atol=0.05)


def test_all_positive_rows_draw_uniformly():
  # Every row the same item: no negative exists, and the docstring promises
  # a uniform draw over the 8 indices (it used to always draw index 0).
  b, n = 8, 4000
  keys = jax.random.split(jax.random.key(5), n)
  sample = jax.jit(jax.vmap(losses.sample_hard_negatives, (0, None, None)))
  for logits in (
    jnp.zeros((b, b)),
    jax.random.uniform(jax.random.key(6), (b, b), minval=-14, maxval=14),
  ):
    text_for_item, item_for_text = sample(keys, logits, jnp.ones((b, b), bool))
    for drawn in (text_for_item, item_for_text):
      counts = np.bincount(np.asarray(drawn[:, 0]), minlength=b)
      # Binomial(4000, 1/8): mean 500, sd 21; 5 sd either side.
      assert counts.min() > 395 and counts.max() < 605, counts
  # A row with a single negative still always draws it, even when its logit
  # is far below the positives'.
  positives = jnp.ones((3, 3), bool).at[0, 2].set(False)
  logits = jnp.array([[50.0, 50.0, -50.0]] * 3)
  text_for_item, _ = sample(keys[:200], logits, positives)
  assert (np.asarray(text_for_item)[:, 0] == 2).all()
