"""Loader tests on tiny checkpoints written here, against transformers.

transformers' PyTorch Llama / Qwen2 are the independent references: tiny
random models are saved as Hugging Face directories (sharded safetensors)
or as GGUF files, loaded with `llm_loading`, and the logits compared.
"""

import functools
import json

import gguf
import jax
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from configs import common
from ilm_jax.models import llm, llm_loading, llm_tokenizer
from ilm_jax.ops import onednn_matmul

pytestmark = [pytest.mark.slow, pytest.mark.reference]


@functools.partial(jax.jit, static_argnames="model")
def forward(model, params, ids, mask):
  return model.apply({"params": params}, input_ids=ids, attention_mask=mask)[0]


def randomize(torch_model, seed=0, std=0.2):
  """Replaces every weight (biases and norms too) with N(0, std) draws, so
  a wrong mapping of any tensor changes the logits visibly."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in torch_model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * std + (p.ndim == 1))
  return torch_model.eval()


def reference_logits(torch_model, ids, mask):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return torch_model(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      position_ids=torch.from_numpy(positions).long(),
    ).logits.numpy()


def batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (2, 12)).astype(np.int32)
  mask = np.ones((2, 12), np.int32)
  mask[1, :5] = 0
  return ids, mask


def assert_same_logits(config, params, torch_model, atol=1e-4):
  ids, mask = batch(config.vocab_size)
  ours = np.asarray(forward(llm.Llama(config), params, ids, mask))
  ref = reference_logits(torch_model, ids, mask)
  real = mask.astype(bool)
  assert np.abs(ref[real]).max() > 1.0  # the comparison is not vacuous
  np.testing.assert_allclose(ours[real], ref[real], atol=atol)


TINY_LLAMA3 = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  rope_theta=500_000.0,
  rms_norm_eps=1e-5,
  tie_word_embeddings=False,
  attention_bias=True,
  max_position_embeddings=64,
  rope_scaling=dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
  ),
)


def test_hf_llama_dir_sharded_untied_biased_llama3_rope(tmp_path):
  ref = randomize(
    transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**TINY_LLAMA3, attn_implementation="eager")
    )
  )
  ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  config, params, tokenizer = llm_loading.load_pretrained(str(tmp_path))
  assert tokenizer is None
  assert (config.head_dim, config.num_kv_heads, config.rope_theta) == (
    16,
    2,
    500_000.0,
  )
  assert config.rope_scaling == llm.RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
  assert config.attention_bias and config.attention_out_bias
  assert not config.tie_word_embeddings
  assert_same_logits(config, params, ref)


def test_hf_qwen2_dir_tied_with_qkv_biases(tmp_path):
  ref = randomize(
    transformers.Qwen2ForCausalLM(
      transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="eager",
      )
    ),
    seed=1,
  )
  ref.save_pretrained(tmp_path, safe_serialization=True)
  config, params, _ = llm_loading.load_hf_dir(tmp_path)
  assert config.attention_bias and not config.attention_out_bias
  assert config.tie_word_embeddings and "lm_head" not in params
  assert_same_logits(config, params, ref)


def test_hf_dir_rejects_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'"):
    llm_loading.load_hf_dir(tmp_path)


def write_gguf(path, arch, tensors=(), hparams=None):
  """A tiny GGUF with a byte-level BPE vocabulary of 64 tokens."""
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in (hparams or {}).items():
    getattr(writer, f"add_{key}")(value)
  tokens = ["<s>", "</s>"] + [
    chr(ord("a") + i % 26) * (1 + i // 26) for i in range(62)
  ]
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([3, 3] + [1] * 62)
  writer.add_token_merges(["a a"])
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(1)
  for name, array in tensors:
    writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_loader_rejects_unsupported_architecture(tmp_path):
  path = tmp_path / "tiny-gpt2.gguf"
  write_gguf(
    path,
    "gpt2",
    [("token_embd.weight", np.zeros((64, 8), np.float32))],
    dict(block_count=1, embedding_length=8),
  )
  with pytest.raises(
    ValueError,
    match=r"Unsupported GGUF architecture "
    r"'gpt2'.*reads llama only",
  ):
    llm_loading.load_gguf(path)


def llama_cpp_permute(w, n_heads):
  """llama.cpp's convert script's q/k row order (its `permute`)."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


def test_gguf_llama_untied_roundtrip_matches_torch(tmp_path):
  cfg = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=50_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attn_implementation="eager",
  )
  ref = randomize(transformers.LlamaForCausalLM(cfg), seed=2)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  names = dict(
    input_layernorm="attn_norm",
    post_attention_layernorm="ffn_norm",
    **{f"self_attn.{p}_proj": f"attn_{p}" for p in "qkv"},
    **{"self_attn.o_proj": "attn_output"},
    **{f"mlp.{p}_proj": f"ffn_{p}" for p in ("gate", "up", "down")},
  )
  tensors = [
    ("token_embd.weight", sd["model.embed_tokens.weight"]),
    ("output_norm.weight", sd["model.norm.weight"]),
    ("output.weight", sd["lm_head.weight"].astype(np.float16)),
  ]
  for i in range(2):
    for hf, ours in names.items():
      w = sd[f"model.layers.{i}.{hf}.weight"]
      if ours in ("attn_q", "attn_k"):
        w = llama_cpp_permute(w, 4 if ours == "attn_q" else 2)
      tensors.append((f"blk.{i}.{ours}.weight", w))
  path = tmp_path / "tiny-llama.gguf"
  write_gguf(
    path,
    "llama",
    tensors,
    dict(
      block_count=2,
      context_length=64,
      embedding_length=32,
      feed_forward_length=48,
      head_count=4,
      head_count_kv=2,
      rope_freq_base=50_000.0,
      layer_norm_rms_eps=1e-5,
    ),
  )
  config, params, tokenizer = llm_loading.load_pretrained(str(path))
  assert not config.tie_word_embeddings and config.rope_theta == 50_000.0
  assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (1, 0, 1)
  # The fp16 copy of lm_head in the file limits the match.
  with torch.no_grad():
    ref.lm_head.weight.copy_(ref.lm_head.weight.half().float())
  assert_same_logits(config, params, ref)
  # On a mesh a GGUF file is dequantised whole, then laid out by the
  # logical axes; the tokenizer alone reads no weights.
  mesh = jax.make_mesh(
    (1, 2, 2),
    ("data", "fsdp", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=jax.devices()[:4],
  )
  llm_config = ml_collections.ConfigDict(
    dict(checkpoint=str(path), dtype="float32", param_dtype="float32")
  )
  _, placed, _ = llm_loading.load_from_config(
    llm_config, mesh, common.mesh_config().logical_axis_rules
  )
  assert tuple(placed["layers"]["up"].sharding.spec) == (None, "fsdp", "model")
  for a, b in zip(
    jax.tree.leaves(placed), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert llm_loading.load_tokenizer(str(path)).eos_id == tokenizer.eos_id


def test_tokenizer_from_hf_dir_matches_transformers(tmp_path):
  vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
  for ch in "abcdefghijklmnopqrstuvwxyz ĠĊ.!?'":
    vocab.setdefault(ch, len(vocab))
  merges = [("Ġ", "a"), ("b", "c"), ("Ġa", "bc")]
  for pair in merges:
    vocab["".join(pair)] = len(vocab)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
    add_prefix_space=False
  )
  tok.decoder = tokenizers.decoders.ByteLevel()
  template = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
  )
  ref = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    bos_token="<|im_start|>",
    additional_special_tokens=["<|im_start|>"],
    chat_template=template,
  )
  ref.save_pretrained(tmp_path)
  ours = llm_tokenizer.LlmTokenizer.from_hf_dir(tmp_path)
  assert (ours.eos_id, ours.pad_id, ours.bos_id) == (2, 0, 1)
  messages = [{"role": "user", "content": "abc a bc!"}]
  text = ours.apply_chat_template(messages)
  assert text == ref.apply_chat_template(
    messages, tokenize=False, add_generation_prompt=True
  )
  assert ours.encode(text, add_special_tokens=False) == ref.encode(
    text, add_special_tokens=False
  )
  assert ours.decode(ours.encode(" abc cab")) == " abc cab"


def test_sharded_loading_reads_per_device_blocks_and_equals_host_loading(
  tmp_path, monkeypatch
):
  cfg = transformers.LlamaConfig(
    **{**TINY_LLAMA3, "attention_bias": True}, attn_implementation="eager"
  )
  ref = randomize(transformers.LlamaForCausalLM(cfg), seed=5)
  ref.save_pretrained(tmp_path, max_shard_size="20KB")
  _, host, _ = llm_loading.load_hf_dir(tmp_path)
  mesh = jax.make_mesh(
    (1, 2, 2),
    ("data", "fsdp", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=jax.devices()[:4],
  )
  rules = [tuple(r) for r in common.mesh_config().logical_axis_rules]
  blocks = []
  read_block = llm_loading._read_block

  def recording(tensor, first, second, transpose, index):
    block = read_block(tensor, first, second, transpose, index)
    blocks.append((first, second, block.size))
    return block

  monkeypatch.setattr(llm_loading, "_read_block", recording)
  config, sharded, _ = llm_loading.load_hf_dir_sharded(tmp_path, mesh, rules)
  assert jax.tree.structure(sharded) == jax.tree.structure(host)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(sharded),
    jax.tree.leaves(host),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), str(path))
  # q is [layers, embed/fsdp, heads/model, head_dim]: each device read a
  # quarter of each layer's q matrix, never the whole.
  assert tuple(sharded["layers"]["q"].sharding.spec) == (
    None,
    "fsdp",
    "model",
    None,
  )
  q_reads = [size for first, second, size in blocks if second == (4, 16)]
  assert q_reads and max(q_reads) == 32 * 4 * 16 // 4
  np.testing.assert_allclose(
    forward(llm.Llama(config), sharded, *batch(64)),
    forward(llm.Llama(config), host, *batch(64)),
    atol=1e-5,
  )


def test_load_from_config_on_a_mesh_never_loads_an_hf_dir_whole(
  tmp_path, monkeypatch
):
  cfg = transformers.LlamaConfig(**TINY_LLAMA3, attn_implementation="eager")
  randomize(transformers.LlamaForCausalLM(cfg), seed=6).save_pretrained(
    tmp_path, max_shard_size="20KB"
  )
  _, host, _ = llm_loading.load_hf_dir(tmp_path)
  llm_config = ml_collections.ConfigDict(
    dict(
      checkpoint=str(tmp_path),
      dtype="float32",
      param_dtype="float32",
      remat=True,
      frozen_matmul="xla",
    )
  )

  def whole(*args, **kwargs):
    raise AssertionError("the whole-model loader ran")

  monkeypatch.setattr(llm_loading, "load_hf_dir", whole)
  mesh = jax.make_mesh(
    (1, 2, 2),
    ("data", "fsdp", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=jax.devices()[:4],
  )
  rules = common.mesh_config().logical_axis_rules
  config, params, tokenizer = llm_loading.load_from_config(
    llm_config, mesh, rules
  )
  assert tokenizer is None  # the random model was saved without one
  assert llm_loading.load_tokenizer(str(tmp_path)) is None
  # The settings of the config reach the model; the rest is the file's.
  assert config.remat and config.frozen_matmul == "xla"
  assert config == llm_loading.config_from(llm_config)
  assert tuple(params["layers"]["up"].sharding.spec) == (
    None,
    "fsdp",
    "model",
  )
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(params),
    jax.tree.leaves(host),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), str(path))


def test_frozen_matmul_auto_resolves_from_this_machine(monkeypatch):
  """`ilm.llm.frozen_matmul="auto"` becomes "xla" or None by the CPU's
  flags (ops.onednn_matmul.auto_frozen_matmul); other values are errors
  that list "auto"."""
  base = dict(
    checkpoint="smollm2-135m-instruct", dtype="float32", param_dtype="float32"
  )
  monkeypatch.setattr(llm_loading.jax, "default_backend", lambda: "cpu")
  try:
    for flags, expected in (({"avx512_bf16"}, "xla"), ({"avx2"}, None)):
      monkeypatch.setattr(
        onednn_matmul, "cpu_flags", lambda flags=flags: frozenset(flags)
      )
      llm_loading._auto_frozen_matmul.cache_clear()
      auto = ml_collections.ConfigDict(dict(base, frozen_matmul="auto"))
      assert llm_loading.config_from(auto).frozen_matmul == expected
  finally:
    llm_loading._auto_frozen_matmul.cache_clear()
  bad = ml_collections.ConfigDict(dict(base, frozen_matmul="bf16"))
  with pytest.raises(ValueError, match=r"frozen_matmul='bf16'.*'auto'"):
    llm_loading.config_from(bad)
