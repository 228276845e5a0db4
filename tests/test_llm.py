"""Unit tests of the Flax Llama decoder on tiny random configs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ilm_jax import sharding
from ilm_jax.models import llm, llm_loading

TINY = llm.LlamaConfig(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  rope_theta=100_000.0,
  rms_norm_eps=1e-5,
  tie_word_embeddings=False,
  attention_bias=True,
)

# SmolLM2-135M (30 layers, d=576, 9/3 heads, ...).
SMOLLM2 = llm.SMOLLM2_135M


def init_params(config, seed=0):
  """Random params in numpy: jitting flax's init costs more compile time."""
  model = llm.Llama(config)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )
  rng = np.random.default_rng(seed)

  def draw(path, x):
    # Norm scales near one; everything else (biases too) small and random.
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    noise = rng.normal(0.0, 0.05, x.shape).astype(np.float32)
    return jnp.asarray(noise + 1.0 if is_scale else noise)

  params = nn.meta.unbox(shapes["params"])
  return model, jax.tree_util.tree_map_with_path(draw, params)


# Jitted once per (model, keyword set): eager linen calls compile op by op.
@functools.partial(
  jax.jit, static_argnames=("model", "method", "return_hidden", "last_only")
)
def apply(
  model,
  params,
  *args,
  method=None,
  return_hidden=False,
  last_only=False,
  **kwargs,
):
  if return_hidden:
    kwargs["return_hidden"] = True
  if last_only:
    kwargs["last_only"] = True
  return model.apply({"params": params}, *args, method=method, **kwargs)


def left_padded_batch(seed=0, length=9):
  ids = np.random.default_rng(seed).integers(0, 97, (3, length), np.int32)
  mask = np.ones((3, length), np.int32)
  mask[0, :4] = 0
  mask[2, :1] = 0
  return ids, jnp.asarray(mask)


def test_smollm2_shape_is_the_embedded_checkpoints():
  # The GGUF header, read without the weights; its eps is float32-rounded.
  header = llm_loading.architecture("smollm2-135m-instruct")
  assert header.rms_norm_eps == pytest.approx(SMOLLM2.rms_norm_eps, rel=1e-6)
  assert header == SMOLLM2.replace(rms_norm_eps=header.rms_norm_eps)


def _prefilled_cache(model, params, ids, mask):
  """A 12-slot cache holding the batch's first 8 columns (decoding tests
  then run the ninth on top of it)."""
  cache = model.init_cache(3, 12)
  _, cache = apply(
    model, params, input_ids=ids[:, :8], attention_mask=mask[:, :8], cache=cache
  )
  return cache


def test_smollm2_parameter_count_and_logical_axes():
  shapes = jax.eval_shape(
    llm.Llama(SMOLLM2).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  # Hand count: embeddings 49152*576; per layer q,o 576^2 each, k,v 576*192
  # each, MLP 3*576*1536, two norms 2*576; final norm 576.
  per_layer = 2 * 576**2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
  assert count == 49152 * 576 + 30 * per_layer + 576 == 134_515_008
  specs = llm.logical_partition_specs(SMOLLM2)
  assert tuple(specs["embedding"]) == ("vocab", "embed")
  assert tuple(specs["layers"]["q"]) == ("layers", "embed", "heads", "head_dim")
  assert tuple(specs["layers"]["k"]) == (
    "layers",
    "embed",
    "kv_heads",
    "head_dim",
  )
  assert tuple(specs["layers"]["down"]) == ("layers", "mlp", "embed")
  assert "lm_head" not in specs  # tied


def test_padding_does_not_change_real_token_logits():
  model, params = init_params(TINY)
  ids, mask = left_padded_batch()
  padded, _ = apply(model, params, input_ids=ids, attention_mask=mask)
  alone, _ = apply(model, params, input_ids=ids[:1, 4:])
  np.testing.assert_allclose(padded[0, 4:], alone[0], atol=1e-5)


def test_kv_cache_decoding_equals_full_recomputation():
  model, params = init_params(TINY)
  ids, mask = left_padded_batch()
  full, _ = apply(model, params, input_ids=ids, attention_mask=mask)
  cache = model.init_cache(3, 12)
  # A 5-token prefill, a 2-token chunk, then single tokens.
  chunks = [(0, 5), (5, 7), (7, 8), (8, 9)]
  pieces = []
  for start, end in chunks:
    logits, cache = apply(
      model,
      params,
      input_ids=ids[:, start:end],
      attention_mask=mask[:, start:end],
      cache=cache,
    )
    pieces.append(logits)
  incremental = jnp.concatenate(pieces, axis=1)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(
    np.asarray(incremental)[real], np.asarray(full)[real], atol=1e-5
  )
  assert int(cache["index"]) == 9
  np.testing.assert_array_equal(cache["next_position"], mask.sum(1))
  np.testing.assert_array_equal(cache["mask"][:, :9], real)
  assert not cache["mask"][:, 9:].any()


def test_last_only_prefill_gives_the_last_column_and_the_same_cache():
  model, params = init_params(TINY)
  ids, mask = left_padded_batch()
  (full, full_cache), (last, last_cache) = (
    apply(
      model,
      params,
      input_ids=ids,
      attention_mask=mask,
      cache=model.init_cache(3, 12),
      last_only=last_only,
    )
    for last_only in (False, True)
  )
  assert last.shape == (3, 1, TINY.vocab_size)
  np.testing.assert_allclose(last, full[:, -1:], atol=1e-6)
  for name in full_cache:
    np.testing.assert_array_equal(last_cache[name], full_cache[name])


def test_input_embeddings_path_equals_token_id_path():
  model, params = init_params(TINY)
  ids, mask = left_padded_batch()
  by_ids, _ = apply(model, params, input_ids=ids, attention_mask=mask)
  rows = apply(model, params, ids, method=llm.Llama.embed)
  np.testing.assert_array_equal(rows, params["embedding"][ids])
  by_embeds, _ = apply(model, params, input_embeds=rows, attention_mask=mask)
  np.testing.assert_allclose(by_embeds, by_ids, atol=1e-6)


def test_hidden_states_and_logits_method_compose():
  model, params = init_params(TINY)
  ids, _ = left_padded_batch()
  logits, _ = apply(model, params, input_ids=ids)
  hidden, _ = apply(model, params, input_ids=ids, return_hidden=True)
  again = apply(model, params, hidden, method=llm.Llama.logits)
  assert hidden.shape == (3, 9, TINY.hidden_size)
  np.testing.assert_allclose(again, logits, atol=1e-6)


def test_rope_depends_on_relative_positions_only():
  # Rotary attention depends on relative positions only, so shifting every
  # position by a constant must leave the logits unchanged.
  model, params = init_params(TINY)
  ids, _ = left_padded_batch()
  base, _ = apply(model, params, input_ids=ids)
  positions = jnp.broadcast_to(jnp.arange(9) + 37, (3, 9))
  shifted, _ = apply(model, params, input_ids=ids, positions=positions)
  np.testing.assert_allclose(shifted, base, atol=1e-4)
  # A different spacing of positions must change them (positions matter).
  spread, _ = apply(model, params, input_ids=ids, positions=positions * 3)
  assert np.abs(spread - base).max() > 1e-3


@pytest.mark.slow
def test_bfloat16_frozen_llm_gives_float32_input_gradients():
  model, params = init_params(TINY)
  bf16 = TINY.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model16 = llm.Llama(bf16)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  ids, mask = left_padded_batch()
  embeds = params["embedding"][ids]  # float32, like an adapter's output

  def loss(model, params, embeds):
    logits, _ = apply(model, params, input_embeds=embeds, attention_mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  value32, grad32 = jax.value_and_grad(loss, argnums=2)(model, params, embeds)
  value16, grad16 = jax.jit(
    jax.value_and_grad(loss, argnums=2), static_argnums=0
  )(model16, params16, embeds)
  assert grad16.dtype == jnp.float32
  assert np.isfinite(grad16).all()
  assert abs(float(value16) - float(value32)) < 0.02 * abs(float(value32))
  cosine = jnp.vdot(grad16, grad32) / (
    jnp.linalg.norm(grad16) * jnp.linalg.norm(grad32)
  )
  assert float(cosine) > 0.98


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling_changes_only_long_wavelengths(kind):
  base = llm.rope_inverse_frequencies(SMOLLM2)
  scaled = llm.rope_inverse_frequencies(
    SMOLLM2.replace(rope_scaling=llm.RopeScaling(kind, 8.0, 1.0, 4.0, 64))
  )
  if kind == "linear":
    np.testing.assert_allclose(scaled, base / 8, rtol=1e-6)
  else:
    # Wavelengths under 64/4 tokens keep their frequency, those over 64 are
    # slowed 8x, those between are interpolated.
    wavelen = 2 * np.pi / base
    np.testing.assert_allclose(scaled[wavelen < 16], base[wavelen < 16])
    np.testing.assert_allclose(
      scaled[wavelen > 64], base[wavelen > 64] / 8, rtol=1e-6
    )
    mid = (wavelen > 16) & (wavelen < 64)
    assert mid.any()
    assert np.all((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8))


def test_sharded_forward_with_config_rules_matches_one_device():
  # The mesh rules of configs/common.py on a (data, fsdp, model) = (1, 2, 2)
  # mesh of the virtual CPU devices: embed is split over fsdp, vocab,
  # heads and mlp over model.
  config = TINY.replace(vocab_size=96)
  model, params = init_params(config)
  ids, mask = left_padded_batch()
  expected, _ = apply(model, params, input_ids=ids, attention_mask=mask)
  devices = np.array(jax.devices()[:4]).reshape(1, 2, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "model"))
  rules = [tuple(r) for r in common.mesh_config().logical_axis_rules]
  shardings = nn.logical_to_mesh_sharding(
    llm.logical_partition_specs(config), mesh, rules
  )
  assert tuple(shardings["layers"]["q"].spec) == (None, "fsdp", "model", None)
  sharded = jax.device_put(params, shardings)
  assert len(sharded["layers"]["gate"].addressable_shards) == 4
  logits, _ = apply(model, sharded, input_ids=ids, attention_mask=mask)
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_unstacked_layers_give_the_scanned_results():
  model, params = init_params(TINY)
  ids, mask = left_padded_batch()
  layers = llm.unstack_layers(params)
  assert len(layers) == TINY.num_layers
  np.testing.assert_array_equal(layers[1]["q"], params["layers"]["q"][1])
  outputs = {}
  for name, extra in (("scanned", {}), ("unstacked", {"layer_params": layers})):
    cache = _prefilled_cache(model, params, ids, mask)
    # The decoding pattern: one token on top of a prefilled cache.
    outputs[name] = apply(
      model,
      params,
      input_ids=ids[:, 8:],
      attention_mask=mask[:, 8:],
      cache=cache,
      **extra,
    )
  (scanned, scanned_cache), (unstacked, unstacked_cache) = outputs.values()
  np.testing.assert_allclose(unstacked, scanned, atol=1e-5)
  for name in scanned_cache:
    np.testing.assert_allclose(
      unstacked_cache[name], scanned_cache[name], atol=1e-6
    )


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_input_gradients_with_less_memory():
  model, params = init_params(TINY)
  remat = llm.Llama(TINY.replace(remat=True))
  ids, mask = left_padded_batch()
  embeds = params["embedding"][ids]

  def loss(model, embeds):
    logits, _ = apply(model, params, input_embeds=embeds, attention_mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  (value, g), (value_remat, g_remat) = grad(model, embeds), grad(remat, embeds)
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)

  # Fewer residuals kept for the backward pass: the saved activations.
  def saved_bytes(model):
    _, vjp = jax.vjp(lambda e: loss(model, e), embeds)
    return sum(x.nbytes for x in jax.tree.leaves(vjp))

  assert saved_bytes(remat) < saved_bytes(model)


def test_activation_constraints_apply_under_the_mesh_and_keep_results():
  # (data, fsdp, model) = (2, 1, 2): heads and MLP columns over model.
  config = TINY.replace(vocab_size=96)
  model, params = init_params(config)
  ids, mask = left_padded_batch()
  ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])
  expected, _ = apply(model, params, input_ids=ids, attention_mask=mask)
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(shape=dict(data=2, fsdp=1, model=2))),
    jax.devices()[:4],
  )
  rules = sharding.activation_rules(common.mesh_config(), mesh)
  assert dict(rules)["activation_batch"] == ("data", "fsdp")
  assert dict(rules)["activation_heads"] == "model"

  def forward(params, ids, mask):
    return model.apply({"params": params}, input_ids=ids, attention_mask=mask)[
      0
    ]

  def constrained(params, ids, mask):  # as train.make_train_step traces
    with (
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
      nn.logical_axis_rules(rules),
    ):
      return forward(params, ids, mask)

  lowered = jax.jit(constrained).lower(params, ids, mask)
  params_on_mesh = jax.device_put(params, sharding.replicated(mesh))
  logits = jax.jit(constrained)(params_on_mesh, ids, mask)
  text = lowered.as_text()
  # Embeddings, q, k, v, gate, up and each layer's output are constrained.
  assert text.count("sharding_constraint") >= 7
  assert (
    jax.jit(forward)
    .lower(params, ids, mask)
    .as_text()
    .count("sharding_constraint")
    == 0
  )  # no mesh, no rules: no constraints
  np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_frozen_bf16_matmuls_match_float32_and_give_input_gradients(tied):
  """`frozen_matmul="xla"`: the dense layers and the head in bf16 operands
  with f32 accumulation against the all-f32 model on the same params."""
  config = TINY.replace(tie_word_embeddings=tied)
  model, params = init_params(config)
  frozen = llm.Llama(config.replace(frozen_matmul="xla"))
  ids, mask = left_padded_batch()
  embeds = params["embedding"][ids]
  # The reference: the f32 model on bf16-rounded weights, so the only
  # difference left is the rounding of the activations at each matmul.
  rounded = jax.tree.map(
    lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params
  )

  def loss(model, params, embeds):
    logits, _ = apply(model, params, input_embeds=embeds, attention_mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

  grad_fn = jax.value_and_grad(loss, argnums=2, has_aux=True)
  (value32, logits32), grad32 = grad_fn(model, rounded, embeds)
  (value16, logits16), grad16 = grad_fn(frozen, params, embeds)
  assert logits16.dtype == jnp.float32 and grad16.dtype == jnp.float32
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) < 0.02 * scale
  assert float(jnp.abs(logits16 - logits32).max()) > 0  # bf16 did run
  assert abs(float(value16) - float(value32)) < 0.01 * abs(float(value32))
  cosine = jnp.vdot(grad16, grad32) / (
    jnp.linalg.norm(grad16) * jnp.linalg.norm(grad32)
  )
  assert float(cosine) > 0.99
  # No gradient reaches the matmul weights (norm scales and biases are
  # ordinary parameters and still get one).
  weight_grads = jax.grad(lambda p: loss(frozen, p, embeds)[0])(params)
  dense = ("q", "k", "v", "o", "gate", "up", "down", "lm_head", "embedding")
  grads = {
    jax.tree_util.keystr(path): float(jnp.abs(g).max())
    for path, g in jax.tree_util.tree_leaves_with_path(weight_grads)
  }
  assert {k: v for k, v in grads.items() if k.endswith(dense_keys(dense))} == {
    k: 0.0 for k in grads if k.endswith(dense_keys(dense))
  }
  assert max(grads.values()) > 0  # the norm scales do get gradients


def dense_keys(names):
  return tuple(f"['{n}']" for n in names)


@pytest.mark.parametrize("tied", [False, True])
def test_decode_step_inputs_give_the_same_step_logits(tied):
  """The prepared head and unstacked layers of `decode_step_inputs` give
  the step results of the plain call, with and without frozen matmuls."""
  for frozen_matmul in (None, "xla"):
    config = TINY.replace(tie_word_embeddings=tied, frozen_matmul=frozen_matmul)
    model, params = init_params(config)
    ids, mask = left_padded_batch()
    cache = _prefilled_cache(model, params, ids, mask)
    prepared = model.decode_step_inputs(params)
    assert ("output_head" in prepared) == (frozen_matmul is not None)
    step = dict(input_ids=ids[:, 8:], attention_mask=mask[:, 8:], cache=cache)
    plain, _ = apply(model, params, **step)
    fast, _ = apply(model, params, **step, **prepared)
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=1e-5)


LORA_TARGETS = ("q", "o", "down")  # o: a weight with two input axes


def _lora_params(config, seed=1):
  """LoRA factors with both A and B random (B is zero at init)."""
  model = llm.Llama(config)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )["params"]["layers"]
  rng = np.random.default_rng(seed)
  return {
    name: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(np.float32))
    for name, x in nn.meta.unbox(shapes).items()
    if llm.LORA_PARAM.match(name)
  }


def _merged(params, lora, config):
  """The reference: each target weight W + alpha/r * A B (per layer)."""
  layers = dict(params["layers"])
  scale = config.lora_alpha / config.lora_rank
  for name in config.lora_targets:
    a, b = lora[f"{name}_lora_a"], lora[f"{name}_lora_b"]
    in_dims = a.ndim - 2  # A is [layers, *in, r]
    update = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)
    assert update.shape == layers[name].shape and in_dims >= 1
    layers[name] = layers[name] + scale * update
  return {**params, "layers": layers}


def test_lora_equals_the_model_with_merged_weights_and_starts_as_the_base():
  config = TINY.replace(lora_rank=2, lora_alpha=3.0, lora_targets=LORA_TARGETS)
  base_model, params = init_params(TINY)
  lora_model = llm.Llama(config)
  lora = _lora_params(config)
  assert set(lora) == {f"{t}_lora_{f}" for t in LORA_TARGETS for f in "ab"}
  assert lora["o_lora_a"].shape == (3, 4, 8, 2)  # [layers, heads, dim, r]
  assert lora["o_lora_b"].shape == (3, 2, 32)
  ids, mask = left_padded_batch()
  got, _ = apply(
    lora_model, llm.with_lora(params, lora), ids, attention_mask=mask
  )
  want, _ = apply(
    base_model, _merged(params, lora, config), ids, attention_mask=mask
  )
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  plain, _ = apply(base_model, params, ids, attention_mask=mask)
  assert float(jnp.abs(got - plain).max()) > 1e-3  # LoRA did change it
  # Fresh factors: B is zero, so the model is the pretrained one.
  fresh = nn.meta.unbox(llm.init_lora(config, jax.random.key(3)))
  assert set(fresh) == set(lora)
  assert all(
    float(jnp.abs(fresh[f"{t}_lora_b"]).max()) == 0 for t in LORA_TARGETS
  )
  bound = 32**-0.5  # q's A: uniform in +-1/sqrt(fan_in), fan_in = 32
  assert 0.5 * bound < float(jnp.abs(fresh["q_lora_a"]).max()) <= bound
  start, _ = apply(
    lora_model, llm.with_lora(params, fresh), ids, attention_mask=mask
  )
  np.testing.assert_array_equal(start, plain)
  assert llm.init_lora(TINY, jax.random.key(3)) == {}
  with pytest.raises(ValueError, match="'qq_lora_a'.*<layer> one of"):
    llm.with_lora(params, {"qq_lora_a": lora["q_lora_a"]})


@pytest.mark.parametrize("frozen_matmul", [None, "xla"])
def test_lora_gradients_match_the_merged_weights_chain_rule(frozen_matmul):
  """dL/dB = scale * A^T dL/dW' with W' = W + scale A B, from the merged
  f32 model (an independent path); dL/dA likewise with B. With frozen bf16
  matmuls for W the LoRA factors still get (near-equal) gradients."""
  config = TINY.replace(lora_rank=2, lora_alpha=3.0, lora_targets=LORA_TARGETS)
  base_model, params = init_params(TINY)
  lora_model = llm.Llama(config.replace(frozen_matmul=frozen_matmul))
  lora = _lora_params(config)
  ids, mask = left_padded_batch()

  def loss(model, params):
    logits, _ = apply(model, params, ids, attention_mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  got = jax.grad(lambda lo: loss(lora_model, llm.with_lora(params, lo)))(lora)
  merged_grad = jax.grad(lambda p: loss(base_model, p))(
    _merged(params, lora, config)
  )["layers"]
  scale = config.lora_alpha / config.lora_rank
  tolerance = 1e-4 if frozen_matmul is None else 3e-2
  for name in LORA_TARGETS:
    a, b, dw = lora[f"{name}_lora_a"], lora[f"{name}_lora_b"], merged_grad[name]
    in_dims = a.ndim - 2
    in_axes = tuple(range(1, 1 + in_dims))
    out_axes = tuple(range(1 + in_dims, dw.ndim))
    # dW' [L, *in, *out]; dB[l] = scale * A[l]^T dW'[l]; dA[l] = scale dW'[l] B[l]^T.
    want_b = scale * jnp.einsum(
      a, (0, *in_axes, 99), dw, (0, *in_axes, *out_axes), (0, 99, *out_axes)
    )
    want_a = scale * jnp.einsum(
      dw, (0, *in_axes, *out_axes), b, (0, 99, *out_axes), (0, *in_axes, 99)
    )
    for got_g, want_g in (
      (got[f"{name}_lora_b"], want_b),
      (got[f"{name}_lora_a"], want_a),
    ):
      assert float(jnp.abs(want_g).max()) > 0
      err = float(jnp.abs(got_g - want_g).max())
      assert err <= tolerance * float(jnp.abs(want_g).max()), (name, err)


def test_lora_decode_step_inputs_give_the_same_step_logits():
  config = TINY.replace(
    lora_rank=2, lora_targets=LORA_TARGETS, frozen_matmul="xla"
  )
  _, params = init_params(TINY)
  model = llm.Llama(config)
  params = llm.with_lora(params, _lora_params(config))
  ids, mask = left_padded_batch()
  cache = _prefilled_cache(model, params, ids, mask)
  prepared = model.decode_step_inputs(params)
  assert "q_lora_a" in prepared["layer_params"][0]
  step = dict(input_ids=ids[:, 8:], attention_mask=mask[:, 8:], cache=cache)
  plain, _ = apply(model, params, **step)
  fast, _ = apply(model, params, **step, **prepared)
  np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "lora, message",
  [
    (dict(rank=-1), r"ilm.llm.lora.rank=-1; expected an int >= 0"),
    (dict(rank=2.0), r"ilm.llm.lora.rank=2.0; expected an int"),
    (dict(rank=4, alpha=0.0), r"ilm.llm.lora.alpha=0.0; expected a number > 0"),
    (dict(rank=4, targets=("q", "qkv")), r"targets=\('q', 'qkv'\); expected"),
    (dict(rank=4, targets=()), r"targets=\(\); expected .*at least one"),
    (
      dict(rank=4, targets=("q", "q")),
      r"targets=\('q', 'q'\); expected distinct",
    ),
  ],
)
def test_lora_config_errors_name_the_key(lora, message):
  with pytest.raises(ValueError, match=message):
    llm_loading.lora_fields(ml_collections.ConfigDict(dict(lora=lora)))


def test_lora_config_fields():
  read = llm_loading.lora_fields
  assert read(ml_collections.ConfigDict({})) == dict(
    lora_rank=0, lora_targets=()
  )
  assert read(ml_collections.ConfigDict(dict(lora=dict(rank=0)))) == dict(
    lora_rank=0, lora_targets=()
  )
  # As a JSON config (an export bundle) stores it: targets as a list.
  got = read(
    ml_collections.ConfigDict(
      dict(lora=dict(rank=8, alpha=16, targets=["q", "v"]))
    )
  )
  assert got == dict(lora_rank=8, lora_alpha=16.0, lora_targets=("q", "v"))
