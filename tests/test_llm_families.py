"""Llama 3.x, Qwen2, Gemma and Gemma 2 against transformers' PyTorch models.

For each family a small random model is built with transformers (4.57,
pinned in the test extra: the last release with the families' configs as
used here), saved as a sharded Hugging Face safetensors directory, loaded
with `llm_loading.load_pretrained` and compared: logits on a left-padded
batch (max abs diff <= 1e-3, float32) and greedy generations through a KV
cache (`decoding.greedy` against `generate(do_sample=False)`), equal.
Every weight is random (norm scales too), so a wrong mapping shows.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from ilm_jax import decoding
from ilm_jax.models import llm, llm_loading

pytestmark = [pytest.mark.slow, pytest.mark.reference]

COMMON = dict(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
)
FAMILIES = {
  "llama3": (
    transformers.LlamaConfig,
    transformers.LlamaForCausalLM,
    dict(
      head_dim=16,
      rope_theta=500_000.0,
      rms_norm_eps=1e-5,
      tie_word_embeddings=True,
      rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      ),
    ),
  ),
  "qwen2": (
    transformers.Qwen2Config,
    transformers.Qwen2ForCausalLM,
    dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
  ),
  "gemma": (
    transformers.GemmaConfig,
    transformers.GemmaForCausalLM,
    dict(head_dim=32, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6),
  ),
  "gemma2": (
    transformers.Gemma2Config,
    transformers.Gemma2ForCausalLM,
    dict(
      head_dim=32,
      hidden_activation="gelu_pytorch_tanh",
      query_pre_attn_scalar=24,
      # Small caps and window, so that each feature changes the outputs.
      attn_logit_softcapping=10.0,
      final_logit_softcapping=15.0,
      sliding_window=5,
    ),
  ),
}


def _randomize(model, seed, norm_offset, embedding_std=0.5):
  """Matrices ~ N(0, 0.5^2); norm scales ~ norm_offset + N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + norm_offset)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.model.embed_tokens.weight.mul_(embedding_std / 0.5)
  return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  config_cls, model_cls, extra = FAMILIES[request.param]
  torch.manual_seed(0)
  config = config_cls(**COMMON, **extra, attn_implementation="eager")
  # Gemma stores w of its (1 + w) norm scales: around 0, not 1.
  offset = 0.0 if request.param.startswith("gemma") else 1.0
  # Gemma 2's scaled embeddings outweigh its post-normed sublayer outputs
  # at these sizes (greedy then repeats the input token): smaller ones.
  embedding_std = 0.05 if request.param == "gemma2" else 0.5
  reference = _randomize(
    model_cls(config), len(request.param), offset, embedding_std
  )
  path = tmp_path_factory.mktemp(request.param)
  # A small shard size writes several shards and an index.
  reference.save_pretrained(path, max_shard_size="100KB")
  assert (path / "model.safetensors.index.json").exists()
  ours = llm_loading.load_pretrained(str(path))
  return request.param, reference, ours


def _batch(vocab):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab, (3, 14)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  mask[2, :9] = 0
  return ids, mask


@functools.partial(jax.jit, static_argnames="model")
def _forward(model, params, ids, mask):
  return model.apply({"params": params}, input_ids=ids, attention_mask=mask)[0]


def test_logits_match_transformers(family):
  name, reference, (config, params, _) = family
  ids, mask = _batch(config.vocab_size)
  ours = np.asarray(_forward(llm.Llama(config), params, ids, mask))
  with torch.no_grad():
    ref = reference(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      position_ids=torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0)),
    ).logits.numpy()
  real = mask.astype(bool)
  assert np.abs(ref[real]).max() > 1.0, name  # not a vacuous comparison
  np.testing.assert_array_less(np.abs(ours[real] - ref[real]).max(), 1e-3)


def test_greedy_generation_matches_transformers(family):
  name, reference, (config, params, _) = family
  ids, mask = _batch(config.vocab_size)
  new_tokens = 10  # prompt + answer exceed Gemma 2's test window of 5
  ours = decoding.greedy(
    llm.Llama(config),
    params,
    prompt_ids=ids,
    prompt_mask=mask,
    max_new_tokens=new_tokens,
    eos_id=-1,  # never produced: every row runs to max_new_tokens
    pad_id=0,
  )
  with torch.no_grad():
    ref = reference.generate(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      do_sample=False,
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      pad_token_id=0,
      eos_token_id=None,
    )[:, ids.shape[1] :].numpy()
  assert len(set(ref.ravel().tolist())) > 3, name  # not one repeated token
  np.testing.assert_array_equal(np.asarray(ours), ref)


def test_family_features_are_read_from_config_json(family):
  name, _, (config, params, _) = family
  layer = params["layers"]
  if name == "gemma2":
    assert config.post_norms and config.sliding_window == 5
    assert config.sliding_layers == (True, False, True)
    assert config.attn_logit_softcap == 10.0
    assert config.final_logit_softcap == 15.0
    assert config.query_scale == pytest.approx(24**-0.5)
    assert {"attn_post_norm", "mlp_post_norm"} <= set(layer)
  if name.startswith("gemma"):
    assert config.embedding_scale and config.mlp_activation == "gelu_tanh"
    assert config.tie_word_embeddings
  else:
    assert not config.embedding_scale and config.mlp_activation == "silu"
  assert config.attention_bias == (name == "qwen2")
  assert (config.rope_scaling is not None) == (name == "llama3")


# Parameter counts the model publishers state for these checkpoints.
PUBLISHED_COUNTS = {
  "llama-3.2-1b-instruct": 1_235_814_400,
  "llama-3.1-8b-instruct": 8_030_261_248,
  "qwen2.5-1.5b-instruct": 1_543_714_304,
  "gemma-2-2b-it": 2_614_341_888,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_known_architectures_have_the_published_parameter_counts(name):
  config = llm_loading.architecture(name)
  shapes = jax.eval_shape(
    lambda: llm.Llama(config).init(
      jax.random.key(0), np.zeros((1, 1), np.int32)
    )
  )
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == PUBLISHED_COUNTS[name]


def test_known_name_without_weights_says_where_to_put_them(
  tmp_path, monkeypatch
):
  monkeypatch.setenv(llm_loading.LLM_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="llama-3.2-1b-instruct.*ILM_"):
    llm_loading.load_pretrained("llama-3.2-1b-instruct")
