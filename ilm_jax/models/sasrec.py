"""SASRec (Kang & McAuley 2018) trained with full softmax cross-entropy.

A causal self-attention encoder over a user's most recent items; the output
at each position is scored against every item embedding (shared with the
input embedding) to predict the next item. Trained on all positions of a
window at once with cross-entropy over the whole catalogue: the "SASRec+"
variant that is much stronger than the original binary loss with one
sampled negative (Klenitskiy & Vasilev 2023).

Sequence length. SASRec keeps its own `max_length` (200 on MovieLens in the
SASRec paper and in the `full` configs; 50 in configs/ml1m.py's `cpu` mode),
separate from `config.data.max_history` (20, the history cap of the LLM
prompts). Windows are left-padded, so the
most recent item always sits at position max_length - 1, in training and in
evaluation alike.

Training examples (`data.pipeline.sasrec_windows`): one window per user,
the last max_length + 1 items of the training part items[:-2]; inputs are
its first max_length items and targets the next item at each position. Validation and test histories are
the last max_length items before items[-2] and items[-1].
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ilm_jax.data import processing


class _Block(nn.Module):
  """Pre-LayerNorm causal self-attention and point-wise feed-forward."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    embed_dim = x.shape[-1]
    normed = nn.LayerNorm(name="attention_norm")(x)
    attended = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.dropout_rate,
      deterministic=deterministic,
      name="attention",
    )(normed, normed, mask=attention_mask)
    x = x + nn.Dropout(self.dropout_rate)(attended, deterministic)
    normed = nn.LayerNorm(name="mlp_norm")(x)
    hidden = nn.relu(nn.Dense(self.mlp_dim, name="mlp_in")(normed))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic)
    out = nn.Dense(embed_dim, name="mlp_out")(hidden)
    return x + nn.Dropout(self.dropout_rate)(out, deterministic)


class SASRec(nn.Module):
  """Next-item model over left-padded item windows.

  Attributes:
    num_items: catalogue size; item indices are 0-based (padding is marked
      by a mask, not by a reserved index).
    max_length: window length (positions).
    embed_dim: hidden size d.
    num_layers: transformer blocks.
    num_heads: attention heads.
    mlp_dim: feed-forward hidden size.
    dropout_rate: dropout on embeddings, attention and feed-forward.
  """

  num_items: int
  max_length: int = 200
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 1
  mlp_dim: int = 64
  dropout_rate: float = 0.2

  def setup(self):
    init = nn.initializers.normal(0.02)
    self.item_embedding = nn.Embed(
      self.num_items, self.embed_dim, embedding_init=init
    )
    self.position_embedding = self.param(
      "position_embedding", init, (self.max_length, self.embed_dim)
    )
    self.blocks = [
      _Block(self.num_heads, self.mlp_dim, self.dropout_rate, name=f"block_{i}")
      for i in range(self.num_layers)
    ]
    self.dropout = nn.Dropout(self.dropout_rate)
    self.final_norm = nn.LayerNorm()

  def encode(
    self, items: jax.Array, mask: jax.Array, deterministic: bool = True
  ) -> jax.Array:
    """Hidden states [batch, L, d] of left-padded windows.

    Args:
      items: int [batch, L] item indices (any value where mask is False).
      mask: bool [batch, L], True on real items.
      deterministic: False in training (dropout on).
    """
    length = items.shape[1]
    if length > self.max_length:
      raise ValueError(f"window of {length} > max_length {self.max_length}")
    valid = mask[..., None].astype(jnp.float32)
    x = self.item_embedding(items) * jnp.sqrt(float(self.embed_dim))
    x = x + self.position_embedding[self.max_length - length :][None]
    x = self.dropout(x, deterministic) * valid
    # Causal attention among real items; padded queries see nothing real and
    # their outputs are never used.
    attention_mask = nn.combine_masks(
      nn.make_causal_mask(items, dtype=jnp.bool_),
      nn.make_attention_mask(mask, mask, dtype=jnp.bool_),
    )
    for block in self.blocks:
      x = block(x, attention_mask, deterministic) * valid
    return self.final_norm(x)

  def scores(self, hidden: jax.Array) -> jax.Array:
    """Scores of hidden states against every item: [..., num_items]."""
    return self.item_embedding.attend(hidden)

  def __call__(self, items, mask, deterministic: bool = True) -> jax.Array:
    """Next-item scores after the last position: [batch, num_items]."""
    return self.scores(self.encode(items, mask, deterministic)[:, -1])

  def loss(
    self,
    inputs: jax.Array,
    targets: jax.Array,
    target_mask: jax.Array,
    deterministic: bool = False,
    target_fraction: float = 1.0,
  ) -> tuple[jax.Array, dict]:
    """Mean full-softmax cross-entropy over the real target positions.

    Args:
      inputs: int [batch, L] item windows.
      targets: int [batch, L], the item after each input.
      target_mask: bool [batch, L], True where inputs and targets are real.
      deterministic: False in training (dropout on).
      target_fraction: if below 1, logits are computed only for a static
        budget of that fraction of the batch's positions, filled with its
        real target positions in order. Left-padded windows are mostly
        padding for short users (ML-1M, L=200: 54% real), and the softmax
        over all items is most of the cost, so this halves the work. If a
        batch has more real targets than the budget, the rest are skipped
        (reported as `skipped_targets`).

    Returns:
      (loss, metrics dict).
    """
    hidden = self.encode(inputs, target_mask, deterministic)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    flat_mask = target_mask.reshape(-1)
    num_real = jnp.sum(flat_mask)
    if target_fraction < 1.0:
      budget = max(1, int(round(flat_mask.shape[0] * target_fraction)))
      (positions,) = jnp.nonzero(flat_mask, size=budget, fill_value=0)
      flat_mask = jnp.arange(budget) < num_real
      flat_hidden = flat_hidden[positions]
      flat_targets = flat_targets[positions]
    logits = self.scores(flat_hidden).astype(jnp.float32)
    # logsumexp minus the target logit: no [positions, items] gather.
    target_logits = jnp.sum(
      flat_hidden * self.item_embedding.embedding[flat_targets], axis=-1
    )
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    weights = flat_mask.astype(jnp.float32)
    num_targets = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(nll * weights) / num_targets
    return loss, dict(
      targets_per_batch=num_targets,
      skipped_targets=num_real - jnp.sum(weights),
    )


def user_states(
  model: SASRec, params, items, mask, batch_size: int = 256
) -> jax.Array:
  """Each window's sequence state: the last position's hidden state.

  With users' histories as the windows, these are user vectors in the item
  embedding space: `state @ item_embedding.T` are SASRec's next-item scores
  (`SASRec.__call__`), so (item table, states) export like MF's (item,
  user) tables, and phases 1 and 2 can read them as the CF modality
  (CoLLM and LLaRA take SASRec's item table and sequence state).

  Args:
    model: the SASRec module.
    params: its params.
    items: int [N, L] left-padded windows (L <= model.max_length).
    mask: bool [N, L], True on real items.
    batch_size: windows per jitted call (the last call is padded).

  Returns:
    float32 [N, embed_dim].
  """
  encode = jax.jit(
    lambda p, x, m: model.apply({"params": p}, x, m, method=SASRec.encode)[
      :, -1
    ]
  )
  n = items.shape[0]
  pad = -n % batch_size
  items = jnp.pad(jnp.asarray(items), ((0, pad), (0, 0)))
  mask = jnp.pad(jnp.asarray(mask, bool), ((0, pad), (0, 0)))
  states = [
    encode(params, items[i : i + batch_size], mask[i : i + batch_size])
    for i in range(0, n + pad, batch_size)
  ]
  return jnp.concatenate(states)[:n].astype(jnp.float32)


def sequence_states(
  model: SASRec,
  params,
  sequence_offsets: np.ndarray,
  sequence_items: np.ndarray,
  batch_size: int = 1024,
) -> np.ndarray:
  """SASRec's state before every interaction of every user.

  Row p (a position in the dataset's CSR `sequence_items`) is the sequence
  state (`user_states`) after the user's items before p, that is after
  `sequence_items[offsets[u]:p]` cut to its last `max_length` items and
  left-padded as in evaluation: `state[p] @ item_embedding.T` are SASRec's
  scores for the item at p. A user's first position has no items before
  it; its row is zeros. Rows at a valid or test target are the states
  after that split's history (`user_states` of `leave_one_out(split)`).

  Windows are grouped by length (powers of two, up to max_length) so a
  short prefix does not pay for max_length positions; a shorter window
  sits in the last positions exactly as its left-padded max_length window
  does, and padding is masked, so the states are the same.

  Args:
    model: the SASRec module.
    params: its params.
    sequence_offsets: int [num_users + 1] CSR offsets.
    sequence_items: int [num_interactions] items in time order per user.
    batch_size: windows per jitted call.

  Returns:
    float32 [num_interactions, embed_dim].
  """
  offsets = np.asarray(sequence_offsets, np.int64)
  items = np.asarray(sequence_items, np.int32)
  users = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
  positions = np.arange(len(items), dtype=np.int64)
  # One example per position: the items before it, the item at it.
  before = processing.Split(
    name="all",
    users=users,
    starts=offsets[users],
    ends=positions,
    targets=items,
    items=items,
  )
  prefix = np.minimum(positions - before.starts, model.max_length)
  states = np.zeros((len(items), model.embed_dim), np.float32)
  length = model.max_length
  widths = sorted({min(2**i, length) for i in range(length.bit_length() + 1)})
  low = 0  # prefixes of low + 1 .. width items share a window width
  for width in widths:
    rows = np.flatnonzero((prefix > low) & (prefix <= width))
    low = width
    if len(rows):
      windows, mask = before.padded_histories(rows, width)
      states[rows] = np.asarray(
        user_states(model, params, windows, mask, batch_size)
      )
  return states
