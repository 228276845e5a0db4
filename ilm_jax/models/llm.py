"""A Llama-family decoder-only LLM in Flax linen, used frozen by the ILM.

Covers Llama 1-3, SmolLM, Qwen2/2.5 and Gemma 1/2 checkpoints: RMSNorm,
rotary position embeddings (configurable theta, optional linear or "llama3"
frequency scaling), grouped-query attention with optional q/k/v biases,
SwiGLU or GeGLU MLP, tied or untied output embeddings. Gemma adds (all
switched by `LlamaConfig` fields, off by default): embeddings scaled by
sqrt(hidden); Gemma 2 (Gemma Team, "Gemma 2: Improving Open Language Models
at a Practical Size", 2024) adds norms after attention and MLP, tanh
soft-capping of attention scores and final logits, a query scale from
`query_pre_attn_scalar`, and a sliding attention window on alternate
layers. Gemma's RMSNorm multiplies by (1 + w): the loader stores 1 + w, so
the model has one RMSNorm. The layers are stacked with
`nn.scan`, so compile time does not grow with depth and every parameter has
a leading "layers" axis. Parameters carry logical axis names
(vocab, embed, heads, kv_heads, head_dim, mlp, layers) for sharding with the
rules in configs/common.py.

The model takes token ids or input embeddings (the ILM splices soft item
tokens into the prompt), an attention mask for left-padded batches and
optional explicit positions, and an optional KV cache for incremental
decoding. Cache layout: every non-scalar leaf has the batch on axis 0, so
decoding code can reorder beams with one gather per leaf.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
2021), off by default (`lora_rank=0`): each dense layer named in
`lora_targets` adds (x A) B * lora_alpha / lora_rank to x W, with A
[*in, r] and B [r, *out] float32 parameters named "<name>_lora_a" and
"<name>_lora_b" beside W (B starts at zero, so the model starts as the
pretrained one). W stays frozen and may go through `frozen_matmul`; the
low-rank path is an ordinary matmul, so gradients reach A and B. The ILM
keeps them in their own "lora" params group (`models/ilm.py`).
"""

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ilm_jax.ops import onednn_matmul

FROZEN_MATMULS = (None, "xla", "onednn")

# Large finite negative score for masked keys: a query row with no visible
# key (a left-pad token) then gets a uniform softmax instead of NaNs.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling ("linear", or "llama3" as in Llama 3.1+)."""

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters; loaders fill them from file metadata."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  attention_bias: bool = False  # biases on q/k/v (Qwen2; Llama's option)
  attention_out_bias: bool = False  # bias on the output projection
  rope_scaling: RopeScaling | None = None
  mlp_activation: str = "silu"  # silu | gelu_tanh | gelu (Gemma: GeGLU)
  embedding_scale: bool = False  # Gemma: token embeddings * sqrt(hidden)
  query_scale: float | None = None  # None: head_dim ** -0.5
  attn_logit_softcap: float | None = None  # Gemma 2: cap * tanh(s / cap)
  final_logit_softcap: float | None = None  # Gemma 2, on the logits
  post_norms: bool = False  # Gemma 2: RMSNorm on attention / MLP outputs
  sliding_window: int | None = None  # keys within this many slots ...
  sliding_layers: tuple[bool, ...] = ()  # ... for the layers marked True
  # Recompute each layer in the backward pass instead of keeping its
  # activations (jax.checkpoint, saving nothing but the layer inputs): the
  # frozen LLM's activations otherwise dominate phase-2 memory at 1B+.
  remat: bool = False
  # The dense layers' matmuls (q, k, v, o, gate, up, down and the output
  # head) as `ops.onednn_matmul.frozen_matmul`: bfloat16 operands, float32
  # accumulation, gradients into the activations only, so only for a frozen
  # LLM. None: ordinary matmuls in `dtype`; "xla": XLA's bf16 dot (on CPU
  # with a row-major copy of each transposed weight); "onednn": the oneDNN
  # custom call on CPU (AMX kernels where the CPU has them), XLA elsewhere.
  # Activations, norms, attention scores and softmax stay in `dtype`.
  frozen_matmul: str | None = None
  dtype: Any = jnp.float32  # compute dtype (bfloat16 on accelerators)
  param_dtype: Any = jnp.float32  # storage dtype of the parameters
  # LoRA on the dense layers named in `lora_targets` (module docstring);
  # rank 0: none (a frozen LLM, the ILM paper's).
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)


# SmolLM2-135M(-Instruct), the default frozen LLM, as its embedded GGUF
# describes it (tests/test_llm_parity.py checks the two agree): its shape
# without reading the file, e.g. for random-weight benchmarks.
SMOLLM2_135M = LlamaConfig(
  vocab_size=49_152,
  hidden_size=576,
  intermediate_size=1536,
  num_layers=30,
  num_heads=9,
  num_kv_heads=3,
  head_dim=64,
  rope_theta=100_000.0,
)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """Returns the head_dim // 2 rotary inverse frequencies (float32)."""
  dim = config.head_dim
  inv = 1.0 / config.rope_theta ** (
    np.arange(0, dim, 2, dtype=np.float64) / dim
  )
  scaling = config.rope_scaling
  if scaling is None:
    pass
  elif scaling.kind == "linear":
    inv = inv / scaling.factor
  elif scaling.kind == "llama3":
    # Long wavelengths are slowed down by `factor`, short ones kept, and the
    # band in between interpolated (Llama 3.1's context extension).
    wavelen = 2 * math.pi / inv
    old = scaling.original_max_position
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    scaled = np.where(wavelen > old / low, inv / scaling.factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_mid = (wavelen >= old / high) & (wavelen <= old / low)
    inv = np.where(is_mid, mid, scaled)
  else:
    raise ValueError(f"Unsupported rope scaling {scaling.kind!r}.")
  return inv.astype(np.float32)


def _rotate(x, cos, sin):
  """Applies rotary embeddings in the half-split layout of HF checkpoints."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _param(module, name, shape, axes, init, dtype):
  """Declares a logically partitioned parameter and casts it for compute
  (dtype None: the value as stored or as passed in)."""
  value = module.param(
    name,
    nn.with_logical_partitioning(init, axes),
    shape,
    module.config.param_dtype,
  )
  return value if dtype is None else jnp.asarray(value, dtype)


def _frozen_dense(config: LlamaConfig, x, w, in_dims: int, transpose_w=False):
  """x [..., *w.shape[:in_dims]] @ w -> [..., *w.shape[in_dims:]] through
  `frozen_matmul` (bf16 operands, f32 accumulation, no weight gradient);
  with `transpose_w`, w is 2-D and read as its transpose. Returns `dtype`."""
  if transpose_w:
    k, n = w.shape[1], w.shape[0]
    out_shape = (n,)
  else:
    k = math.prod(w.shape[:in_dims])
    n = math.prod(w.shape[in_dims:])
    out_shape = w.shape[in_dims:]
    w = w.reshape(k, n)
  lead = x.shape[: x.ndim - in_dims]
  y = onednn_matmul.frozen_matmul(
    x.reshape(*lead, k),
    w,
    transpose_w=transpose_w,
    use_ffi=None if config.frozen_matmul == "onednn" else False,
  )
  return y.reshape(*lead, *out_shape)


_KERNEL_INIT = nn.initializers.normal(stddev=0.02)
# Logical names of activation axes (distinct from the parameter names: the
# batch is split over fsdp while parameters' embed axis is too). They only
# act under `nn.logical_axis_rules` and a mesh set with `jax.set_mesh` (the
# trainer's step; see sharding.activation_rules); elsewhere they are no-ops.
_ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
_ACT_HEADS = (
  "activation_batch",
  "activation_length",
  "activation_heads",
  "activation_head_dim",
)
_ACT_KV = (
  "activation_batch",
  "activation_length",
  "activation_kv_heads",
  "activation_head_dim",
)
_ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")


def _constrain(x, names):
  return nn.with_logical_constraint(x, names)


# The per-layer weights that `DecoderLayer._dense` multiplies by (and the
# names `LlamaConfig.lora_targets` may list).
DENSE_LAYERS = ("q", "k", "v", "o", "gate", "up", "down")
# LoRA factors' names beside their weight's: "<layer>_lora_a" / "_lora_b".
LORA_PARAM = re.compile(r"^(?P<name>\w+)_lora_(?P<factor>[ab])$")
_Q_AXES = ("embed", "heads", "head_dim")
_KV_AXES = ("embed", "kv_heads", "head_dim")
_O_AXES = ("heads", "head_dim", "embed")


class RMSNorm(nn.Module):
  """Root-mean-square layer norm, computed in float32 like the reference."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    scale = _param(
      self,
      "scale",
      (c.hidden_size,),
      ("embed",),
      nn.initializers.ones,
      jnp.float32,
    )
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (scale * (x32 * jax.lax.rsqrt(var + c.rms_norm_eps))).astype(c.dtype)


_ACTIVATIONS = {
  "silu": nn.silu,
  "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
  "gelu": lambda x: nn.gelu(x, approximate=False),
}


def _softcap(x, cap):
  return x if cap is None else jnp.tanh(x / cap) * cap


class DecoderLayer(nn.Module):
  """One pre-norm block: GQA self-attention then a gated MLP."""

  config: LlamaConfig

  def _weight(self, name, shape, axes, init=_KERNEL_INIT):
    return _param(self, name, shape, axes, init, self.config.dtype)

  def _bias(self, name, shape, axes):
    return self._weight(name, shape, axes, nn.initializers.zeros)

  def _frozen_or_plain_dense(self, x, name, shape, axes, in_dims):
    """x's last `in_dims` axes times the weight `name` [*in, *out]."""
    c = self.config
    if c.frozen_matmul is None:
      w = self._weight(name, shape, axes)
      return jnp.tensordot(x, w, axes=in_dims)
    # The weight as passed in (bf16 from `decode_step_inputs`, else as
    # stored), not cast to `dtype`: frozen_matmul casts it to bf16.
    w = _param(self, name, shape, axes, _KERNEL_INIT, None)
    return _frozen_dense(c, x, w, in_dims).astype(c.dtype)

  def _dense(self, x, name, shape, axes, in_dims=1):
    """x's last `in_dims` axes times the weight `name` [*in, *out], plus
    the LoRA path where `name` is one of `lora_targets`."""
    y = self._frozen_or_plain_dense(x, name, shape, axes, in_dims)
    c = self.config
    if not c.lora_rank or name not in c.lora_targets:
      return y
    a_shape, b_shape = lora_shapes(shape, in_dims, c.lora_rank)
    a = self.param(
      f"{name}_lora_a",
      nn.with_logical_partitioning(
        _lora_a_init(math.prod(shape[:in_dims])), (*axes[:in_dims], None)
      ),
      a_shape,
      jnp.float32,
    )
    b = self.param(
      f"{name}_lora_b",
      nn.with_logical_partitioning(
        nn.initializers.zeros, (None, *axes[in_dims:])
      ),
      b_shape,
      jnp.float32,
    )
    low = jnp.tensordot(x, a.astype(c.dtype), axes=in_dims)
    update = jnp.tensordot(low, b.astype(c.dtype), axes=1)
    scale = jnp.asarray(c.lora_alpha / c.lora_rank, c.dtype)
    return y + update * scale

  def _attention(self, x, cache, rope, allowed, cache_index, layer):
    c = self.config
    e, h, kvh, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    q = self._dense(x, "q", (e, h, d), _Q_AXES)
    k = self._dense(x, "k", (e, kvh, d), _KV_AXES)
    v = self._dense(x, "v", (e, kvh, d), _KV_AXES)
    q, k, v = (
      _constrain(q, _ACT_HEADS),
      _constrain(k, _ACT_KV),
      _constrain(v, _ACT_KV),
    )
    if c.attention_bias:
      q = q + self._bias("q_bias", (h, d), _Q_AXES[1:])
      k = k + self._bias("k_bias", (kvh, d), _KV_AXES[1:])
      v = v + self._bias("v_bias", (kvh, d), _KV_AXES[1:])
    scale = d**-0.5 if c.query_scale is None else c.query_scale
    q = _rotate(q, *rope) * jnp.asarray(scale, c.dtype)
    k = _rotate(k, *rope)
    new_kv = None
    if cache is not None:
      # This chunk's keys/values are returned (small) and written into the
      # big cache once, outside the scan; attention here uses a local copy
      # of this layer's slice.
      new_kv = (k, v)
      k, v = (
        jax.lax.dynamic_update_slice(
          jax.lax.dynamic_index_in_dim(cache[name], layer, 1, False),
          new,
          (0, cache_index, 0, 0),
        )
        for name, new in (("k", k), ("v", v))
      )
    b, t = q.shape[:2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum(
      "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
    )
    scores = _softcap(scores, c.attn_logit_softcap)
    if isinstance(allowed, tuple):  # (global, sliding-window) masks
      sliding = jnp.asarray(c.sliding_layers, bool)[layer]
      allowed = jnp.where(sliding, allowed[1], allowed[0])
    scores = jnp.where(allowed[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
    out = self._dense(out, "o", (h, d, e), _O_AXES, in_dims=2)
    if c.attention_out_bias:
      out = out + self._bias("o_bias", (e,), ("embed",))
    return out, new_kv

  def _mlp(self, x):
    c = self.config
    shape = (c.hidden_size, c.intermediate_size)
    gate = _constrain(self._dense(x, "gate", shape, ("embed", "mlp")), _ACT_MLP)
    up = _constrain(self._dense(x, "up", shape, ("embed", "mlp")), _ACT_MLP)
    act = _ACTIVATIONS[c.mlp_activation]
    return self._dense(act(gate) * up, "down", shape[::-1], ("mlp", "embed"))

  @nn.compact
  def __call__(self, carry, cache, rope, allowed, cache_index):
    x, layer = carry
    y, new_kv = self._attention(
      RMSNorm(self.config, name="attn_norm")(x),
      cache,
      rope,
      allowed,
      cache_index,
      layer,
    )
    if self.config.post_norms:
      y = RMSNorm(self.config, name="attn_post_norm")(y)
    x = x + y
    y = self._mlp(RMSNorm(self.config, name="mlp_norm")(x))
    if self.config.post_norms:
      y = RMSNorm(self.config, name="mlp_post_norm")(y)
    x = _constrain(x + y, _ACT_EMBED)
    return (x, layer + 1), new_kv


def init_cache(config: LlamaConfig, batch_size: int, max_len: int) -> dict:
  """An empty KV cache for `max_len` tokens (prompt plus generation).

  Args:
    config: the model's config; the cache is held in its compute dtype.
    batch_size: rows of the batch.
    max_len: total token slots.

  Returns:
    A dict with k, v [batch, layers, max_len, kv_heads, head_dim], mask
    [batch, max_len] (which slots hold real tokens), next_position [batch]
    (the rotary position of the row's next real token) and index (the next
    slot to write, shared by the batch).
  """
  shape = (
    batch_size,
    config.num_layers,
    max_len,
    config.num_kv_heads,
    config.head_dim,
  )
  return dict(
    k=jnp.zeros(shape, config.dtype),
    v=jnp.zeros(shape, config.dtype),
    mask=jnp.zeros((batch_size, max_len), bool),
    next_position=jnp.zeros((batch_size,), jnp.int32),
    index=jnp.zeros((), jnp.int32),
  )


class Llama(nn.Module):
  """The decoder. See the module docstring for inputs and the cache."""

  config: LlamaConfig

  def setup(self):
    c = self.config
    if c.mlp_activation not in _ACTIVATIONS:
      raise ValueError(
        f"LlamaConfig.mlp_activation={c.mlp_activation!r}; expected one of "
        f"{sorted(_ACTIVATIONS)}."
      )
    if c.sliding_window is not None and len(c.sliding_layers) != c.num_layers:
      raise ValueError(
        f"LlamaConfig.sliding_layers has {len(c.sliding_layers)} entries; "
        f"expected num_layers={c.num_layers} with sliding_window set."
      )
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(_KERNEL_INIT, ("vocab", "embed")),
      (c.vocab_size, c.hidden_size),
      c.param_dtype,
    )
    layer_cls = DecoderLayer
    if c.remat:
      layer_cls = nn.remat(
        DecoderLayer,
        policy=jax.checkpoint_policies.nothing_saveable,
        prevent_cse=False,  # not needed inside scan
      )
    self.layers = nn.scan(
      layer_cls,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
      length=c.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(c, name="layers")
    self.final_norm = RMSNorm(c)
    if not c.tie_word_embeddings:
      self.lm_head = self.param(
        "lm_head",
        nn.with_logical_partitioning(_KERNEL_INIT, ("embed", "vocab")),
        (c.hidden_size, c.vocab_size),
        c.param_dtype,
      )

  def embed(self, input_ids):
    """Returns the input embeddings [..., hidden] of token ids.

    With `embedding_scale` (Gemma) they are multiplied by sqrt(hidden) in
    the compute dtype, as in the reference; `input_embeds` passed to
    `__call__` are used as given, i.e. they live in this scaled space.
    """
    c = self.config
    x = jnp.take(self.embedding, input_ids, axis=0).astype(c.dtype)
    if c.embedding_scale:
      x = x * jnp.asarray(c.hidden_size**0.5, c.dtype)
    return x

  def logits(self, hidden, output_head=None):
    """Maps final hidden states to float32 vocabulary logits (soft-capped
    with `final_logit_softcap`).

    Args:
      hidden: [..., hidden] final-norm hidden states.
      output_head: optional [hidden, vocab] head weight prepared once by
        `decode_step_inputs` (a decoding loop then does not transpose the
        tied embedding at every step); by default the model's own.
    """
    c = self.config
    if output_head is not None:
      w, tied = output_head, False
    elif c.tie_word_embeddings:
      w, tied = self.embedding, True
    else:
      w, tied = self.lm_head, False
    if c.frozen_matmul is not None:
      logits = _frozen_dense(c, hidden, w, 1, transpose_w=tied)
    else:
      spec = "...e,ve->...v" if tied else "...e,ev->...v"
      logits = jnp.einsum(
        spec,
        hidden.astype(c.dtype),
        w.astype(c.dtype),
        preferred_element_type=jnp.float32,
      )
    return _softcap(logits, c.final_logit_softcap)

  def decode_step_inputs(self, params) -> dict:
    """Extra `__call__` inputs for one-token decoding steps, made once
    before the loop (see `decoding`): the layers unstacked
    (`layer_params`) and, with `frozen_matmul`, the output head as a
    row-major bf16 [hidden, vocab] array (`output_head`) and the layers'
    matmul weights in bf16.

    One token per row is bound by reading the weights: a scanned layer
    stack would copy each layer's slice at every step, and a tied head
    would be transposed at every step. The barrier keeps XLA from moving
    that work back into the loop.
    """
    layers = unstack_layers(params)
    if self.config.frozen_matmul is not None:
      # The matmul weights in bf16 once, not cast at every step.
      layers = [
        {
          k: v.astype(jnp.bfloat16) if k in DENSE_LAYERS else v
          for k, v in p.items()
        }
        for p in layers
      ]
    inputs = dict(layer_params=layers)
    if self.config.frozen_matmul is not None:
      if self.config.tie_word_embeddings:
        head = onednn_matmul.row_major_transpose(
          params["embedding"].astype(jnp.bfloat16)
        )
      else:
        head = params["lm_head"].astype(jnp.bfloat16)
      inputs["output_head"] = head
    return jax.lax.optimization_barrier(inputs)

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """Same as the module-level `init_cache` for this model's config."""
    return init_cache(self.config, batch_size, max_len)

  def __call__(
    self,
    input_ids=None,
    input_embeds=None,
    attention_mask=None,
    positions=None,
    cache=None,
    return_hidden=False,
    last_only=False,
    layer_params=None,
    key_visibility=None,
    output_head=None,
  ):
    """Runs the decoder on a chunk of tokens.

    Args:
      input_ids: [batch, time] int token ids, or None if input_embeds given.
      input_embeds: [batch, time, hidden] input embeddings instead of ids.
      attention_mask: [batch, time] 1 for real tokens, 0 for padding (left
        padding for generation); None means all real.
      positions: [batch, time] rotary positions; by default the count of
        real tokens before each one (plus the cache's next_position).
      cache: a cache from `init_cache` to extend, or None for a plain
        forward pass. Chunk tokens go into slots index .. index + time - 1.
      return_hidden: return final-norm hidden states instead of logits
        (e.g. to compute logits only where a loss needs them).
      last_only: only the last column's output ([batch, 1, ...]): decoding
        needs no more from a prefill, and the vocabulary head over the
        whole prompt would cost a fifth of SmolLM2's prefill FLOPs.
      layer_params: `unstack_layers(params)` to run the layers unrolled on
        separate arrays instead of scanned over the stacked ones. For
        one-token decoding steps, which are bound by reading the weights:
        a scan slices (copies) every layer's weights out of the stacked
        arrays at each step. Compiles slower; same results.
      key_visibility: [batch, time, cache_len] bool, with a cache only:
        which cache slots each query token attends to, replacing the
        causal and padding rule (tree attention: beam search keeps every
        beam of a row in one cache row, each beam seeing the prompt and its
        own ancestors). Pass explicit `positions` with it.
      output_head: see `logits`.

    Returns:
      (logits [batch, time, vocab] float32 or hidden states, new cache or
      None).
    """
    c = self.config
    if (input_ids is None) == (input_embeds is None):
      raise ValueError("Pass exactly one of input_ids and input_embeds.")
    x = self.embed(input_ids) if input_embeds is None else input_embeds
    x = _constrain(x.astype(c.dtype), _ACT_EMBED)
    b, t = x.shape[:2]
    mask = (
      jnp.ones((b, t), bool)
      if attention_mask is None
      else attention_mask.astype(bool)
    )
    start = 0 if cache is None else cache["next_position"][:, None]
    if positions is None:
      positions = start + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    angles = positions[..., None].astype(
      jnp.float32
    ) * rope_inverse_frequencies(c)
    rope = (jnp.cos(angles).astype(c.dtype), jnp.sin(angles).astype(c.dtype))

    query_slots = jnp.arange(t)
    if cache is None:
      key_mask, key_slots, index = mask, query_slots, 0
    else:
      index = cache["index"]
      key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
      key_slots = jnp.arange(key_mask.shape[1])
    causal = key_slots[None, :] <= (query_slots + index)[:, None]
    allowed = causal[None] & key_mask[:, None, :]
    if key_visibility is not None:
      allowed = key_visibility.astype(bool)
    if c.sliding_window is not None:
      # Keys less than `sliding_window` slots back, as the reference's mask
      # (slot distance: with tree attention a beam's ancestors may be
      # nearer in tokens than in slots, which matters only past the window).
      near = key_slots[None, :] > (query_slots + index)[:, None] - (
        c.sliding_window
      )
      allowed = (allowed, allowed & near[None])

    if layer_params is None:
      (x, _), new_kv = self.layers((x, 0), cache, rope, allowed, index)
    else:
      layer_kv = []
      # An unbound copy of the scanned layer, applied to each layer's own
      # params (parent=None: not a submodule, it owns no variables here).
      layer = DecoderLayer(c, parent=None)
      for i, one_layer in enumerate(layer_params):
        (x, _), kv = layer.apply(
          {"params": one_layer}, (x, i), cache, rope, allowed, index
        )
        layer_kv.append(kv)
      new_kv = jax.tree.map(lambda *kv: jnp.stack(kv), *layer_kv)
    hidden = self.final_norm(x[:, -1:] if last_only else x)
    out = hidden if return_hidden else self.logits(hidden, output_head)
    if cache is None:
      return out, None
    new_k, new_v = (jnp.swapaxes(a, 0, 1) for a in new_kv)  # batch first
    last = jnp.max(jnp.where(mask, positions + 1, 0), axis=1)
    new_cache = dict(
      k=jax.lax.dynamic_update_slice(cache["k"], new_k, (0, 0, index, 0, 0)),
      v=jax.lax.dynamic_update_slice(cache["v"], new_v, (0, 0, index, 0, 0)),
      mask=key_mask,
      next_position=jnp.maximum(cache["next_position"], last),
      index=index + t,
    )
    return out, new_cache


def lora_shapes(shape, in_dims: int, rank: int):
  """(A's shape [*in, rank], B's shape [rank, *out]) for a weight [*in, *out]
  whose first `in_dims` axes are the input."""
  return (*shape[:in_dims], rank), (rank, *shape[in_dims:])


def _lora_a_init(fan_in: int):
  # As LoRA's reference implementation: A uniform in +-1/sqrt(fan_in)
  # (PyTorch's default Linear init), B zero.
  def init(key, shape, dtype=jnp.float32):
    bound = fan_in**-0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def init_lora(config: LlamaConfig, rng) -> dict:
  """Fresh LoRA parameters of `config` (A drawn, B zero), stacked by layer.

  Returns:
    {"<name>_lora_a": f32 [num_layers, *in, lora_rank], "<name>_lora_b":
    f32 [num_layers, lora_rank, *out]} for each name in `lora_targets`, as
    boxed `nn.LogicallyPartitioned` leaves; {} when `lora_rank` is 0. Under
    jit only these are computed (the model's other weights are dropped).
  """
  if not config.lora_rank:
    return {}
  variables = Llama(config).init(rng, jnp.zeros((1, 1), jnp.int32))
  layers = variables["params"]["layers"]
  return {k: v for k, v in layers.items() if LORA_PARAM.match(k)}


def with_lora(llm_params: dict, lora_params: dict | None) -> dict:
  """The LLM's params with LoRA's (`init_lora`'s layout) among its layers'.

  Raises:
    ValueError: a LoRA leaf name that is not "<dense layer>_lora_<a|b>".
  """
  if not lora_params:
    return llm_params
  for name in lora_params:
    match = LORA_PARAM.match(name)
    if not match or match["name"] not in DENSE_LAYERS:
      raise ValueError(
        f"LoRA parameter {name!r}: expected '<layer>_lora_a' or "
        f"'<layer>_lora_b' with <layer> one of {DENSE_LAYERS}."
      )
  return {**llm_params, "layers": {**llm_params["layers"], **lora_params}}


def unstack_layers(params) -> list:
  """Splits the stacked (scanned) layer params into one tree per layer."""
  stacked = params["layers"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)]


def logical_partition_specs(config: LlamaConfig):
  """Returns the params' PartitionSpecs in logical axis names (no devices)."""
  model = Llama(config)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  )
  return nn.get_partition_spec(shapes)["params"]
