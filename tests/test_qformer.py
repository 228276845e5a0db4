"""Q-Former: parameter layout, attention modes, phase-1 objective, MiniLM load."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml1m
from ilm_jax import losses
from ilm_jax.models import bert, qformer
from tests import references

H, FF, V, P, Q, CF, NCF, E = 8, 16, 20, 16, 3, 5, 2, 4  # tiny dims
T = 6  # max_text_len


def tiny_config(**overrides):
  config = ml1m.base_config().qformer.model
  config.update(
    dict(
      cf_dim=CF,
      num_cf_tokens=NCF,
      num_queries=Q,
      num_layers=2,
      hidden_size=H,
      num_heads=2,
      intermediate_size=FF,
      vocab_size=V,
      max_position_embeddings=P,
      embed_dim=E,
      max_text_len=T,
      pretrained="",
    )
  )
  config.update(overrides)
  return config


# Distinct weights, so the total checks each weight is applied once.
WEIGHTS = dict(itc=1.0, itm=0.5, itg=2.0, ii=0.25, ui=3.0)


@pytest.fixture(scope="module")
def config():
  # No dropout: its RNG ops double the compile time of the phase-1 graph on
  # a 2-core CPU; `test_dropout_only_when_not_deterministic` covers it.
  return tiny_config(losses=WEIGHTS, dropout_rate=0.0)


@pytest.fixture(scope="module")
def params(config):
  return qformer.init_params(config, jax.random.key(0))


def make_batch(batch_size=4, seed=0):
  rng = np.random.default_rng(seed)

  def cf():
    return rng.normal(size=(batch_size, CF)).astype(np.float32)

  lengths = np.array([T, 4, 3, T, 5, 2, 6, 3])[:batch_size]
  ids = rng.integers(2, V, size=(batch_size, T)).astype(np.int32)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  return dict(
    item_cf=cf(),
    text_ids=ids * mask,
    text_mask=mask,
    pair_cf=cf(),
    user_cf=cf(),
    user_item_cf=cf(),
  )


@pytest.fixture(scope="module")
def phase1_value_and_grad(config, params):
  """The training objective, compiled once for the tests that need it."""
  fn = jax.jit(
    jax.value_and_grad(
      lambda p, b: qformer.phase1_losses(p, b, jax.random.key(2), config),
      has_aux=True,
    )
  )
  return fn(params, make_batch())


def apply(config, params, method, *args):
  return qformer.make_model(config).apply(
    {"params": params}, *args, method=method
  )


def test_parameter_count_by_hand(config, params):
  attention = 4 * (H * H + H) + 2 * H
  ffn = H * FF + FF + FF * H + H + 2 * H
  layer = attention + 2 * ffn  # self-attention, text FFN, query FFN
  expected = (
    (V + P + 2) * H
    + 2 * H  # embeddings + LayerNorm
    + Q * H  # query tokens
    + CF * NCF * H
    + NCF * H
    + 2 * H  # CF input map + LayerNorm
    + 3 * layer
    + 2 * attention  # cross-attention on layers 0 and 2
    + 2 * (H * E + E)
    + (H * 2 + 2)  # item/text projections, ITM head
    + (H * H + H)
    + 2 * H
    + V  # LM transform, LayerNorm, output bias
    + 1
  )  # temperature
  shapes = qformer.param_shapes(tiny_config(num_layers=3))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == expected
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    lambda s: s.shape, qformer.param_shapes(config)
  )


def test_cross_attention_every_freq_layers_and_query_ffn_copied(params):
  shapes = qformer.param_shapes(tiny_config(num_layers=5))
  assert [
    i for i in range(5) if "cross_attention" in shapes[f"layers_{i}"]
  ] == [0, 2, 4]
  shapes = qformer.param_shapes(
    tiny_config(num_layers=4, cross_attention_freq=3)
  )
  assert [
    i for i in range(4) if "cross_attention" in shapes[f"layers_{i}"]
  ] == [0, 3]
  for i in range(2):
    layer = params[f"layers_{i}"]
    jax.tree.map(
      np.testing.assert_array_equal, layer["query_ffn"], layer["text_ffn"]
    )
  assert float(params["temperature"]) == pytest.approx(0.07)


def joint(config, params, cf, ids, mask, causal):
  # Eager: after the first call every op is cached, cheaper than compiling
  # one jitted graph per mode on a 2-core CPU.
  return apply(
    config, params, qformer.QFormer.encode_joint, cf, ids, mask, causal
  )


def test_multimodal_causal_mask_by_hand():
  # 2 queries, then text [t0 t1 t2 pad].
  mask = qformer.multimodal_causal_mask(2, jnp.array([[1, 1, 1, 0]]))
  expected = np.array(
    [
      # q0 q1 t0 t1 t2 pad
      [1, 1, 0, 0, 0, 0],  # q0: queries only
      [1, 1, 0, 0, 0, 0],  # q1
      [1, 1, 1, 0, 0, 0],  # t0: all queries and itself
      [1, 1, 1, 1, 0, 0],  # t1
      [1, 1, 1, 1, 1, 0],  # t2
      [1, 1, 1, 1, 1, 0],  # pad row: never a key
    ],
    bool,
  )
  np.testing.assert_array_equal(mask[0], expected)


def test_bidirectional_and_unimodal_masks_by_hand():
  text_mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  itm = qformer.bidirectional_mask(2, text_mask)
  np.testing.assert_array_equal(itm[0], np.array([[1, 1, 1, 1, 0]] * 5, bool))
  np.testing.assert_array_equal(itm[1], np.array([[1, 1, 1, 0, 0]] * 5, bool))
  text_only = qformer.unimodal_text_mask(text_mask)
  np.testing.assert_array_equal(text_only[0], np.array([[1, 1, 0]] * 3, bool))
  assert qformer.query_only_mask(2, 3).shape == (2, 3, 3)
  assert bool(qformer.query_only_mask(2, 3).all())


@pytest.mark.slow
def test_sections_equal_the_pure_losses_on_the_model_outputs(config, params):
  """Each section is its `losses` function on the model's passes, computed
  here step by step; the total is the config-weighted sum of the sections."""
  batch = make_batch(batch_size=6, seed=3)
  batch["item_cf"][4] = batch["item_cf"][2]  # a duplicate item
  rng = jax.random.key(5)
  total, metrics = qformer.phase1_losses(
    params, batch, rng, config, deterministic=True
  )
  model = qformer.make_model(config)
  ids, mask, cf = batch["text_ids"], batch["text_mask"], batch["item_cf"]

  def run(method, *args):
    return model.apply({"params": params}, *args, method=method)

  def features(cf_input):
    return run(
      qformer.QFormer.item_features,
      run(qformer.QFormer.encode_queries, cf_input),
    )

  temperature = float(run(qformer.QFormer.temperature_value))
  item = features(cf)
  text = run(
    qformer.QFormer.text_features, run(qformer.QFormer.encode_text, ids, mask)
  )
  same_item = losses.duplicate_mask(cf)
  positives = same_item | losses.same_text_mask(ids, mask)
  assert float(metrics["batch/duplicate_item_pairs"]) == 1.0
  expected = {}
  expected["itc"] = losses.item_text_contrastive_loss(
    item, text, temperature, positives, config.itc_label_smoothing
  )[0]
  logits = losses.item_text_similarity(item, text) / temperature
  neg_text, neg_item = losses.sample_hard_negatives(
    jax.random.split(rng)[1], logits, positives
  )
  queries, _ = run(
    qformer.QFormer.encode_joint,
    np.concatenate([cf, cf[neg_item], cf]),
    np.concatenate([ids, ids, ids[neg_text]]),
    np.concatenate([mask, mask, mask[neg_text]]),
    False,
  )
  expected["itm"] = losses.item_text_matching_loss(
    run(qformer.QFormer.itm_logits, queries), jnp.array([1] * 6 + [0] * 12)
  )[0]
  bos_ids = ids.copy()
  bos_ids[:, 0] = config.decoder_bos_id
  _, text_out = run(qformer.QFormer.encode_joint, cf, bos_ids, mask, True)
  expected["itg"] = losses.text_generation_loss(
    run(qformer.QFormer.lm_logits, text_out),
    ids,
    mask,
    config.itg_label_smoothing,
  )[0]
  for name, key_a, key_b in (
    ("ii", "item_cf", "pair_cf"),
    ("ui", "user_cf", "user_item_cf"),
  ):
    expected[name] = losses.query_set_contrastive_loss(
      features(batch[key_a]),
      features(batch[key_b]),
      temperature,
      losses.duplicate_mask(batch[key_a]) | losses.duplicate_mask(batch[key_b]),
    )[0]
  for name, value in expected.items():
    np.testing.assert_allclose(
      metrics[f"{name}/loss"], value, rtol=1e-5, err_msg=name
    )
  np.testing.assert_allclose(
    total,
    sum(WEIGHTS[name] * float(value) for name, value in expected.items()),
    rtol=1e-5,
  )


def test_itg_mask_text_is_causal_and_queries_ignore_text(config, params):
  batch = make_batch()
  ids = jnp.asarray(batch["text_ids"])
  changed = ids.at[0, 3].set((ids[0, 3] + 1) % V)  # row 0 has 6 valid tokens
  queries, text = joint(
    config, params, batch["item_cf"], ids, batch["text_mask"], causal=True
  )
  queries2, text2 = joint(
    config, params, batch["item_cf"], changed, batch["text_mask"], causal=True
  )
  np.testing.assert_allclose(text[0, :3], text2[0, :3], atol=1e-6)
  assert np.abs(text[0, 3:] - text2[0, 3:]).max() > 1e-3
  np.testing.assert_allclose(queries, queries2, atol=1e-6)
  # ITC's queries-only pass gives the same query states: queries see no text.
  alone = apply(
    config, params, qformer.QFormer.encode_queries, batch["item_cf"]
  )
  np.testing.assert_allclose(alone, queries, atol=1e-5)


def test_itm_mask_everything_sees_everything_but_padding(config, params):
  batch = make_batch()
  ids = jnp.asarray(batch["text_ids"])
  queries, text = joint(
    config, params, batch["item_cf"], ids, batch["text_mask"], causal=False
  )
  last = ids.at[0, T - 1].set((ids[0, T - 1] + 1) % V)
  queries2, text2 = joint(
    config, params, batch["item_cf"], last, batch["text_mask"], causal=False
  )
  assert np.abs(queries[0] - queries2[0]).max() > 1e-3
  assert np.abs(text[0, 0] - text2[0, 0]).max() > 1e-5  # [CLS] sees the end
  np.testing.assert_allclose(queries[1:], queries2[1:], atol=1e-6)
  # Row 2 has 3 valid tokens: its padding is invisible in every mode.
  padded = ids.at[2, 4].set(7)
  for causal in (False, True):
    queries, text = joint(
      config, params, batch["item_cf"], ids, batch["text_mask"], causal=causal
    )
    queries2, text2 = joint(
      config,
      params,
      batch["item_cf"],
      padded,
      batch["text_mask"],
      causal=causal,
    )
    np.testing.assert_allclose(queries, queries2, atol=1e-6)
    np.testing.assert_allclose(text[2, :3], text2[2, :3], atol=1e-6)
  text = apply(
    config, params, qformer.QFormer.encode_text, ids, batch["text_mask"]
  )
  text2 = apply(
    config, params, qformer.QFormer.encode_text, padded, batch["text_mask"]
  )
  np.testing.assert_allclose(text[2, :3], text2[2, :3], atol=1e-6)


def test_cf_dim_mismatch_is_a_clear_error(config, params):
  batch = make_batch()
  batch["item_cf"] = np.zeros((4, CF + 1), np.float32)
  with pytest.raises(ValueError, match="cf_dim"):
    qformer.phase1_losses(params, batch, jax.random.key(0), config)
  with pytest.raises(ValueError, match="cf_dim"):
    qformer.encode_items(params, batch["item_cf"], config)
  with pytest.raises(ValueError, match="cf_dim"):
    apply(config, params, qformer.QFormer.encode_queries, batch["item_cf"])


def test_bad_batches_are_rejected(config, params):
  batch = make_batch()
  too_long = dict(
    batch,
    text_ids=np.ones((4, T + 1), np.int32),
    text_mask=np.ones((4, T + 1), np.int32),
  )
  with pytest.raises(ValueError, match="max_text_len"):
    qformer.phase1_losses(params, too_long, jax.random.key(0), config)
  no_pair = {k: v for k, v in batch.items() if k != "pair_cf"}
  with pytest.raises(ValueError, match="pair_cf"):
    qformer.phase1_losses(params, no_pair, jax.random.key(0), config)


def test_total_is_the_weighted_sum(phase1_value_and_grad):
  (total, metrics), _ = phase1_value_and_grad
  expected = sum(w * float(metrics[f"{n}/loss"]) for n, w in WEIGHTS.items())
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total)
  assert float(metrics["itg/num_tokens"]) == (T - 1) + 3 + 2 + (T - 1)
  for name in WEIGHTS:  # in-batch losses of 4 rows start near log(4)
    assert 0.0 < float(metrics[f"{name}/loss"]) < 10.0, name


def test_zero_weight_skips_the_loss_and_its_inputs(params):
  config = tiny_config(losses=dict(itc=1.0, itm=0.0, itg=1.0, ii=0.0, ui=0.0))
  batch = {
    k: v
    for k, v in make_batch().items()
    if k in ("item_cf", "text_ids", "text_mask")
  }
  # Tracing is enough to see which losses run; nothing is compiled.
  _, metrics = jax.eval_shape(
    lambda p: qformer.phase1_losses(p, batch, jax.random.key(1), config), params
  )
  assert sorted(metrics) == [
    "batch/duplicate_item_pairs",
    "batch/duplicate_text_pairs",
    "batch/rows_without_negative",
    "itc/a2b_loss",
    "itc/accuracy",
    "itc/b2a_loss",
    "itc/loss",
    "itg/loss",
    "itg/num_tokens",
    "itg/token_accuracy",
    "loss",
    "temperature",
  ]
  config.losses = dict(itc=0.0, itm=0.0, itg=0.0, ii=0.0, ui=0.0)
  with pytest.raises(ValueError, match="All phase-1 loss weights are 0"):
    qformer.phase1_losses(params, batch, jax.random.key(1), config)


def test_gradients_reach_queries_and_cf_input(phase1_value_and_grad):
  _, grads = phase1_value_and_grad
  for path in (
    ("query_tokens",),
    ("cf_input", "kernel"),
    ("cf_norm", "scale"),
    ("layers_0", "cross_attention", "value", "kernel"),
    ("layers_1", "query_ffn", "output", "kernel"),
    ("layers_1", "text_ffn", "output", "kernel"),
    ("itm_head", "kernel"),
    ("lm_transform", "kernel"),
    ("item_proj", "kernel"),
    ("text_proj", "kernel"),
    ("temperature",),
  ):
    leaf = grads
    for key in path:
      leaf = leaf[key]
    assert np.abs(np.asarray(leaf)).max() > 0, path
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_dropout_only_when_not_deterministic(params):
  model = qformer.make_model(tiny_config(dropout_rate=0.5))
  cf = make_batch()["item_cf"]

  def run(deterministic, seed=0):
    return model.apply(
      {"params": params},
      cf,
      deterministic,
      method=qformer.QFormer.encode_queries,
      rngs={"dropout": jax.random.key(seed)},
    )

  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  np.testing.assert_array_equal(run(False, 0), run(False, 0))
  assert np.abs(run(False, 0) - run(True)).max() > 1e-2
  assert np.abs(run(False, 0) - run(False, 1)).max() > 1e-2


def test_encode_items_batches_and_pads(config, params):
  cf = make_batch(batch_size=5)["item_cf"]
  out = qformer.encode_items(params, cf, config, batch_size=2)
  assert out.shape == (5, Q, H)
  direct = apply(config, params, qformer.QFormer.encode_queries, cf)
  np.testing.assert_allclose(out, direct, atol=1e-5)


@pytest.mark.slow
@pytest.mark.reference
def test_pretrained_text_branch_matches_transformers_bert():
  config = ml1m.base_config().qformer.model
  config.num_layers = 7  # one layer beyond the checkpoint's six
  # Zeros stand in for a random init: whatever the loader does not own must
  # come back untouched.
  zeros = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype), qformer.param_shapes(config)
  )
  params = qformer.load(zeros, config)
  for i in range(6):
    layer = params[f"layers_{i}"]
    jax.tree.map(
      np.testing.assert_array_equal, layer["query_ffn"], layer["text_ffn"]
    )
  assert not np.asarray(
    params["layers_6"]["text_ffn"]["output"]["kernel"]
  ).any()
  assert not np.asarray(
    params["layers_0"]["cross_attention"]["query"]["kernel"]
  ).any()
  assert not np.asarray(params["query_tokens"]).any()

  texts = [
    "Toy Story (1995)",
    "A prison drama about hope and friendship.",
    "hello world",
  ]
  tokenizer = bert.WordPieceTokenizer.from_pretrained(max_length=16)
  encoded = tokenizer.encode(texts)
  config.num_layers = 6  # compare the six pretrained layers
  params6 = {k: v for k, v in params.items() if k != "layers_6"}
  hidden = apply(
    config, params6, qformer.QFormer.encode_text, encoded.ids, encoded.mask
  )
  ours = np.asarray(bert.mean_pool(hidden, encoded.mask))
  expected = references.minilm_sentence_embeddings(encoded.ids, encoded.mask)
  np.testing.assert_allclose(ours, expected, atol=1e-4)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))


def test_identical_texts_are_positives_in_itc_and_never_itm_negatives(
  params, monkeypatch
):
  # Rows 0 and 1: different items, token-identical texts (padding differs).
  # Rows 2 and 3: one item with two texts.
  config = tiny_config(
    losses=dict(itc=1.0, itm=1.0, itg=0.0, ii=0.0, ui=0.0), dropout_rate=0.0
  )
  batch = make_batch()
  batch = {k: batch[k].copy() for k in ("item_cf", "text_ids", "text_mask")}
  batch["text_mask"][:2] = [1, 1, 1, 0, 0, 0]
  batch["text_ids"][:2] = [[2, 7, 9, 0, 0, 0], [2, 7, 9, 5, 5, 5]]
  batch["item_cf"][3] = batch["item_cf"][2]
  expected = np.eye(4, dtype=bool)
  expected[0, 1] = expected[1, 0] = expected[2, 3] = expected[3, 2] = True
  seen = {}

  def spy(name, fn):
    def wrapped(*args):
      seen[name] = np.asarray(args[-1] if name == "itm" else args[3])
      return fn(*args)

    return wrapped

  monkeypatch.setattr(
    qformer.losses,
    "item_text_contrastive_loss",
    spy("itc", qformer.losses.item_text_contrastive_loss),
  )
  monkeypatch.setattr(
    qformer.losses,
    "sample_hard_negatives",
    spy("itm", qformer.losses.sample_hard_negatives),
  )
  _, metrics = qformer.phase1_losses(
    params, batch, jax.random.key(0), config, deterministic=True
  )
  np.testing.assert_array_equal(seen["itc"], expected)
  np.testing.assert_array_equal(seen["itm"], expected)
  assert float(metrics["batch/duplicate_text_pairs"]) == 1.0
  assert float(metrics["batch/duplicate_item_pairs"]) == 1.0
  assert float(metrics["batch/rows_without_negative"]) == 0.0


def test_feature_normalisation_has_finite_gradient_at_zero():
  grad = jax.grad(lambda x: qformer._normalize(x).sum())(jnp.zeros((2, 4)))
  assert bool(jnp.isfinite(grad).all())
  np.testing.assert_allclose(qformer._normalize(jnp.array([0.0, 2.0])), [0, 1])


def test_removed_default_config_names_a_replacement_that_exists():
  # The shared case itm_duplicate_items_texts.py still calls the removed
  # helper; its error must point at a working replacement.
  with pytest.raises(AttributeError, match="was removed") as raised:
    qformer.default_qformer_config  # noqa: B018
  (replacement,) = [
    word for word in str(raised.value).split() if word.startswith("configs.")
  ]
  config = eval(replacement, {"configs": sys.modules["configs"]})  # noqa: S307
  assert set(config) == set(tiny_config())
  assert "losses" in config  # what phase1_losses reads beside the sizes
  with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
    qformer.no_such_name  # noqa: B018
  assert not hasattr(qformer, "default_qformer_config")
