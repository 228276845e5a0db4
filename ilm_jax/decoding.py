"""Batched, jitted decoding with a KV cache: greedy, sampling, beam search,
and beam search constrained to a prefix trie of token sequences.

Every entry point takes the prompt either as token ids or as input
embeddings (the ILM's prompts hold soft item tokens), with a mask for a
left-padded batch. The prompt is run once (prefill) into a cache sized for
prompt plus generation; generation then continues one token id at a time.

`model` is an `llm.Llama` or any linen module with the same contract:
`model.apply({'params': p}, input_ids=..., input_embeds=..., attention_mask=
..., cache=..., last_only=...) -> (logits, cache)` (`last_only`: logits of
the last column only, [batch, 1, vocab]), `model.init_cache(batch, max_len)`,
and caches whose non-scalar leaves have the batch on axis 0. Beam search
also passes `positions` ([batch, time] rotary positions) and
`key_visibility` ([batch, time, cache_len] bool, which cache slots each new
token attends to): all beams of a row share one cache row (tree attention),
so the prompt is cached once per row and no cache is reordered. A model
may offer `decode_step_inputs(params) -> dict`: extra `apply` inputs of the
one-token steps, made once before the loop (the Llama unstacks its layers
there). Params are jit arguments, never closed over (XLA would
constant-fold them).
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# eos and pad ids are traced, not static, so changing them does not
# recompile the decoding loop.
_STATIC = ("model", "max_new_tokens")


def _prefill(model, params, prompt_ids, prompt_embeds, prompt_mask, extra):
  """Runs the prompt into a fresh cache; returns last logits and the cache."""
  prompt = prompt_ids if prompt_embeds is None else prompt_embeds
  batch, length = prompt.shape[:2]
  if prompt_mask is None:
    prompt_mask = jnp.ones((batch, length), jnp.int32)
  cache = model.init_cache(batch, length + extra)
  logits, cache = model.apply(
    {"params": params},
    input_ids=prompt_ids,
    input_embeds=prompt_embeds,
    attention_mask=prompt_mask,
    cache=cache,
    last_only=True,
  )
  # Left padding puts every row's last real token in the last column.
  return logits[:, -1], cache


def _step_inputs(model, params) -> dict:
  """Extra inputs of the one-token steps, prepared once before the loop by
  the model's `decode_step_inputs(params)` where it has one."""
  prepare = getattr(model, "decode_step_inputs", None)
  return {} if prepare is None else prepare(params)


def _step(model, params, tokens, cache, step_inputs):
  logits, cache = model.apply(
    {"params": params},
    input_ids=tokens[:, None],
    attention_mask=jnp.ones_like(tokens[:, None]),
    cache=cache,
    **step_inputs,
  )
  return logits[:, -1], cache


def _top_p_filter(logits, top_p):
  """Keeps the smallest set of top tokens whose probability reaches top_p."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # A token is kept when the mass strictly before it is below top_p.
  keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1)
  threshold = jnp.take_along_axis(sorted_logits, keep[:, None] - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


class _SamplingState(NamedTuple):
  """The greedy / sampling loop's state."""

  step: jax.Array  # int32 scalar: tokens generated so far
  tokens: jax.Array  # int32 [B, max_new_tokens], pad after the end
  done: jax.Array  # bool [B]: the row has produced eos
  logits: jax.Array  # float32 [B, V]: next-token logits
  cache: Any  # the model's KV cache


def _generate(
  model,
  params,
  rng,
  prompt_ids,
  prompt_embeds,
  prompt_mask,
  temperature,
  top_p,
  *,
  max_new_tokens,
  eos_id,
  pad_id,
  top_k,
  greedy,
):
  logits, cache = _prefill(
    model, params, prompt_ids, prompt_embeds, prompt_mask, max_new_tokens
  )
  batch = logits.shape[0]
  eos = jnp.atleast_1d(jnp.asarray(eos_id))
  step_inputs = _step_inputs(model, params)

  def choose(logits, key):
    if greedy:
      return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    logits = _top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1)

  def cond(state: _SamplingState):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  def body(state: _SamplingState):
    key = None if greedy else jax.random.fold_in(rng, state.step)
    token = choose(state.logits, key).astype(jnp.int32)
    token = jnp.where(state.done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice(
      state.tokens, token[:, None], (0, state.step)
    )
    logits, cache = _step(model, params, token, state.cache, step_inputs)
    return _SamplingState(
      step=state.step + 1,
      tokens=tokens,
      done=state.done | jnp.isin(token, eos),
      logits=logits,
      cache=cache,
    )

  state = _SamplingState(
    step=jnp.zeros((), jnp.int32),
    tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
    done=jnp.zeros((batch,), bool),
    logits=logits,
    cache=cache,
  )
  return jax.lax.while_loop(cond, body, state).tokens


@functools.partial(jax.jit, static_argnames=_STATIC)
def greedy(
  model,
  params,
  *,
  prompt_ids=None,
  prompt_embeds=None,
  prompt_mask=None,
  max_new_tokens: int,
  eos_id,
  pad_id: int,
):
  """Greedy decoding.

  Args:
    model: the LLM module (static).
    params: its params (the `params` collection).
    prompt_ids: [batch, length] left-padded token ids, or None.
    prompt_embeds: [batch, length, hidden] input embeddings instead of ids.
    prompt_mask: [batch, length] 1 on real prompt tokens; None: all real.
    max_new_tokens: tokens to generate at most.
    eos_id: an id or tuple of ids that end a row.
    pad_id: written after a row's eos.

  Returns:
    [batch, max_new_tokens] int32 generated ids (eos included, then pad).
  """
  return _generate(
    model,
    params,
    None,
    prompt_ids,
    prompt_embeds,
    prompt_mask,
    1.0,
    1.0,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    pad_id=pad_id,
    top_k=0,
    greedy=True,
  )


@functools.partial(jax.jit, static_argnames=_STATIC + ("top_k",))
def sample(
  model,
  params,
  rng,
  *,
  prompt_ids=None,
  prompt_embeds=None,
  prompt_mask=None,
  max_new_tokens: int,
  eos_id,
  pad_id: int,
  temperature=1.0,
  top_p=1.0,
  top_k: int = 0,
):
  """Ancestral sampling with temperature, top-k and nucleus (top-p) filters.

  Args:
    model, params, prompt_*, max_new_tokens, eos_id, pad_id: as in `greedy`.
    rng: a PRNG key; step t uses fold_in(rng, t).
    temperature: divides the logits.
    top_p: keep the most likely tokens whose mass reaches top_p (1: all).
    top_k: keep the k most likely tokens first (0: off; static).

  Returns:
    [batch, max_new_tokens] int32 sampled ids (eos included, then pad).
  """
  return _generate(
    model,
    params,
    rng,
    prompt_ids,
    prompt_embeds,
    prompt_mask,
    temperature,
    top_p,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    pad_id=pad_id,
    top_k=top_k,
    greedy=False,
  )


class BeamResult(NamedTuple):
  """Beams sorted best first.

  Attributes:
    tokens: [batch, beams, steps] int32 ids, pad after the end.
    scores: [batch, beams] summed log-probabilities (-inf: no such beam).
    sequence_ids: [batch, beams] index into the trie's sequences (-1: none);
      None for unconstrained beam search.
  """

  tokens: jax.Array
  scores: jax.Array
  sequence_ids: jax.Array | None


class _BeamState(NamedTuple):
  """The beam search loop's state ([B] rows, [K] beams, [T] steps)."""

  step: jax.Array  # scalar int32
  logits: jax.Array  # [B, K, V] next-token logits of each live beam
  cache: Any  # the model's cache: B rows of prompt + K * T beam slots
  live_tokens: jax.Array  # [B, K, T] tokens of the live (unfinished) beams
  live_scores: jax.Array  # [B, K] their log-probabilities (-inf: none)
  live_nodes: jax.Array  # [B, K] their trie nodes (0 when unconstrained)
  ancestry: jax.Array  # [B, K, K * T] the beam slots each live beam sees
  pool_tokens: jax.Array  # [B, K, T] the best finished sequences so far
  pool_scores: jax.Array  # [B, K] their log-probabilities, best first
  pool_nodes: jax.Array  # [B, K] their final trie nodes


def _beam_core(
  model,
  params,
  prompt_ids,
  prompt_embeds,
  prompt_mask,
  expand,
  *,
  num_beams,
  num_steps,
  pad_id,
  keep_unfinished,
):
  """Beam search with a pool of finished hypotheses and tree attention.

  `expand(logp [B,K,V], node [B,K])` lists each beam's candidates as
  (token, log-prob, next node, finishes), each [B, K, C]. Every step the K
  best unfinished candidates stay live and every finished candidate
  competes for the pool of the K best finished sequences, as common beam
  search implementations do (a finished sequence never takes a live
  beam's slot). A row stops when no live beam can still beat the worst
  pooled sequence: log-probs are never positive, so that bound is exact.

  All K beams of a row share one cache row (the prompt is stored once, not
  K times): step t writes the K chosen tokens into slots P + t*K .. P +
  t*K + K - 1, and each beam's query sees the prompt and the slots of its
  own ancestors (`key_visibility`), so no cache is ever reordered.

  Args:
    keep_unfinished: at the end, let beams still live after `num_steps`
      compete with the pool (truncated sequences), else pool only.
  """
  prompt = prompt_ids if prompt_embeds is None else prompt_embeds
  b, p = prompt.shape[:2]
  k, t = num_beams, num_steps
  if prompt_mask is None:
    prompt_mask = jnp.ones((b, p), jnp.int32)
  prompt_mask = prompt_mask.astype(bool)
  logits, cache = _prefill(
    model, params, prompt_ids, prompt_embeds, prompt_mask, k * t
  )
  # The next position of every row: its count of real prompt tokens.
  positions = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)[:, None]
  seen_prompt = jnp.broadcast_to(prompt_mask[:, None, :], (b, k, p))
  beam_slots = jnp.arange(k * t).reshape(t, k)
  rows = jnp.arange(b)[:, None]
  step_inputs = _step_inputs(model, params)
  neg_inf = jnp.full((b, k), -jnp.inf)

  def row_done(state):
    best_live = jnp.max(state.live_scores, axis=1)
    worst_pooled = state.pool_scores[:, -1]
    return (best_live == -jnp.inf) | (best_live < worst_pooled)

  def cond(state):
    return (state.step < t) & ~jnp.all(row_done(state))

  def body(state):
    s = state.step
    logp = jax.nn.log_softmax(state.logits, axis=-1)
    tok, lp, nodes, ends = expand(logp, state.live_nodes)
    c = tok.shape[-1]
    scores = (state.live_scores[..., None] + lp).reshape(b, k * c)
    tok, nodes, ends = (x.reshape(b, k * c) for x in (tok, nodes, ends))
    parents = jnp.arange(k * c) // c

    def extended(tokens, pick):
      parent = parents[pick]
      return tokens[rows, parent].at[:, :, s].set(tok[rows, pick]), parent

    # Finished candidates compete with the pool.
    pool_scores, pick = jax.lax.top_k(
      jnp.concatenate(
        [state.pool_scores, jnp.where(ends, scores, -jnp.inf)], axis=1
      ),
      k,
    )
    from_pool = pick < k
    cand = jnp.maximum(pick - k, 0)
    cand_tokens, _ = extended(state.live_tokens, cand)
    pool_tokens = jnp.where(
      from_pool[..., None],
      state.pool_tokens[rows, jnp.minimum(pick, k - 1)],
      cand_tokens,
    )
    pool_nodes = jnp.where(
      from_pool,
      state.pool_nodes[rows, jnp.minimum(pick, k - 1)],
      nodes[rows, cand],
    )
    # Unfinished candidates become the live beams.
    live_scores, pick = jax.lax.top_k(jnp.where(ends, -jnp.inf, scores), k)
    live_tokens, parent = extended(state.live_tokens, pick)
    new_tok = jnp.where(live_scores > -jnp.inf, tok[rows, pick], pad_id)
    ancestry = state.ancestry[rows, parent] | (
      jnp.arange(k * t) == beam_slots[s][:, None]
    )
    visible = jnp.concatenate([seen_prompt, ancestry], axis=2)
    logits, cache = model.apply(
      {"params": params},
      input_ids=new_tok,
      attention_mask=jnp.ones_like(new_tok),
      positions=jnp.broadcast_to(positions + s, (b, k)),
      cache=state.cache,
      key_visibility=visible,
      **step_inputs,
    )
    return _BeamState(
      step=s + 1,
      logits=logits,
      cache=cache,
      live_tokens=live_tokens,
      live_scores=live_scores,
      live_nodes=nodes[rows, pick],
      ancestry=ancestry,
      pool_tokens=pool_tokens,
      pool_scores=pool_scores,
      pool_nodes=pool_nodes,
    )

  empty_tokens = jnp.full((b, k, t), pad_id, jnp.int32)
  zeros = jnp.zeros((b, k), jnp.int32)
  state = _BeamState(
    step=jnp.zeros((), jnp.int32),
    logits=jnp.broadcast_to(logits[:, None], (b, k, logits.shape[-1])),
    cache=cache,
    live_tokens=empty_tokens,
    live_scores=jnp.where(jnp.arange(k) == 0, 0.0, neg_inf),
    live_nodes=zeros,
    ancestry=jnp.zeros((b, k, k * t), bool),
    pool_tokens=empty_tokens,
    pool_scores=neg_inf,
    pool_nodes=zeros,
  )
  state = jax.lax.while_loop(cond, body, state)
  tokens, scores, nodes = state.pool_tokens, state.pool_scores, state.pool_nodes
  if keep_unfinished:
    scores, pick = jax.lax.top_k(
      jnp.concatenate([scores, state.live_scores], axis=1), k
    )
    from_pool = (pick < k)[..., None]
    tokens = jnp.where(
      from_pool,
      tokens[rows, jnp.minimum(pick, k - 1)],
      state.live_tokens[rows, jnp.maximum(pick - k, 0)],
    )
    nodes = jnp.zeros_like(pick)
  return tokens, scores, nodes


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_beams",))
def beam_search(
  model,
  params,
  *,
  prompt_ids=None,
  prompt_embeds=None,
  prompt_mask=None,
  num_beams: int,
  max_new_tokens: int,
  eos_id,
  pad_id: int,
) -> BeamResult:
  """Beam search by summed log-probability (no length normalisation).

  Args:
    model, params, prompt_*, max_new_tokens, eos_id, pad_id: as in `greedy`.
    num_beams: beams kept per row (static), also the number returned.

  Returns:
    A BeamResult; beams that did not emit eos within max_new_tokens are
    returned as they stand (truncated).
  """
  eos = jnp.atleast_1d(jnp.asarray(eos_id))

  def expand(logp, node):
    tok = jnp.broadcast_to(jnp.arange(logp.shape[-1]), logp.shape)
    return tok, logp, jnp.zeros_like(tok), jnp.isin(tok, eos)

  tokens, scores, _ = _beam_core(
    model,
    params,
    prompt_ids,
    prompt_embeds,
    prompt_mask,
    expand,
    num_beams=num_beams,
    num_steps=max_new_tokens,
    pad_id=pad_id,
    keep_unfinished=True,
  )
  return BeamResult(tokens, scores, None)


class TokenTrie:
  """A prefix trie over token sequences, as flat arrays for jitted search.

  Children of node n are edges offsets[n] .. offsets[n + 1] - 1, sorted by
  token. Node 0 is the root. A sequence ends at a leaf, so no sequence may
  be a proper prefix of another; appending an end token (`eos_id`, which
  also lets the LLM score the ending) guarantees that.

  Attributes:
    offsets: [num_nodes + 1] int32 edge offsets.
    edge_tokens: [num_edges] int32 token of each edge.
    edge_targets: [num_edges] int32 child node of each edge.
    sequence_ids: [num_nodes] int32 index of the sequence ending at a leaf
      (the first one for duplicates), -1 elsewhere.
    max_children: the largest number of children of a node.
    max_depth: the longest sequence (end token included).
  """

  def __init__(
    self, sequences: Sequence[Sequence[int]], eos_id: int | None = None
  ):
    children = [{}]  # node -> {token: child}
    ends = {}
    leaves = []
    for index, seq in enumerate(sequences):
      seq = [int(t) for t in seq] + ([] if eos_id is None else [int(eos_id)])
      if not seq:
        raise ValueError(f"Sequence {index} is empty.")
      node = 0
      for token in seq:
        if node in ends:
          raise ValueError(
            f"Sequence {ends[node]} is a prefix of sequence "
            f"{index}; pass eos_id to end every sequence."
          )
        if token not in children[node]:
          children[node][token] = len(children)
          children.append({})
        node = children[node][token]
      if children[node]:
        raise ValueError(
          f"Sequence {index} is a prefix of another; pass "
          "eos_id to end every sequence."
        )
      ends.setdefault(node, index)
      leaves.append(node)
    degree = [len(c) for c in children]
    self.offsets = np.concatenate([[0], np.cumsum(degree)]).astype(np.int32)
    edges = [sorted(c.items()) for c in children]
    self.edge_tokens = np.array([t for e in edges for t, _ in e], np.int32)
    self.edge_targets = np.array([n for e in edges for _, n in e], np.int32)
    self.sequence_ids = np.full(len(children), -1, np.int32)
    for node, index in ends.items():
      self.sequence_ids[node] = index
    # The index the search returns for each sequence (the first of
    # identical ones).
    self.canonical = self.sequence_ids[np.asarray(leaves, np.int64)]
    self.max_children = max(degree)
    self.max_depth = max(len(s) for s in sequences) + (eos_id is not None)

  @property
  def num_nodes(self) -> int:
    return len(self.sequence_ids)

  def arrays(self) -> dict:
    """The trie as a dict of arrays (a jit-friendly pytree)."""
    return dict(
      offsets=self.offsets,
      edge_tokens=self.edge_tokens,
      edge_targets=self.edge_targets,
      sequence_ids=self.sequence_ids,
    )


def constrained_beam_search(
  model,
  params,
  trie: TokenTrie,
  *,
  prompt_ids=None,
  prompt_embeds=None,
  prompt_mask=None,
  num_beams: int,
  pad_id: int,
  banned=None,
) -> BeamResult:
  """Beam search that can only emit a complete sequence of `trie`.

  At each step a beam may only continue with a child of its trie node;
  every other token scores -inf. Scores are the LLM's summed (unnormalised
  over the allowed set) log-probabilities of the whole sequence.

  Args:
    model, params, prompt_*, pad_id: as in `greedy`.
    trie: the allowed sequences (e.g. tokenized item titles plus eos).
    num_beams: beams kept per row, also the number returned (static).
    banned: optional [B, number of sequences] bool: row b may not finish
      sequence i where banned[b, trie.canonical[i]] (e.g. the user's
      watched items, for the masked ranking protocol). A banned sequence
      that is a prefix of others still lets the search continue to them.

  Returns:
    A BeamResult with sequence_ids; rows with fewer than num_beams
    reachable sequences pad with score -inf and sequence id -1.
  """
  return _constrained(
    model,
    params,
    trie.arrays(),
    prompt_ids,
    prompt_embeds,
    prompt_mask,
    num_beams=num_beams,
    pad_id=pad_id,
    max_children=trie.max_children,
    max_depth=trie.max_depth,
    banned=None if banned is None else jnp.asarray(banned, bool),
  )


@functools.partial(
  jax.jit,
  static_argnames=("model", "num_beams", "max_children", "max_depth"),
)
def _constrained(
  model,
  params,
  trie,
  prompt_ids,
  prompt_embeds,
  prompt_mask,
  *,
  num_beams,
  pad_id,
  max_children,
  max_depth,
  banned=None,
):
  offsets, targets = trie["offsets"], trie["edge_targets"]
  num_edges = targets.shape[0]

  def expand(logp, node):
    edge = offsets[node][..., None] + jnp.arange(max_children)
    valid = edge < offsets[node + 1][..., None]
    edge = jnp.minimum(edge, num_edges - 1)
    tok = trie["edge_tokens"][edge]
    lp = jnp.take_along_axis(logp, tok, axis=-1)
    child = targets[edge]
    is_leaf = offsets[child + 1] == offsets[child]
    if banned is not None:
      sequence = trie["sequence_ids"][child]
      rows = jnp.arange(banned.shape[0])[:, None, None]
      valid &= ~(is_leaf & banned[rows, jnp.maximum(sequence, 0)])
    return tok, jnp.where(valid, lp, -jnp.inf), child, is_leaf

  tokens, scores, node = _beam_core(
    model,
    params,
    prompt_ids,
    prompt_embeds,
    prompt_mask,
    expand,
    num_beams=num_beams,
    num_steps=max_depth,
    pad_id=pad_id,
    keep_unfinished=False,
  )
  found = scores > -jnp.inf
  sequence_ids = jnp.where(found, trie["sequence_ids"][node], -1)
  return BeamResult(tokens, scores, sequence_ids)
