"""Phase-1 (Q-Former pretraining) losses: the pure math.

Pure functions of arrays (no parameters, no model). Losses return
`(scalar_loss, metrics_dict)`. The Q-Former's attention masks and the
objective that runs the model and sums these losses live in
`ilm_jax.models.qformer`.

In-batch negatives across a data-parallel mesh: the trainer jits the step
with the batch sharded over the mesh's data axes, so every array here is the
*global* batch and the `[B, B]` similarity matrices below are global too; XLA
inserts the all-gathers that LAVIS writes by hand (`concat_all_gather`).
Hence there is no rank offset in the targets and no `axis_name` argument.
"""

import jax
import jax.numpy as jnp


def l2_normalize(x, eps: float = 1e-12):
  """`x / max(||x||, eps)` along the last axis, with finite gradients at 0.

  The textbook `x / jnp.maximum(jnp.linalg.norm(x), eps)` is NaN in the
  backward pass at an exactly-zero vector: `maximum` routes a zero cotangent
  into the norm, whose derivative there is 0/0. Clamping the squared norm
  before the rsqrt keeps the same forward value and gives the zero vector a
  finite gradient (1/eps times the incoming cotangent, as the clamp implies).

  Args:
    x: `[..., E]` float.
    eps: the smallest norm divided by.

  Returns:
    `[..., E]`, unit norm (or the zero vector).
  """
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def same_text_mask(text_ids, text_mask):
  """`[B, B]` True where two rows hold token-identical texts.

  Different items can share a text (two catalogue entries with the same
  title): their pairs are indistinguishable from the true pair, so they must
  not be negatives. Padding is ignored (ids under a 0 mask may differ).

  Args:
    text_ids: `[B, T]` int token ids.
    text_mask: `[B, T]`, 1 (or True) for real tokens.

  Returns:
    `[B, B]` bool, True on the diagonal.
  """
  tokens = jnp.where(text_mask.astype(bool), text_ids, -1)
  same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
  return same | jnp.eye(tokens.shape[0], dtype=bool)


def duplicate_mask(embeddings):
  """`[B, B]` True where two rows hold the same (frozen) CF embedding.

  Identical items in one batch are not negatives of each other; frozen CF
  vectors identify items, so exact equality of vectors is equality of items.
  XLA fuses the compare into the reduction, so no `[B, B, D]` array is kept.

  Args:
    embeddings: `[B, D]`.

  Returns:
    `[B, B]` bool, True on the diagonal.
  """
  same = jnp.all(embeddings[:, None, :] == embeddings[None, :, :], axis=-1)
  return same | jnp.eye(embeddings.shape[0], dtype=bool)  # NaN != NaN


def item_text_similarity(item_features, text_features):
  """BLIP-2's ITC similarity: max over queries of query . text [CLS].

  Args:
    item_features: `[B_i, Q, E]` normalised projected query outputs.
    text_features: `[B_t, E]` normalised projected text [CLS] outputs.

  Returns:
    `[B_i, B_t]` cosine similarities.
  """
  return jnp.einsum("iqe,te->itq", item_features, text_features).max(-1)


def pooled_similarity(features_a, features_b):
  """Similarity of two query sets: cosine of their mean-pooled features.

  Used for item-item and user-item. Phase 2 hands the LLM all query outputs,
  so the whole set should carry the CF structure, not one query picked by a
  max; every query gets gradient, and it costs O(B^2 E) instead of the
  O(B^2 Q^2 E) of a max over query pairs.

  Args:
    features_a: `[B_a, Q, E]`.
    features_b: `[B_b, Q, E]`.

  Returns:
    `[B_a, B_b]` cosine similarities.
  """

  def pool(features):
    return l2_normalize(features.mean(axis=1))

  return pool(features_a) @ pool(features_b).T


def _soft_cross_entropy(logits, targets):
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def symmetric_contrastive_loss(
  similarity, temperature, positive_mask=None, label_smoothing: float = 0.0
):
  """InfoNCE in both directions with in-batch negatives.

  Args:
    similarity: `[B, B]`; row i's positive is column i.
    temperature: scalar; logits are similarity / temperature.
    positive_mask: optional `[B, B]` bool, symmetric, True for pairs that are
      positives too (duplicates); their target mass is shared equally.
    label_smoothing: mass spread uniformly over all columns (torch's
      `cross_entropy(label_smoothing=...)` convention).

  Returns:
    (mean of the two directions' losses, {"a2b_loss", "b2a_loss", "accuracy"}).
  """
  batch = similarity.shape[0]
  if positive_mask is None:
    positive_mask = jnp.eye(batch, dtype=bool)
  targets = positive_mask / positive_mask.sum(-1, keepdims=True)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / batch
  logits = similarity / temperature
  a2b = _soft_cross_entropy(logits, targets).mean()
  b2a = _soft_cross_entropy(logits.T, targets.T).mean()
  hit = jnp.take_along_axis(
    positive_mask, jnp.argmax(logits, axis=-1)[:, None], axis=-1
  )
  return (a2b + b2a) / 2, {
    "a2b_loss": a2b,
    "b2a_loss": b2a,
    "accuracy": hit.mean(),
  }


def item_text_contrastive_loss(
  item_features,
  text_features,
  temperature,
  positive_mask=None,
  label_smoothing: float = 0.1,
):
  """ITC: symmetric item<->text InfoNCE on the max-over-queries similarity.

  Args:
    item_features: `[B, Q, E]` normalised projected query outputs.
    text_features: `[B, E]` normalised projected text [CLS] outputs.
    temperature: scalar.
    positive_mask: optional `[B, B]` bool: duplicate items and items whose
      texts are token-identical (`duplicate_mask | same_text_mask`); they
      share the target mass instead of being negatives.
    label_smoothing: BLIP-2 uses 0.1.

  Returns:
    (loss, metrics) as in `symmetric_contrastive_loss`.
  """
  return symmetric_contrastive_loss(
    item_text_similarity(item_features, text_features),
    temperature,
    positive_mask,
    label_smoothing,
  )


def query_set_contrastive_loss(
  features_a, features_b, temperature, positive_mask=None
):
  """II / UI: symmetric InfoNCE between two sets of Q-Former outputs.

  Item-item: `a` the item, `b` a co-occurring item. User-item: `a` the user
  (the same Q-Former on the user's CF vector), `b` an item the user liked.
  """
  return symmetric_contrastive_loss(
    pooled_similarity(features_a, features_b), temperature, positive_mask
  )


def sample_hard_negatives(rng, logits, positive_mask):
  """ITM hard negatives: one per row and per column, drawn from softmax(logits).

  Positives (the diagonal, duplicate items and items with token-identical
  texts: `positive_mask`) are never drawn while a row has any negative. A
  row (or column) with no negative at all, as in a batch whose rows are all
  one item, draws uniformly among all B indices (all of them positives);
  `qformer.phase1_losses` reports how many rows that happened to
  ("batch/rows_without_negative").

  Args:
    rng: PRNG key.
    logits: `[B, B]` item-to-text ITC logits (no gradient is taken).
    positive_mask: `[B, B]` bool.

  Returns:
    (negative text index per item `[B]`, negative item index per text `[B]`),
    int32.
  """
  logits = jax.lax.stop_gradient(logits)
  rng_text, rng_item = jax.random.split(rng)

  def draw(key, scores, positives):
    # -inf (not a large negative number) excludes positives: the Gumbel
    # noise of categorical() is lost next to -1e9 in float32, which made
    # an all-positive row always draw index 0. Such rows draw from flat
    # scores instead, i.e. uniformly.
    has_negative = (~positives).any(axis=-1, keepdims=True)
    masked = jnp.where(positives, -jnp.inf, scores)
    masked = jnp.where(has_negative, masked, jnp.zeros_like(scores))
    return jax.random.categorical(key, masked, axis=-1)

  text_for_item = draw(rng_text, logits, positive_mask)
  item_for_text = draw(rng_item, logits.T, positive_mask.T)
  return text_for_item, item_for_text


def duplicate_pair_counts(same_item, same_text):
  """Counts of duplicate pairs in a batch, for the phase-1 metrics.

  Args:
    same_item: `[B, B]` bool from `duplicate_mask` (item CF vectors).
    same_text: `[B, B]` bool from `same_text_mask`.

  Returns:
    {"duplicate_item_pairs": unordered pairs of rows holding one item,
     "duplicate_text_pairs": unordered pairs of different items with
     token-identical texts,
     "rows_without_negative": rows whose every column is a positive},
    float32 scalars.
  """
  off_diagonal = ~jnp.eye(same_item.shape[0], dtype=bool)
  item_pairs = (same_item & off_diagonal).sum() / 2
  text_pairs = (same_text & ~same_item).sum() / 2
  no_negative = (same_item | same_text).all(axis=-1).sum()
  return {
    "duplicate_item_pairs": item_pairs.astype(jnp.float32),
    "duplicate_text_pairs": text_pairs.astype(jnp.float32),
    "rows_without_negative": no_negative.astype(jnp.float32),
  }


def item_text_matching_loss(logits, labels):
  """ITM: 2-way cross-entropy (1 = matched pair).

  Args:
    logits: `[N, 2]` match logits (already averaged over queries).
    labels: `[N]` int in {0, 1}.

  Returns:
    (mean cross-entropy, {"accuracy"}).
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1).mean()
  accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
  return loss, {"accuracy": accuracy}


def text_generation_loss(
  logits, token_ids, token_mask, label_smoothing: float = 0.1
):
  """ITG: next-token cross-entropy over the text, padding ignored.

  Position t predicts token t+1, so the BOS is never a target and the final
  [SEP] is. Averaged over all target tokens of the batch (not per sequence),
  as LAVIS' BertLMHeadModel does, with its label smoothing of 0.1.

  Args:
    logits: `[B, T, V]` LM logits at the text positions.
    token_ids: `[B, T]` the text (its first token is replaced by BOS in the
      decoder input; only tokens 1.. are targets).
    token_mask: `[B, T]`, 1 for real tokens.
    label_smoothing: as in `symmetric_contrastive_loss`.

  Returns:
    (loss, {"token_accuracy", "num_tokens"}).
  """
  logits, targets = logits[:, :-1], token_ids[:, 1:]
  weights = token_mask[:, 1:].astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  per_token = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(
    axis=-1
  )
  num_tokens = jnp.maximum(weights.sum(), 1.0)
  loss = (per_token * weights).sum() / num_tokens
  correct = (jnp.argmax(logits, axis=-1) == targets) * weights
  return loss, {
    "token_accuracy": correct.sum() / num_tokens,
    "num_tokens": weights.sum(),
  }
