"""The ILM item encoder: a BLIP-2 Q-Former over collaborative-filtering input.

A BERT encoder (text branch, initialised from all-MiniLM-L6-v2) whose
self-attention layers are shared by `num_queries` learned query tokens. Every
`cross_attention_freq`-th layer lets the queries cross-attend to CF tokens:
the item's (or user's) frozen CF vector, mapped to `num_cf_tokens` tokens by
a learned linear map and LayerNorm. Queries and text have separate
feed-forward blocks (the query FFN starts as a copy of the text FFN).

Forward modes, each an attention mask defined below: queries only (the item
representation for ITC/II/UI and phase 2), text only (ITC's text [CLS]),
queries+text bidirectional (ITM) and multimodal-causal (ITG, with
`decoder_bos_id` replacing [CLS]).

`phase1_losses(params, batch, rng, config)` is the pretraining objective the
trainer differentiates: `QFormer.phase1` reads top to bottom in sections
(ITC, ITM, ITG, II, UI), each a method returning `(loss, metrics)`, summed
with the weights of `config.losses` (as LAVIS' `Blip2Qformer.forward`). The
pure math (contrastive losses, hard-negative sampling) is `ilm_jax.losses`.
`encode_items` gives phase 2 its query outputs.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ilm_jax import losses
from ilm_jax.models import bert

# The phase-1 objectives, in the order the objective runs them, and the batch
# keys each one reads.
LOSS_INPUTS = {
  "itc": ("item_cf", "text_ids", "text_mask"),
  "itm": ("item_cf", "text_ids", "text_mask"),
  "itg": ("item_cf", "text_ids", "text_mask"),
  "ii": ("item_cf", "pair_cf"),
  "ui": ("user_cf", "user_item_cf"),
}
LOSS_NAMES = tuple(LOSS_INPUTS)
# The CF inputs in the order of the shared queries-only pass.
CF_KEYS = ("item_cf", "pair_cf", "user_cf", "user_item_cf")


# Attention masks: boolean `[B, L_query, L_key]`, True where a position may
# attend. In joint sequences the queries come first (`num_queries`
# positions), then the text.


def unimodal_text_mask(text_mask):
  """Text-only pass (ITC's text encoder): every token sees the valid text.

  Args:
    text_mask: `[B, T]`, 1 (or True) for real tokens.

  Returns:
    `[B, T, T]` bool.
  """
  valid = text_mask.astype(bool)
  return jnp.broadcast_to(valid[:, None, :], valid.shape + valid.shape[-1:])


def query_only_mask(batch_size: int, num_queries: int):
  """Queries-only pass (item representation): `[B, Q, Q]`, all True."""
  return jnp.ones((batch_size, num_queries, num_queries), bool)


def bidirectional_mask(num_queries: int, text_mask):
  """ITM: queries and text see every query and every valid text token.

  Args:
    num_queries: Q.
    text_mask: `[B, T]`, 1 (or True) for real tokens.

  Returns:
    `[B, Q + T, Q + T]` bool.
  """
  keys = jnp.concatenate(
    [jnp.ones((text_mask.shape[0], num_queries), bool), text_mask.astype(bool)],
    axis=1,
  )
  length = keys.shape[1]
  return jnp.broadcast_to(keys[:, None, :], (keys.shape[0], length, length))


def multimodal_causal_mask(num_queries: int, text_mask):
  """ITG: queries see queries only; text sees all queries and earlier text.

  Args:
    num_queries: Q.
    text_mask: `[B, T]`, 1 (or True) for real tokens.

  Returns:
    `[B, Q + T, Q + T]` bool.
  """
  batch, text_len = text_mask.shape
  length = num_queries + text_len
  row = jnp.arange(length)[:, None]
  col = jnp.arange(length)[None, :]
  query_rows = (row < num_queries) & (col < num_queries)
  # Text rows see every query column and text columns up to themselves.
  text_rows = (row >= num_queries) & ((col < num_queries) | (col <= row))
  structure = query_rows | text_rows
  keys = jnp.concatenate(
    [jnp.ones((batch, num_queries), bool), text_mask.astype(bool)], axis=1
  )
  return structure[None] & keys[:, None, :]


class QFormerLayer(nn.Module):
  """Shared self-attention, optional query cross-attention, split FFNs."""

  config: ml_collections.FrozenConfigDict
  has_cross_attention: bool

  @nn.compact
  def __call__(self, x, mask, cf_tokens, num_queries, deterministic):
    c = self.config
    attention = functools.partial(
      bert.BertAttention,
      c.hidden_size,
      c.num_heads,
      c.layer_norm_eps,
      c.dropout_rate,
    )
    ffn = functools.partial(
      bert.BertFeedForward,
      c.hidden_size,
      c.intermediate_size,
      c.layer_norm_eps,
      c.dropout_rate,
    )
    x = attention(name="self_attention")(x, x, mask, deterministic)
    queries, text = x[:, :num_queries], x[:, num_queries:]
    outputs = []
    if num_queries:
      if self.has_cross_attention:
        queries = attention(name="cross_attention")(
          queries, cf_tokens, None, deterministic
        )
      outputs.append(ffn(name="query_ffn")(queries, deterministic))
    if text.shape[1]:
      outputs.append(ffn(name="text_ffn")(text, deterministic))
    return jnp.concatenate(outputs, axis=1)


def _normalize(x):
  # Finite gradients at an exactly-zero vector (see losses.l2_normalize).
  return losses.l2_normalize(x)


class QFormer(nn.Module):
  """The Q-Former; call its methods through `model.apply(..., method=...)`."""

  config: ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    init = nn.initializers.normal(stddev=0.02)
    self.embeddings = bert.BertEmbeddings(
      c.vocab_size,
      c.hidden_size,
      c.max_position_embeddings,
      c.type_vocab_size,
      c.layer_norm_eps,
      c.dropout_rate,
    )
    self.query_tokens = self.param(
      "query_tokens", init, (1, c.num_queries, c.hidden_size)
    )
    self.cf_input = nn.Dense(c.num_cf_tokens * c.hidden_size, kernel_init=init)
    self.cf_norm = nn.LayerNorm(epsilon=c.layer_norm_eps)
    self.layers = [
      QFormerLayer(c, has_cross_attention=i % c.cross_attention_freq == 0)
      for i in range(c.num_layers)
    ]
    self.item_proj = nn.Dense(c.embed_dim, kernel_init=init)
    self.text_proj = nn.Dense(c.embed_dim, kernel_init=init)
    self.itm_head = nn.Dense(2, kernel_init=init)
    self.lm_transform = nn.Dense(c.hidden_size, kernel_init=init)
    self.lm_norm = nn.LayerNorm(epsilon=c.layer_norm_eps)
    self.lm_bias = self.param("lm_bias", nn.initializers.zeros, (c.vocab_size,))
    self.temperature = self.param(
      "temperature", nn.initializers.constant(c.temperature_init), ()
    )

  def cf_tokens(self, cf):
    """`[B, cf_dim]` CF vectors -> `[B, num_cf_tokens, hidden]`."""
    c = self.config
    if cf.ndim != 2 or cf.shape[-1] != c.cf_dim:
      raise ValueError(
        f"CF input has shape {cf.shape}; expected [batch, {c.cf_dim}] "
        f"(config cf_dim={c.cf_dim}). Is the CF table's embed_dim the "
        "same as the Q-Former's cf_dim?"
      )
    tokens = self.cf_input(cf).reshape(
      cf.shape[0], c.num_cf_tokens, c.hidden_size
    )
    return self.cf_norm(tokens)

  def encode(self, cf, token_ids, attention_mask, deterministic=True):
    """Any mode: queries (if `cf`) then text (if `token_ids`), given a mask.

    Args:
      cf: `[B, cf_dim]` or None (text only).
      token_ids: `[B, T]` or None (queries only).
      attention_mask: `[B, L, L]` bool over [queries; text] (the masks
        above).
      deterministic: disables dropout.

    Returns:
      (query outputs `[B, Q or 0, hidden]`, text outputs `[B, T or 0, hidden]`).
    """
    num_queries, cf_tokens, prefix = 0, None, None
    if cf is not None:
      num_queries, cf_tokens = self.config.num_queries, self.cf_tokens(cf)
      prefix = jnp.broadcast_to(
        self.query_tokens, (cf.shape[0],) + self.query_tokens.shape[1:]
      )
    x = self.embeddings(token_ids, prefix, deterministic)
    for layer in self.layers:
      x = layer(x, attention_mask, cf_tokens, num_queries, deterministic)
    return x[:, :num_queries], x[:, num_queries:]

  def encode_queries(self, cf, deterministic=True):
    """Queries only: `[B, cf_dim]` -> query outputs `[B, Q, hidden]`."""
    mask = query_only_mask(cf.shape[0], self.config.num_queries)
    return self.encode(cf, None, mask, deterministic)[0]

  def encode_text(self, token_ids, token_mask, deterministic=True):
    """Text only (unimodal): `[B, T]` ids -> `[B, T, hidden]`."""
    mask = unimodal_text_mask(token_mask)
    return self.encode(None, token_ids, mask, deterministic)[1]

  def encode_joint(self, cf, token_ids, token_mask, causal, deterministic=True):
    """Queries + text; ITG's multimodal-causal mask if `causal`, else ITM's.

    Returns:
      (query outputs `[B, Q, hidden]`, text outputs `[B, T, hidden]`).
    """
    build = multimodal_causal_mask if causal else bidirectional_mask
    mask = build(self.config.num_queries, token_mask)
    return self.encode(cf, token_ids, mask, deterministic)

  def item_features(self, query_outputs):
    """Normalised contrastive features of each query `[B, Q, embed_dim]`."""
    return _normalize(self.item_proj(query_outputs))

  def text_features(self, text_outputs):
    """Normalised contrastive feature of the text [CLS] `[B, embed_dim]`."""
    return _normalize(self.text_proj(text_outputs[:, 0]))

  def itm_logits(self, query_outputs):
    """Match / no-match logits `[B, 2]`, averaged over the queries."""
    return self.itm_head(query_outputs).mean(axis=1)

  def lm_logits(self, text_outputs):
    """BERT MLM-style head tied to the word embeddings: `[B, T, vocab]`."""
    h = jax.nn.gelu(self.lm_transform(text_outputs), approximate=False)
    h = self.lm_norm(h)
    return self.embeddings.word_embeddings.attend(h) + self.lm_bias

  def temperature_value(self):
    # Clipped like LAVIS' in-place clamp; keeps the logits scale sane.
    return jnp.clip(self.temperature, 0.001, 0.5)

  def __call__(self, cf, token_ids, token_mask, deterministic=True):
    """Touches every parameter (used by `init`)."""
    queries, text = self.encode_joint(
      cf, token_ids, token_mask, False, deterministic
    )
    return (
      self.item_features(queries),
      self.text_features(text),
      self.itm_logits(queries),
      self.lm_logits(text),
      self.temperature_value(),
    )

  # --- Phase-1 objective: sections ITC, ITM, ITG, II, UI. -------------------

  def phase1(self, batch, enabled, negatives_rng, deterministic):
    """The weighted phase-1 objective; called through `phase1_losses`.

    Args:
      batch: the arrays `LOSS_INPUTS` names for the `enabled` objectives.
      enabled: frozenset of objective names with a non-zero weight.
      negatives_rng: PRNG key for ITM's hard negatives.
      deterministic: disables dropout.

    Returns:
      (weighted total, metrics); see `phase1_losses`.
    """
    temperature = self.temperature_value()
    metrics = {"temperature": temperature}
    # Inputs shared by several sections: the queries-only features of every
    # CF input (one pass: rows are independent), the text [CLS] features and
    # the item-text pairs that are not negatives.
    cf_keys = [
      key
      for key in CF_KEYS
      # ITG reads the item through its own multimodal-causal pass.
      if any(key in LOSS_INPUTS[name] for name in enabled - {"itg"})
    ]
    features = self.query_features(batch, cf_keys, deterministic)
    if enabled & {"itc", "itm", "itg"}:
      positives, counts = text_pair_positives(batch)
      metrics.update(counts)
    if enabled & {"itc", "itm"}:
      text = self.text_features(
        self.encode_text(batch["text_ids"], batch["text_mask"], deterministic)
      )

    sections = {}
    if "itc" in enabled:
      sections["itc"] = self.itc_loss(features["item_cf"], text, positives)
    if "itm" in enabled:
      sections["itm"] = self.itm_loss(
        batch,
        features["item_cf"],
        text,
        positives,
        negatives_rng,
        deterministic,
      )
    if "itg" in enabled:
      sections["itg"] = self.itg_loss(batch, deterministic)
    if "ii" in enabled:
      sections["ii"] = self.query_set_loss(
        batch, features, "item_cf", "pair_cf"
      )
    if "ui" in enabled:
      sections["ui"] = self.query_set_loss(
        batch, features, "user_cf", "user_item_cf"
      )

    total = sum(
      self.config.losses[name] * loss for name, (loss, _) in sections.items()
    )
    for name, (loss, section_metrics) in sections.items():
      metrics[f"{name}/loss"] = loss
      metrics.update({f"{name}/{k}": v for k, v in section_metrics.items()})
    metrics["loss"] = total
    return total, metrics

  def query_features(self, batch, keys, deterministic):
    """Normalised query features `[B, Q, embed_dim]` of `batch[key]` per key.

    All keys go through one queries-only pass; `{}` for no keys.
    """
    if not keys:
      return {}
    queries = self.encode_queries(
      jnp.concatenate([batch[key] for key in keys]), deterministic
    )
    features = jnp.split(self.item_features(queries), len(keys))
    return dict(zip(keys, features, strict=True))

  def itc_loss(self, item_features, text_features, positives):
    """ITC: item <-> text InfoNCE on the max-over-queries similarity.

    Args:
      item_features: `[B, Q, embed_dim]` (`query_features` of `item_cf`).
      text_features: `[B, embed_dim]` (`text_features` of the text pass).
      positives: `[B, B]` bool from `text_pair_positives`.

    Returns:
      (loss, metrics) of `losses.item_text_contrastive_loss`.
    """
    return losses.item_text_contrastive_loss(
      item_features,
      text_features,
      self.temperature_value(),
      positives,
      self.config.itc_label_smoothing,
    )

  def itm_loss(
    self, batch, item_features, text_features, positives, rng, deterministic
  ):
    """ITM: each matched pair against a hard negative text and a hard item.

    Negatives are drawn from the ITC similarities (never a positive). The
    `3B` pairs (matched; negative item with the text; item with a negative
    text) go through one bidirectional pass, as in BLIP-2.

    Args:
      batch: `item_cf` `[B, cf_dim]`, `text_ids` / `text_mask` `[B, T]`.
      item_features, text_features, positives: as in `itc_loss`.
      rng: PRNG key for the negatives.
      deterministic: disables dropout.

    Returns:
      (loss, metrics) of `losses.item_text_matching_loss` over `3B` pairs.
    """
    cf, ids, mask = batch["item_cf"], batch["text_ids"], batch["text_mask"]
    logits = (
      losses.item_text_similarity(item_features, text_features)
      / self.temperature_value()
    )
    neg_text, neg_item = losses.sample_hard_negatives(rng, logits, positives)
    queries, _ = self.encode_joint(
      jnp.concatenate([cf, cf[neg_item], cf]),
      jnp.concatenate([ids, ids, ids[neg_text]]),
      jnp.concatenate([mask, mask, mask[neg_text]]),
      False,
      deterministic,
    )
    batch_size = ids.shape[0]
    labels = jnp.concatenate(
      [jnp.ones(batch_size, jnp.int32), jnp.zeros(2 * batch_size, jnp.int32)]
    )
    return losses.item_text_matching_loss(self.itm_logits(queries), labels)

  def itg_loss(self, batch, deterministic):
    """ITG: the text generated from the queries (multimodal-causal pass).

    The decoder input replaces [CLS] by `decoder_bos_id`; the targets are
    the text's tokens 1.. (`losses.text_generation_loss`).

    Returns:
      (loss, metrics) of `losses.text_generation_loss`.
    """
    c = self.config
    ids, mask = batch["text_ids"], batch["text_mask"]
    _, text = self.encode_joint(
      batch["item_cf"],
      ids.at[:, 0].set(c.decoder_bos_id),
      mask,
      True,
      deterministic,
    )
    return losses.text_generation_loss(
      self.lm_logits(text), ids, mask, c.itg_label_smoothing
    )

  def query_set_loss(self, batch, features, key_a, key_b):
    """II (item, co-occurring item) or UI (user, liked item) InfoNCE.

    A repeated row on either side is a positive, not a negative.

    Args:
      batch: `[B, cf_dim]` arrays under `key_a` and `key_b`.
      features: `query_features` of both keys.
      key_a, key_b: the two CF inputs.

    Returns:
      (loss, metrics) of `losses.query_set_contrastive_loss`.
    """
    positives = losses.duplicate_mask(batch[key_a]) | losses.duplicate_mask(
      batch[key_b]
    )
    return losses.query_set_contrastive_loss(
      features[key_a], features[key_b], self.temperature_value(), positives
    )


def make_model(config) -> QFormer:
  """The Q-Former module for a (possibly mutable) config."""
  return QFormer(ml_collections.FrozenConfigDict(config))


def _copy_text_ffn_to_query_ffn(params):
  for name, layer in params.items():
    if name.startswith("layers_"):
      layer["query_ffn"] = jax.tree.map(jnp.array, layer["text_ffn"])
  return params


def _init_inputs(config):
  ids = jnp.zeros((1, 2), jnp.int32)
  return jnp.zeros((1, config.cf_dim), jnp.float32), ids, jnp.ones_like(ids)


def param_shapes(config) -> dict:
  """The params tree as `jax.ShapeDtypeStruct`s (no compute, no compile)."""
  return jax.eval_shape(
    make_model(config).init, jax.random.key(0), *_init_inputs(config)
  )["params"]


def init_params(config, rng) -> dict:
  """Random Q-Former params (query FFNs copied from the text FFNs).

  Args:
    config: a `qformer.model` config section (configs/ml1m.py).
    rng: PRNG key.

  Returns:
    The params tree (no "params" wrapper).
  """
  params = jax.jit(make_model(config).init)(rng, *_init_inputs(config))
  params = params["params"]
  return _copy_text_ffn_to_query_ffn(dict(params))


def load_pretrained_text_branch(params, minilm_dir=None) -> dict:
  """Maps a BERT checkpoint onto the embeddings, self-attention and FFNs.

  Layers beyond the checkpoint's depth, cross-attention, queries, CF input
  and all heads keep their values. Every query FFN becomes a copy of its
  layer's text FFN, as in BLIP-2.

  Args:
    params: Q-Former params from `init_params`.
    minilm_dir: HF-layout checkpoint directory; None: the pinned MiniLM.

  Returns:
    New params (the input is not modified).
  """
  tensors, _ = bert.load_checkpoint(minilm_dir)
  params = jax.tree.map(lambda x: x, params)  # fresh containers
  num_layers = sum(name.startswith("layers_") for name in params)
  available = sum(k.endswith("attention.self.query.weight") for k in tensors)
  loaded = {"embeddings": bert.embedding_params(tensors)}
  for i in range(min(num_layers, available)):
    loaded[f"layers_{i}"] = {
      "self_attention": bert.attention_params(tensors, i),
      "text_ffn": bert.ffn_params(tensors, i),
    }

  def merge(target, source, path):
    for key, value in source.items():
      if isinstance(value, dict):
        merge(target[key], value, f"{path}/{key}")
        continue
      if target[key].shape != value.shape:
        raise ValueError(
          f"Checkpoint {path}/{key} has shape {value.shape} but the "
          f"Q-Former expects {target[key].shape}: set hidden_size, "
          "num_heads, intermediate_size, vocab_size and "
          "max_position_embeddings to the checkpoint's config.json."
        )
      target[key] = jnp.asarray(value, target[key].dtype)

  merge(params, loaded, "")
  return _copy_text_ffn_to_query_ffn(params)


def load(params, config) -> dict:
  """Applies `config.pretrained` ("" keeps params; "minilm"; a directory)."""
  if not config.pretrained:
    return params
  minilm_dir = None if config.pretrained == "minilm" else config.pretrained
  return load_pretrained_text_branch(params, minilm_dir)


@functools.lru_cache(maxsize=8)
def _jitted_encode_queries(frozen_config):
  model = QFormer(frozen_config)
  return jax.jit(
    lambda params, cf: model.apply(
      {"params": params}, cf, method=QFormer.encode_queries
    )
  )


def encode_items(params, cf_embeddings, config, batch_size: int = 256):
  """Query outputs for many CF vectors (items or users), in fixed-size batches.

  Args:
    params: Q-Former params.
    cf_embeddings: `[N, cf_dim]`.
    config: the Q-Former config.
    batch_size: rows per jitted call (the last batch is padded, so one
      compilation serves every N).

  Returns:
    `[N, num_queries, hidden_size]` float32.
  """
  cf_embeddings = jnp.asarray(cf_embeddings, jnp.float32)
  if cf_embeddings.ndim != 2 or cf_embeddings.shape[1] != config.cf_dim:
    raise ValueError(
      f"cf_embeddings has shape {cf_embeddings.shape}; "
      f"expected [N, {config.cf_dim}] (config cf_dim)."
    )
  encode = _jitted_encode_queries(ml_collections.FrozenConfigDict(config))
  num = cf_embeddings.shape[0]
  padded = jnp.pad(cf_embeddings, ((0, -num % batch_size), (0, 0)))
  chunks = [
    encode(params, padded[i : i + batch_size])
    for i in range(0, padded.shape[0], batch_size)
  ]
  return jnp.concatenate(chunks)[:num]


def text_pair_positives(batch):
  """ITC/ITM pairs that are not negatives, and their counts as metrics.

  One item twice in the batch, or different items with token-identical texts
  (item i with text j would be byte-identical to the true pair (i, i)).

  Args:
    batch: `item_cf` `[B, cf_dim]`, `text_ids` / `text_mask` `[B, T]`.

  Returns:
    (`[B, B]` bool, True on the diagonal; {"batch/duplicate_item_pairs",
    "batch/duplicate_text_pairs", "batch/rows_without_negative"}).
  """
  same_item = losses.duplicate_mask(batch["item_cf"])
  same_text = losses.same_text_mask(batch["text_ids"], batch["text_mask"])
  counts = losses.duplicate_pair_counts(same_item, same_text)
  return same_item | same_text, {f"batch/{k}": v for k, v in counts.items()}


def _check_batch(batch, config, enabled) -> dict:
  """The arrays the enabled objectives read; ValueError if absent or bad."""
  needed = sorted({key for name in enabled for key in LOSS_INPUTS[name]})
  missing = [key for key in needed if key not in batch]
  if missing:
    raise ValueError(
      f"Phase-1 batch lacks {missing} needed by the enabled "
      f"losses {sorted(enabled)}."
    )
  batch = {key: jnp.asarray(batch[key]) for key in needed}
  sizes = {key: value.shape[0] for key, value in batch.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"Batch arrays disagree on batch size: {sizes}.")
  for key in set(needed) & set(CF_KEYS):
    if batch[key].ndim != 2 or batch[key].shape[1] != config.cf_dim:
      raise ValueError(
        f"batch[{key!r}] has shape {batch[key].shape}; expected [batch, "
        f"{config.cf_dim}] (config cf_dim). The CF table and the Q-Former "
        "config disagree."
      )
  if "text_ids" in batch:
    ids, mask = batch["text_ids"], batch["text_mask"]
    if ids.shape[1] > config.max_text_len or mask.shape != ids.shape:
      raise ValueError(
        f"text_ids {ids.shape} / text_mask {mask.shape}: need equal shapes "
        f"and at most max_text_len={config.max_text_len} tokens (tokenize "
        "with bert.WordPieceTokenizer(max_length=max_text_len))."
      )
  return batch


def phase1_losses(params, batch, rng, config, deterministic=False):
  """The weighted phase-1 objective (ITC + ITM + ITG + II + UI).

  Args:
    params: Q-Former params.
    batch: dict of arrays (global batch; see `ilm_jax.losses` on sharding):
      `item_cf` [B, cf_dim] float, `text_ids` / `text_mask` [B, T] int (T <=
      max_text_len, starting with [CLS]), and for II `pair_cf`, for UI
      `user_cf` and `user_item_cf` [B, cf_dim]. Other keys are ignored.
    rng: PRNG key (dropout and ITM negative sampling).
    config: the Q-Former config; `config.losses` weights each objective and
      a weight of 0 skips it entirely (its batch keys are then optional).
    deterministic: disables dropout (evaluation).

  Returns:
    (total loss, metrics) with "<loss>/loss", "<loss>/accuracy", ... per
    enabled objective, "temperature" and "loss"; with ITC, ITM or ITG also
    "batch/duplicate_item_pairs", "batch/duplicate_text_pairs" (different
    items, token-identical texts: positives for ITC, never ITM negatives)
    and "batch/rows_without_negative" (see losses.sample_hard_negatives).
    All float32 scalars.

  Raises:
    ValueError: unknown or all-zero loss weights, or a batch key that an
      enabled objective needs is missing or has the wrong shape.
  """
  unknown = set(config.losses) - set(LOSS_NAMES)
  if unknown:
    raise ValueError(
      f"Unknown phase-1 losses {sorted(unknown)}; "
      f"expected a subset of {LOSS_NAMES}."
    )
  enabled = frozenset(n for n, w in config.losses.items() if float(w) != 0.0)
  if not enabled:
    raise ValueError("All phase-1 loss weights are 0.")
  batch = _check_batch(batch, config, enabled)
  dropout_rng, negatives_rng = jax.random.split(rng)
  return make_model(config).apply(
    {"params": params},
    batch,
    enabled,
    negatives_rng,
    deterministic,
    method=QFormer.phase1,
    rngs={"dropout": dropout_rng},
  )


# Public names this module had and no longer has, with what replaces them:
# scripts written against the old API get a pointer instead of a bare
# AttributeError.
_REMOVED_NAMES = {
  "default_qformer_config": (
    "the Q-Former's defaults live only in the experiment config; use "
    "configs.ml1m.base_config().qformer.model (an ml_collections "
    "ConfigDict: change fields with .update(...), then pass it to "
    "init_params and phase1_losses)"
  ),
}


def __getattr__(name: str):
  """Module attribute lookup fallback (PEP 562): explains removed names.

  Raises:
    AttributeError: always; for a name in `_REMOVED_NAMES` the message
      says what replaces it.
  """
  if name in _REMOVED_NAMES:
    raise AttributeError(
      f"ilm_jax.models.qformer.{name} was removed: {_REMOVED_NAMES[name]}."
    )
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
