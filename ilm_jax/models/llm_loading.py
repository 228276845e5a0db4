"""Loads Llama-family checkpoints into `llm.Llama` params.

Two sources: a GGUF file (llama.cpp's format; the embedded SmolLM2 default
ships as one) and a Hugging Face directory (config.json plus
model.safetensors or its shards), so that accelerator users can bring
larger checkpoints of the same family (SmolLM2-1.7B, Llama, Qwen2).
Architecture hyper-parameters always come from the source's metadata.

Every loader returns (config, params, tokenizer) where params is the
`{'params': ...}` subtree of `llm.Llama` (layers stacked on axis 0).
"""

import functools
import json
import os
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from absl import logging

from ilm_jax import resources
from ilm_jax.models import llm, llm_tokenizer
from ilm_jax.ops import onednn_matmul

# GGUF architectures whose tensors map onto `llm.Llama` (see _gguf_config).
GGUF_ARCHITECTURES = ("llama",)
# Hugging Face `model_type`s we load; Qwen2 adds q/k/v biases, Gemma GeGLU,
# (1 + w) norm scales and scaled embeddings, Gemma 2 the rest listed in
# llm.py's docstring.
HF_MODEL_TYPES = ("llama", "qwen2", "gemma", "gemma2")
_GEMMA = ("gemma", "gemma2")
# HF activation names (their ACT2FN keys) -> llm.LlamaConfig.mlp_activation.
_HF_ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu": "gelu",
}
# Names `load_pretrained` resolves to an embedded checkpoint.
EMBEDDED = {"smollm2-135m-instruct": resources.SMOLLM2_135M_INSTRUCT}

# Well-known Hugging Face checkpoints by name: the architecture fields of
# their config.json, so that `architecture(name)` works without weights
# (the TPU compile check), and `load_pretrained(name)` reads the directory
# `<LLM_DIR_ENV or ~/.cache/ilm_jax/llm>/<name>` that the user downloaded.
LLM_DIR_ENV = "ILM_LLM_DIR"
_LLAMA3 = dict(
  model_type="llama",
  vocab_size=128_256,
  rope_theta=500_000.0,
  rms_norm_eps=1e-5,
  hidden_act="silu",
  max_position_embeddings=131_072,
)
_LLAMA3_ROPE = dict(
  rope_type="llama3",
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=8192,
)
KNOWN_HF = {
  "llama-3.2-1b-instruct": dict(
    _LLAMA3,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
  ),
  "llama-3.1-8b-instruct": dict(
    _LLAMA3,
    hidden_size=4096,
    intermediate_size=14_336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
    rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
  ),
  "qwen2.5-1.5b-instruct": dict(
    model_type="qwen2",
    vocab_size=151_936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
  ),
  "gemma-2-2b-it": dict(
    model_type="gemma2",
    vocab_size=256_000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
  ),
}


def llm_dir() -> pathlib.Path:
  """Where named Hugging Face checkpoints (KNOWN_HF) are looked up."""
  default = pathlib.Path.home() / ".cache" / "ilm_jax" / "llm"
  return pathlib.Path(os.environ.get(LLM_DIR_ENV) or default)


def _known_dir(name: str) -> pathlib.Path:
  path = llm_dir() / name
  if not (path / "config.json").exists():
    raise FileNotFoundError(
      f"ilm.llm.checkpoint={name!r} names a known architecture, but "
      f"{path} holds no config.json. Put the model's Hugging Face directory "
      f"(config.json, *.safetensors, tokenizer.json) there, set "
      f"${LLM_DIR_ENV} to the folder holding it, or set ilm.llm.checkpoint "
      "to its path."
    )
  return path


def _checkpoint_path(spec: str) -> pathlib.Path:
  """The file or directory a checkpoint spec names (see `load_pretrained`)."""
  if spec in EMBEDDED:
    (path,) = resources.fetch(EMBEDDED[spec]).values()
    return pathlib.Path(path)
  if spec in KNOWN_HF:
    return _known_dir(spec)
  return pathlib.Path(spec)


def architecture(spec: str, dtype=jnp.float32, param_dtype=jnp.float32):
  """The `llm.LlamaConfig` of a checkpoint spec, reading no weights.

  Args:
    spec: as for `load_pretrained`; a KNOWN_HF name needs no files.
    dtype: compute dtype of the returned config.
    param_dtype: parameter dtype of the returned config.

  Returns:
    llm.LlamaConfig.
  """
  dtypes = dict(dtype=dtype, param_dtype=param_dtype)
  if spec in KNOWN_HF:
    return _hf_config(KNOWN_HF[spec], **dtypes)
  path = _checkpoint_path(spec)
  if path.is_dir():
    return _hf_config(json.loads((path / "config.json").read_text()), **dtypes)
  return _gguf_config(_GGUFReader(path), **dtypes)


def load_tokenizer(spec: str):
  """The tokenizer of a checkpoint spec, reading no weights.

  Returns:
    an `LlmTokenizer`, or None for an HF directory without tokenizer.json.
  """
  path = _checkpoint_path(spec)
  if not path.is_dir():
    return llm_tokenizer.LlmTokenizer.from_gguf(_GGUFReader(path))
  if (path / "tokenizer.json").exists():
    return llm_tokenizer.LlmTokenizer.from_hf_dir(path)
  return None


def _stack_layers(per_layer: list[dict]) -> dict:
  """Turns a list of per-layer param dicts into one dict of stacked arrays."""
  stacked = {}
  for key in per_layer[0]:
    values = [layer[key] for layer in per_layer]
    stacked[key] = (
      _stack_layers(values) if isinstance(values[0], dict) else np.stack(values)
    )
  return stacked


_NORMS = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")


def _to_params(embedding, layers, final_norm, lm_head, config):
  """Assembles the Flax param tree from HF-layout [out, in] matrices."""
  e, h, kvh, d = (
    config.hidden_size,
    config.num_heads,
    config.num_kv_heads,
    config.head_dim,
  )
  per_layer = []
  for w in layers:
    layer = dict(
      {name: dict(scale=w[name]) for name in _NORMS if name in w},
      q=w["q"].T.reshape(e, h, d),
      k=w["k"].T.reshape(e, kvh, d),
      v=w["v"].T.reshape(e, kvh, d),
      o=w["o"].T.reshape(h, d, e),
      gate=w["gate"].T,
      up=w["up"].T,
      down=w["down"].T,
    )
    if config.attention_bias:
      layer.update(
        q_bias=w["q_bias"].reshape(h, d),
        k_bias=w["k_bias"].reshape(kvh, d),
        v_bias=w["v_bias"].reshape(kvh, d),
      )
    if config.attention_out_bias:
      layer["o_bias"] = w["o_bias"]
    per_layer.append(layer)
  params = dict(
    embedding=embedding,
    layers=_stack_layers(per_layer),
    final_norm=dict(scale=final_norm),
  )
  if not config.tie_word_embeddings:
    params["lm_head"] = lm_head.T

  # Norm scales stay float32 whatever param_dtype is: they are tiny and the
  # norm is computed in float32.
  def cast(path, x):
    dtype = jnp.float32 if "scale" in path else config.param_dtype
    return jnp.asarray(x, dtype)

  return _map_with_path(cast, params)


def _map_with_path(fn, tree, path=()):
  if isinstance(tree, dict):
    return {k: _map_with_path(fn, v, path + (k,)) for k, v in tree.items()}
  return fn(path, tree)


def _unpermute_rope_rows(w, n_heads):
  """Undoes llama.cpp's q/k row order (pairs interleaved within each head)."""
  rows = w.shape[0]
  return (
    w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


class _GGUFReader(gguf.GGUFReader):
  """A GGUFReader that parses a plain ndarray view of its memory map.

  Slicing an np.memmap runs Python code per slice; SmolLM2's 98k tokenizer
  strings made parsing take about three times longer that way.
  """

  @property
  def data(self):
    return self._data

  @data.setter
  def data(self, value):
    self._data = value.view(np.ndarray)  # the view keeps the map alive


def _gguf_config(reader, **dtypes) -> llm.LlamaConfig:
  def get(key, default=None):
    field = reader.fields.get(key)
    if field is None:
      if default is None:
        raise ValueError(f"GGUF metadata lacks {key}.")
      return default
    return field.contents()

  arch = get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(
      f"Unsupported GGUF architecture {arch!r}: this loader reads "
      f"{', '.join(GGUF_ARCHITECTURES)} only. Convert the model to a "
      "Hugging Face directory of a supported family, or pick another file."
    )
  if "rope_freqs.weight" in {t.name for t in reader.tensors}:
    raise ValueError(
      "GGUF rope frequency factors (rope_freqs) are not "
      "supported; load the Hugging Face directory instead."
    )
  if get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
    raise ValueError("Only linear rope scaling is supported in GGUF files.")
  heads = get(f"{arch}.attention.head_count")
  hidden = get(f"{arch}.embedding_length")
  factor = get(f"{arch}.rope.scaling.factor", 1.0)
  names = {t.name for t in reader.tensors}
  return llm.LlamaConfig(
    vocab_size=len(get("tokenizer.ggml.tokens")),
    hidden_size=hidden,
    intermediate_size=get(f"{arch}.feed_forward_length"),
    num_layers=get(f"{arch}.block_count"),
    num_heads=heads,
    num_kv_heads=get(f"{arch}.attention.head_count_kv", heads),
    head_dim=get(f"{arch}.attention.key_length", hidden // heads),
    rope_theta=float(get(f"{arch}.rope.freq_base", 10_000.0)),
    rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon")),
    tie_word_embeddings="output.weight" not in names,
    attention_bias="blk.0.attn_q.bias" in names,
    attention_out_bias="blk.0.attn_output.bias" in names,
    rope_scaling=(
      None if factor == 1.0 else llm.RopeScaling("linear", float(factor))
    ),
    **dtypes,
  )


def load_gguf(path: os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32):
  """Loads a GGUF file: dequantizes every tensor to float32 first.

  Args:
    path: the .gguf file.
    dtype: compute dtype of the returned config.
    param_dtype: dtype of the returned params.

  Returns:
    (config, params, tokenizer).

  Raises:
    ValueError: the architecture or a feature of the file is unsupported.
  """
  reader = _GGUFReader(path)
  config = _gguf_config(reader, dtype=dtype, param_dtype=param_dtype)
  tensors = {t.name: t for t in reader.tensors}

  def get(name):
    t = tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)

  gguf_names = dict(
    attn_norm="attn_norm",
    mlp_norm="ffn_norm",
    q="attn_q",
    k="attn_k",
    v="attn_v",
    o="attn_output",
    gate="ffn_gate",
    up="ffn_up",
    down="ffn_down",
  )
  layers = []
  for i in range(config.num_layers):
    w = {
      ours: get(f"blk.{i}.{theirs}.weight")
      for ours, theirs in gguf_names.items()
    }
    for ours in ("q", "k", "v", "o"):
      if f"blk.{i}.{gguf_names[ours]}.bias" in tensors:
        w[f"{ours}_bias"] = get(f"blk.{i}.{gguf_names[ours]}.bias")
    for ours, n in (("q", config.num_heads), ("k", config.num_kv_heads)):
      w[ours] = _unpermute_rope_rows(w[ours], n)
      if f"{ours}_bias" in w:
        w[f"{ours}_bias"] = _unpermute_rope_rows(w[f"{ours}_bias"], n)
    layers.append(w)
  lm_head = None if config.tie_word_embeddings else get("output.weight")
  params = _to_params(
    get("token_embd.weight"), layers, get("output_norm.weight"), lm_head, config
  )
  return config, params, llm_tokenizer.LlmTokenizer.from_gguf(reader)


def _hf_config(cfg: dict, **dtypes) -> llm.LlamaConfig:
  model_type = cfg.get("model_type")
  if model_type not in HF_MODEL_TYPES:
    raise ValueError(
      f"Unsupported model_type {model_type!r}; expected one "
      f"of {HF_MODEL_TYPES}."
    )
  activation = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
  if activation not in _HF_ACTIVATIONS or cfg.get("mlp_bias"):
    raise ValueError(
      f"config.json: hidden_act={activation!r}, mlp_bias="
      f"{cfg.get('mlp_bias')}; supported: gated MLPs without biases and "
      f"activations {sorted(_HF_ACTIVATIONS)}."
    )
  if model_type == "qwen2" and cfg.get("use_sliding_window"):
    raise ValueError("Sliding-window attention is not supported.")
  scaling = cfg.get("rope_scaling")
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "llama3"):
      raise ValueError(f"Unsupported rope scaling {kind!r}.")
    scaling = llm.RopeScaling(
      kind,
      float(scaling["factor"]),
      float(scaling.get("low_freq_factor", 1.0)),
      float(scaling.get("high_freq_factor", 4.0)),
      int(scaling.get("original_max_position_embeddings", 8192)),
    )
  heads = cfg["num_attention_heads"]
  bias = model_type == "qwen2" or cfg.get("attention_bias", False)
  gemma2 = {}
  if model_type == "gemma2":
    layers = cfg["num_hidden_layers"]
    # transformers' default: layers 0, 2, 4, ... use the window.
    kinds = cfg.get("layer_types") or [
      "sliding_attention" if i % 2 == 0 else "full_attention"
      for i in range(layers)
    ]
    gemma2 = dict(
      query_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
      attn_logit_softcap=cfg.get("attn_logit_softcapping", 50.0),
      final_logit_softcap=cfg.get("final_logit_softcapping", 30.0),
      post_norms=True,
      sliding_window=cfg.get("sliding_window", 4096),
      sliding_layers=tuple(k == "sliding_attention" for k in kinds),
    )
  return llm.LlamaConfig(
    vocab_size=cfg["vocab_size"],
    hidden_size=cfg["hidden_size"],
    intermediate_size=cfg["intermediate_size"],
    num_layers=cfg["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=cfg.get("num_key_value_heads") or heads,
    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
    rope_theta=float(cfg.get("rope_theta", 10_000.0)),
    rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    tie_word_embeddings=bool(
      cfg.get("tie_word_embeddings", model_type in _GEMMA)
    ),
    attention_bias=bool(bias),
    attention_out_bias=bool(model_type == "llama" and bias),
    rope_scaling=scaling or None,
    mlp_activation=_HF_ACTIVATIONS[activation],
    embedding_scale=model_type in _GEMMA,
    **gemma2,
    **dtypes,
  )


def _open_hf_dir(path: pathlib.Path, dtype, param_dtype):
  """(config, is Gemma, tensor name -> file, open safetensors files).

  Tensors are then read one at a time from the memory-mapped files, so
  peak host memory stays near the converted params, not twice the
  checkpoint.
  """
  raw = json.loads((path / "config.json").read_text())
  config = _hf_config(raw, dtype=dtype, param_dtype=param_dtype)
  index = path / "model.safetensors.index.json"
  if index.exists():
    where = json.loads(index.read_text())["weight_map"]
  else:
    with safetensors.safe_open(path / "model.safetensors", "numpy") as f:
      where = dict.fromkeys(f.keys(), "model.safetensors")
  files = {
    name: safetensors.safe_open(path / name, "numpy")
    for name in set(where.values())
  }
  return config, raw.get("model_type") in _GEMMA, where, files


def load_hf_dir(path: os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32):
  """Loads a Hugging Face directory (config.json + safetensors weights).

  Args:
    path: directory with config.json and model.safetensors, or shards listed
      in model.safetensors.index.json; tokenizer.json is optional.
    dtype: compute dtype of the returned config.
    param_dtype: dtype of the returned params.

  Returns:
    (config, params, tokenizer or None when the directory has none).
  """
  path = pathlib.Path(path)
  config, gemma, where, files = _open_hf_dir(path, dtype, param_dtype)
  tensors = set(where)

  def get(name):
    tensors.remove(name)
    value = files[where[name]].get_tensor(name).astype(np.float32)
    if gemma and name.endswith("norm.weight"):
      value = value + 1.0  # Gemma's RMSNorm scales by (1 + w)
    return value

  hf_names = dict(
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
  )
  if config.post_norms:  # Gemma 2's names for its four norms
    hf_names.update(
      attn_post_norm="post_attention_layernorm",
      mlp_norm="pre_feedforward_layernorm",
      mlp_post_norm="post_feedforward_layernorm",
    )
  layers = []
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}."
    w = {
      ours: get(f"{prefix}{theirs}.weight") for ours, theirs in hf_names.items()
    }
    for ours in ("q", "k", "v", "o"):
      if f"{prefix}{hf_names[ours]}.bias" in tensors:
        w[f"{ours}_bias"] = get(f"{prefix}{hf_names[ours]}.bias")
    layers.append(w)
  embedding = get("model.embed_tokens.weight")
  lm_head = None
  if not config.tie_word_embeddings:
    lm_head = get("lm_head.weight")
  tensors.discard("lm_head.weight")  # some tied checkpoints store a copy
  final_norm = get("model.norm.weight")
  if tensors:
    logging.warning("Ignoring unused tensors in %s: %s", path, sorted(tensors))
  params = _to_params(embedding, layers, final_norm, lm_head, config)
  tokenizer = None
  if (path / "tokenizer.json").exists():
    tokenizer = llm_tokenizer.LlmTokenizer.from_hf_dir(path)
  return config, params, tokenizer


def load_pretrained(spec: str, dtype=jnp.float32, param_dtype=jnp.float32):
  """Loads an embedded checkpoint by name, a .gguf file or an HF directory.

  Args:
    spec: a key of EMBEDDED (e.g. "smollm2-135m-instruct"), a key of
      KNOWN_HF (its directory under `llm_dir()`), or a path.
    dtype: compute dtype of the returned config.
    param_dtype: dtype of the returned params.

  Returns:
    (config, params, tokenizer).
  """
  path = _checkpoint_path(spec)
  if path.is_dir():
    return load_hf_dir(path, dtype, param_dtype)
  return load_gguf(path, dtype, param_dtype)


def _flat_indices(index: tuple, dims: tuple) -> np.ndarray:
  """Flat (row-major) indices into `dims` of the block `index` selects."""
  ranges = [np.arange(*s.indices(n)) for s, n in zip(index, dims, strict=True)]
  if not ranges:
    return np.zeros((), np.int64)
  return np.ravel_multi_index(np.ix_(*ranges), dims)


def _read_block(tensor, first_dims, second_dims, transpose, index):
  """The block `index` of P = reshape(W.T or W, first_dims + second_dims).

  W is the 2-D (or 1-D) stored tensor, with `transpose` its rows are the
  flattened `second_dims` and columns the `first_dims`. Only the bounding
  box of the block is read from the file (safetensors `get_slice`).
  """
  n = len(first_dims)
  first = _flat_indices(index[:n], first_dims)
  second = _flat_indices(index[n:], second_dims)
  if not second_dims:  # 1-D tensor
    lo, hi = int(first.min()), int(first.max()) + 1
    return np.asarray(tensor[lo:hi])[first - lo]
  rows, cols = (second, first) if transpose else (first, second)
  r_lo, r_hi = int(rows.min()), int(rows.max()) + 1
  c_lo, c_hi = int(cols.min()), int(cols.max()) + 1
  box = np.asarray(tensor[r_lo:r_hi, c_lo:c_hi])
  rows, cols = rows - r_lo, cols - c_lo
  if transpose:  # block[first..., second...] = W[second, first]
    return box[
      rows.reshape((1,) * first.ndim + rows.shape),
      cols.reshape(cols.shape + (1,) * rows.ndim),
    ]
  return box[
    rows.reshape(rows.shape + (1,) * cols.ndim),
    cols.reshape((1,) * rows.ndim + cols.shape),
  ]


def _mesh_shardings(config: llm.LlamaConfig, mesh, rules):
  """A NamedSharding per LLM param: its logical axes through `rules`."""
  import flax.linen as nn  # noqa: PLC0415 (only the mesh loaders need flax)

  return nn.logical_to_mesh_sharding(
    llm.logical_partition_specs(config), mesh, rules
  )


def load_hf_dir_sharded(
  path: os.PathLike, mesh, rules, dtype=jnp.float32, param_dtype=jnp.float32
):
  """Like `load_hf_dir`, but every device's shard is read on its own.

  Each parameter is a `jax.make_array_from_callback` array whose callback
  reads, from the memory-mapped safetensors, only the bounding box of that
  device's block (for stacked layers, layer by layer), so an 8B model is
  never materialised whole on the host: the peak is about one block.

  Args:
    path: as for `load_hf_dir`.
    mesh: the device mesh.
    rules: logical axis rules (config.mesh.logical_axis_rules).
    dtype: compute dtype of the returned config.
    param_dtype: dtype of the returned params (norm scales stay float32).

  Returns:
    (config, params on `mesh` laid out by `rules`, tokenizer or None).
  """
  path = pathlib.Path(path)
  config, gemma, where, files = _open_hf_dir(path, dtype, param_dtype)
  e, h, kvh, d = (
    config.hidden_size,
    config.num_heads,
    config.num_kv_heads,
    config.head_dim,
  )
  i = config.intermediate_size
  hf = dict(
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
  )
  if config.post_norms:
    hf.update(
      attn_post_norm="post_attention_layernorm",
      mlp_norm="pre_feedforward_layernorm",
      mlp_post_norm="post_feedforward_layernorm",
    )
  # ours -> (stored name, first dims, second dims, transpose) per layer.
  layout = {
    "q": ("weight", (e,), (h, d), True),
    "k": ("weight", (e,), (kvh, d), True),
    "v": ("weight", (e,), (kvh, d), True),
    "o": ("weight", (h, d), (e,), True),
    "gate": ("weight", (e,), (i,), True),
    "up": ("weight", (e,), (i,), True),
    "down": ("weight", (i,), (e,), True),
  }
  sources = {}  # param path -> (per-layer names or name, dims..., norm)
  for ours, (suffix, first, second, transpose) in layout.items():
    names = [
      f"model.layers.{n}.{hf[ours]}.{suffix}" for n in range(config.num_layers)
    ]
    sources[("layers", ours)] = (names, first, second, transpose)
    bias = f"model.layers.0.{hf[ours]}.bias"
    if bias in where and ours in ("q", "k", "v", "o"):
      names = [
        f"model.layers.{n}.{hf[ours]}.bias" for n in range(config.num_layers)
      ]
      sources[("layers", f"{ours}_bias")] = (names, second, (), False)
  for norm in _NORMS:
    if norm in hf:
      names = [
        f"model.layers.{n}.{hf[norm]}.weight" for n in range(config.num_layers)
      ]
      sources[("layers", norm, "scale")] = (names, (e,), (), False)
  sources[("embedding",)] = (
    "model.embed_tokens.weight",
    (config.vocab_size, e),
    (),
    False,
  )
  sources[("final_norm", "scale")] = ("model.norm.weight", (e,), (), False)
  if not config.tie_word_embeddings:
    sources[("lm_head",)] = ("lm_head.weight", (e,), (config.vocab_size,), True)

  shardings = _mesh_shardings(config, mesh, rules)

  def build(key, source):
    names, first, second, transpose = source
    if key == ("embedding",):  # stored [vocab, embed], used as is
      first, second = (config.vocab_size,), (e,)
    is_norm = key[-1] == "scale"
    dtype_ = jnp.float32 if is_norm else param_dtype
    stacked = isinstance(names, list)

    def read(name, block_index):
      tensor = files[where[name]].get_slice(name)
      block = _read_block(tensor, first, second, transpose, block_index)
      block = block.astype(np.float32)
      if gemma and is_norm:
        block = block + 1.0
      return block

    def callback(block_index):
      if not stacked:
        return read(names, block_index).astype(dtype_)
      layers = range(*block_index[0].indices(len(names)))
      return np.stack([read(names[n], block_index[1:]) for n in layers]).astype(
        dtype_
      )

    shape = ((len(names),) if stacked else ()) + first + second
    sharding = shardings
    for k in key:
      sharding = sharding[k]
    return jax.make_array_from_callback(shape, sharding, callback)

  params = {}
  for key, source in sources.items():
    node = params
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = build(key, source)
  tokenizer = None
  if (path / "tokenizer.json").exists():
    tokenizer = llm_tokenizer.LlmTokenizer.from_hf_dir(path)
  return config, params, tokenizer


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def config_from(llm_config) -> llm.LlamaConfig:
  """The `LlamaConfig` that `config.ilm.llm` describes, reading no weights.

  Args:
    llm_config: `checkpoint` (see `load_pretrained`), `dtype` and
      `param_dtype` ("float32" or "bfloat16"), optional `remat`,
      `frozen_matmul` and `lora` (`rank`, `alpha`, `targets`; see
      `lora_fields`).

  Raises:
    ValueError: an unknown dtype or frozen_matmul, or a bad `lora` entry.
  """
  for field in ("dtype", "param_dtype"):
    if llm_config[field] not in _DTYPES:
      raise ValueError(
        f"ilm.llm.{field}={llm_config[field]!r}; expected one "
        f"of {sorted(_DTYPES)}."
      )
  # Recompute layers in the backward pass (large LLMs on accelerators).
  # Exports written before the field existed read as False.
  remat = bool(llm_config.get("remat", False))
  frozen_matmul = llm_config.get("frozen_matmul", None) or None
  if frozen_matmul == "auto":
    frozen_matmul = _auto_frozen_matmul()
  elif frozen_matmul not in llm.FROZEN_MATMULS:
    raise ValueError(
      f"ilm.llm.frozen_matmul={frozen_matmul!r}; expected one of "
      f"{llm.FROZEN_MATMULS + ('auto',)} (None or '': ordinary matmuls; "
      "'auto': bf16 operands where this machine runs them faster)."
    )
  config = architecture(
    llm_config.checkpoint,
    dtype=_DTYPES[llm_config.dtype],
    param_dtype=_DTYPES[llm_config.param_dtype],
  )
  return config.replace(
    remat=remat, frozen_matmul=frozen_matmul, **lora_fields(llm_config)
  )


@functools.cache
def _auto_frozen_matmul() -> str | None:
  """`frozen_matmul="auto"` on this machine (logged once per process)."""
  backend, flags = jax.default_backend(), onednn_matmul.cpu_flags()
  chosen = onednn_matmul.auto_frozen_matmul(backend, flags)
  logging.info(
    "ilm.llm.frozen_matmul=auto: %s on this %s (avx512_bf16 %s, amx_bf16 %s).",
    "bf16 matmul operands ('xla')" if chosen else "ordinary matmuls",
    backend,
    "avx512_bf16" in flags,
    "amx_bf16" in flags,
  )
  return chosen


def lora_fields(llm_config) -> dict:
  """`LlamaConfig` LoRA fields from `config.ilm.llm.lora` (absent: none).

  `lora.rank` (int >= 0; 0: no LoRA, the frozen LLM of the paper),
  `lora.alpha` (> 0; the update is scaled by alpha / rank) and
  `lora.targets` (a non-empty subset of the dense layers q, k, v, o,
  gate, up, down when rank > 0).

  Raises:
    ValueError: naming the `ilm.llm.lora.*` key and what it allows.
  """
  lora = llm_config.get("lora", None) or {}
  rank = lora.get("rank", 0)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(
      f"ilm.llm.lora.rank={rank!r}; expected an int >= 0 (0: no LoRA)."
    )
  if not rank:
    return dict(lora_rank=0, lora_targets=())
  alpha = lora.get("alpha", 16.0)
  if not isinstance(alpha, int | float) or alpha <= 0:
    raise ValueError(f"ilm.llm.lora.alpha={alpha!r}; expected a number > 0.")
  targets = lora.get("targets", ())
  targets = (targets,) if isinstance(targets, str) else tuple(targets)
  unknown = [t for t in targets if t not in llm.DENSE_LAYERS]
  if unknown or not targets or len(set(targets)) != len(targets):
    raise ValueError(
      f"ilm.llm.lora.targets={targets!r}; expected distinct names from "
      f"{llm.DENSE_LAYERS} (at least one when rank > 0)."
    )
  return dict(lora_rank=rank, lora_alpha=float(alpha), lora_targets=targets)


def load_from_config(llm_config, mesh=None, rules=()):
  """(LlamaConfig, params, tokenizer) of the frozen LLM of `config.ilm.llm`.

  Args:
    llm_config: as for `config_from`.
    mesh: if given, the params come back laid out on it by their logical
      axes (`llm.logical_partition_specs`, `rules`). From an HF directory
      each device reads only its own block (`load_hf_dir_sharded`), so the
      whole LLM is never on the host; a GGUF file is dequantised whole
      first (the embedded SmolLM2 is small).
    rules: logical axis rules (`config.mesh.logical_axis_rules`).

  Raises:
    ValueError: an unknown dtype or frozen_matmul.
  """
  wanted = config_from(llm_config)
  dtypes = dict(dtype=wanted.dtype, param_dtype=wanted.param_dtype)
  path = _checkpoint_path(llm_config.checkpoint)
  rules = [tuple(r) for r in rules]
  if mesh is not None and path.is_dir():
    config, params, tokenizer = load_hf_dir_sharded(path, mesh, rules, **dtypes)
  else:
    config, params, tokenizer = load_pretrained(llm_config.checkpoint, **dtypes)
    if mesh is not None:
      params = jax.device_put(params, _mesh_shardings(config, mesh, rules))
  config = config.replace(
    remat=wanted.remat,
    frozen_matmul=wanted.frozen_matmul,
    lora_rank=wanted.lora_rank,
    lora_alpha=wanted.lora_alpha,
    lora_targets=wanted.lora_targets,
  )
  return config, params, tokenizer
