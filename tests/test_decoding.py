"""Decoding tests: a hand-checkable bigram LM and a tiny random Llama.

References are independent of the code under test: hand-computed
probabilities for the bigram model, and for the Llama a plain loop of full
forward passes (no cache) in numpy-side bookkeeping.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax import decoding
from ilm_jax.models import llm

PAD, BOS, A, B, C, D, EOS = 0, 0, 1, 2, 3, 4, 5

# Next-token probabilities of the bigram LM, row = previous token.
# Unconstrained, <s> is most likely followed by c, which no title starts with.
PROBS = np.array(
  [
    [0.0, 0.30, 0.10, 0.40, 0.15, 0.05],  # after <s>
    [0.0, 0.05, 0.50, 0.15, 0.05, 0.25],  # after a
    [0.0, 0.10, 0.10, 0.10, 0.10, 0.60],  # after b
    [0.0, 0.10, 0.10, 0.10, 0.10, 0.60],  # after c
    [0.0, 0.10, 0.30, 0.10, 0.10, 0.40],  # after d
    [1 / 6] * 6,  # after eos
  ]
)
TITLES = [[A, B], [A, C], [A], [D], [B, D], [A, B, B]]
# P(title, eos | <s>) by hand: ab .3*.5*.6 = .09, a .3*.25 = .075,
# d .15*.4 = .06, ac .3*.15*.6 = .027, abb .3*.5*.1*.6 = .009,
# bd .1*.1*.4 = .004.
HAND_RANKING = [
  (0, 0.09),
  (2, 0.075),
  (3, 0.06),
  (1, 0.027),
  (5, 0.009),
  (4, 0.004),
]


class BigramLM(nn.Module):
  """Logits depend only on the previous token; follows the decoding contract."""

  @nn.compact
  def __call__(
    self,
    input_ids=None,
    input_embeds=None,
    attention_mask=None,
    cache=None,
    last_only=False,
    positions=None,
    key_visibility=None,
  ):
    del positions, key_visibility  # the previous token is all it reads
    table = self.param("table", nn.initializers.zeros, PROBS.shape)
    if input_embeds is not None:  # one-hot rows
      input_ids = jnp.argmax(input_embeds, axis=-1)
    if cache is not None:  # a per-row leaf, so beam reordering is exercised
      cache = dict(last=input_ids[:, -1], index=cache["index"] + 1)
    if last_only:
      input_ids = input_ids[:, -1:]
    return table[input_ids], cache

  def init_cache(self, batch_size, max_len):
    del max_len
    return dict(
      last=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32)
    )


BIGRAM_PARAMS = {"table": jnp.log(jnp.asarray(PROBS, jnp.float32))}


def one_hot_prompts(rows):
  """Left-padded one-hot prompt embeddings and mask."""
  length = max(len(r) for r in rows)
  embeds = np.zeros((len(rows), length, len(PROBS)), np.float32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    for j, token in enumerate(row, start=length - len(row)):
      embeds[i, j, token] = 1.0
      mask[i, j] = 1
  return embeds, mask


def brute_force(last_token):
  probs = []
  for title in TITLES:
    prev, p = last_token, 1.0
    for token in title + [EOS]:
      p, prev = p * PROBS[prev, token], token
    probs.append(p)
  return sorted(enumerate(probs), key=lambda x: -x[1])


# After d instead of <s>: d .1*.4 = .04, ab .1*.5*.6 = .03, a .1*.25 = .025,
# bd .3*.1*.4 = .012, ac .1*.15*.6 = .009, abb .1*.5*.1*.6 = .003. With 3
# beams, "a <eos>" (.025) finishes at step 2 while the prefixes "a b" (.05)
# and "b d" (.03) stay live: a search whose finished titles kept their beam
# slots pruned it there (returning bd, .012, third); the finished pool keeps
# it, and at step 3 the pool (.04, .03, .025) beats every live prefix
# ("a b b" .005), so 3 beams already give the exact top 3.
HAND_RANKING_AFTER_D = [
  (3, 0.04),
  (0, 0.03),
  (2, 0.025),
  (4, 0.012),
  (1, 0.009),
  (5, 0.003),
]


def bigram_title_search(prompts, num_beams, **kwargs):
  """Constrained beam search of the bigram LM over TITLES."""
  embeds, mask = one_hot_prompts(prompts)
  return decoding.constrained_beam_search(
    BigramLM(),
    BIGRAM_PARAMS,
    decoding.TokenTrie(TITLES, eos_id=EOS),
    prompt_embeds=embeds,
    prompt_mask=mask,
    num_beams=num_beams,
    pad_id=PAD,
    **kwargs,
  )


def bigram_prior_search(prior, num_beams, **kwargs):
  """`bigram_title_search` after <s>, ranked against `prior` over TITLES."""
  trie = decoding.TokenTrie(TITLES, eos_id=EOS)
  return bigram_title_search(
    [[C, BOS]],
    num_beams,
    prior=decoding.trie_prior(trie, np.log(prior)),
    **kwargs,
  )


@pytest.mark.parametrize("num_beams", [3, 8])
def test_constrained_beam_search_returns_best_titles(num_beams):
  trie = decoding.TokenTrie(TITLES, eos_id=EOS)
  for last, hand in ((BOS, HAND_RANKING), (D, HAND_RANKING_AFTER_D)):
    exact = brute_force(last)
    assert [i for i, _ in exact] == [i for i, _ in hand]
    np.testing.assert_allclose([p for _, p in exact], [p for _, p in hand])
  # Row 0's prompt ends with <s>, row 1's (left-padded) with d.
  result = bigram_title_search([[C, BOS], [D]], num_beams)
  for row, expected in enumerate([HAND_RANKING, HAND_RANKING_AFTER_D]):
    found = min(num_beams, len(TITLES))
    ids = [int(i) for i in result.sequence_ids[row]]
    assert ids[:found] == [i for i, _ in expected[:found]]
    np.testing.assert_allclose(
      result.scores[row, :found],
      np.log([p for _, p in expected[:found]]),
      rtol=1e-5,
    )
    for beam, title in enumerate(ids[:found]):
      tokens = list(np.asarray(result.tokens[row, beam]))
      padding = [PAD] * (trie.max_depth - len(TITLES[title]) - 1)
      assert tokens == TITLES[title] + [EOS] + padding
    assert ids[found:] == [-1] * (num_beams - found)
    assert np.all(np.isneginf(result.scores[row, found:]))


def test_trie_requires_an_end_for_prefix_sequences():
  with pytest.raises(ValueError, match="prefix"):
    decoding.TokenTrie([[1, 2], [1]])
  trie = decoding.TokenTrie([[1, 2], [1], [3]], eos_id=9)
  assert trie.max_depth == 3 and trie.max_children == 2
  # Root's children are sorted: tokens 1 and 3.
  root = slice(trie.offsets[0], trie.offsets[1])
  assert list(trie.edge_tokens[root]) == [1, 3]


# A tiny random Llama for the cache-based paths.
TINY = llm.LlamaConfig(
  vocab_size=40,
  hidden_size=32,
  intermediate_size=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  rope_theta=10_000.0,
)


@functools.cache
def tiny_llama():
  model = llm.Llama(TINY)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32),
    nn.meta.unbox(shapes["params"]),
  )
  return model, params


# Every reference pass has this shape, so the reference compiles once:
# prompts are left-padded to 6 tokens, continuations right-padded to 8
# (causal attention: tokens after a position never change its logits).
REF_ROWS, PROMPT_LEN, MAX_NEW = 16, 6, 8
PROMPTS = np.array([[0, 0, 0, 7, 3, 9], [5, 1, 2, 8, 8, 4]], np.int32)
PROMPT_MASK = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)


@functools.partial(jax.jit, static_argnames="model")
def _full_logprobs(model, params, ids, mask):
  logits, _ = model.apply(
    {"params": params}, input_ids=ids, attention_mask=mask
  )
  return jax.nn.log_softmax(logits, axis=-1)


def reference_logprobs(rows, continuations):
  """Full-pass (no cache) next-token log-probs [n, MAX_NEW, vocab] after
  prompt rows `rows`, each followed by its continuation."""
  model, params = tiny_llama()
  ids = np.zeros((REF_ROWS, PROMPT_LEN + MAX_NEW), np.int32)
  mask = np.ones_like(ids)
  for i, (row, cont) in enumerate(zip(rows, continuations, strict=True)):
    ids[i, :PROMPT_LEN] = PROMPTS[row]
    mask[i, :PROMPT_LEN] = PROMPT_MASK[row]
    ids[i, PROMPT_LEN : PROMPT_LEN + len(cont)] = cont
  logp = np.asarray(_full_logprobs(model, params, ids, mask))
  return logp[: len(rows), PROMPT_LEN - 1 : -1]


def sequence_logprobs(row, continuations):
  """Summed log-prob of each continuation after prompt `row`."""
  logp = reference_logprobs([row] * len(continuations), continuations)
  return [
    sum(lp[t, tok] for t, tok in enumerate(cont))
    for lp, cont in zip(logp, continuations, strict=True)
  ]


@functools.cache
def naive_greedy(steps=6):
  """Greedy continuations of both prompts, one full pass per token."""
  out = [[], []]
  for _ in range(steps):
    logp = reference_logprobs([0, 1], out)
    for row in range(2):
      out[row].append(int(logp[row, len(out[row])].argmax()))
  return np.array(out)


def prompt_embeddings(rows):
  model, params = tiny_llama()
  return np.asarray(
    model.apply({"params": params}, PROMPTS[rows], method=llm.Llama.embed)
  )


def test_greedy_matches_full_recomputation_and_stops_at_eos():
  model, params = tiny_llama()
  expected = naive_greedy()
  # An eos that row 0 emits first at step `stop` > 0 and row 1 never emits.
  stop = next(
    t
    for t in range(1, 5)
    if expected[0, t] not in expected[0, :t]
    and expected[0, t] not in expected[1]
  )
  eos = int(expected[0, stop])
  out = np.asarray(
    decoding.greedy(
      model,
      params,
      prompt_ids=PROMPTS,
      prompt_mask=PROMPT_MASK,
      max_new_tokens=6,
      eos_id=eos,
      pad_id=39,
    )
  )
  np.testing.assert_array_equal(
    out[0], list(expected[0, : stop + 1]) + [39] * (5 - stop)
  )
  np.testing.assert_array_equal(out[1], expected[1])


def test_sampling_from_embeddings_filters_and_distribution():
  # Many copies of prompt row 0, given as input embeddings.
  model, params = tiny_llama()
  n, temperature = 2000, 1.5
  embeds = np.repeat(prompt_embeddings([0]), n, 0)
  mask = np.repeat(PROMPT_MASK[:1], n, 0)

  def sample(seed, top_p):
    return np.asarray(
      decoding.sample(
        model,
        params,
        jax.random.key(seed),
        prompt_embeds=embeds,
        prompt_mask=mask,
        max_new_tokens=2,
        eos_id=-1,
        pad_id=0,
        temperature=temperature,
        top_p=top_p,
      )
    )

  # A tiny nucleus keeps only the arg-max: greedy, for every row and step.
  np.testing.assert_array_equal(
    sample(1, 1e-6), np.repeat(naive_greedy()[:1, :2], n, 0)
  )
  # First-token frequencies follow softmax(logits / T) over the nucleus.
  top_p = 0.6
  logp = reference_logprobs([0], [[]])[0, 0]
  probs = np.exp(logp / temperature)
  probs /= probs.sum()
  order = np.argsort(-probs)
  before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[before < top_p]
  assert 1 < len(nucleus) < 40  # the filter is active but not trivial
  expected = np.zeros_like(probs)
  expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
  freq = np.bincount(sample(2, top_p)[:, 0], minlength=40) / n
  assert set(np.flatnonzero(freq)) <= set(nucleus)
  np.testing.assert_allclose(freq, expected, atol=0.035)


def test_beam_search_from_embeddings_scores_are_sequence_logprobs():
  model, params = tiny_llama()
  result = decoding.beam_search(
    model,
    params,
    prompt_embeds=prompt_embeddings([0, 1]),
    prompt_mask=PROMPT_MASK,
    num_beams=4,
    max_new_tokens=6,
    eos_id=-1,
    pad_id=0,
  )
  for row in range(2):
    scores = np.asarray(result.scores[row])
    assert np.all(np.diff(scores) <= 0)
    beams = [list(b) for b in np.asarray(result.tokens[row])]
    assert len({tuple(b) for b in beams}) == 4
    np.testing.assert_allclose(scores, sequence_logprobs(row, beams), atol=1e-4)
    # The greedy path is a candidate, so the best beam is at least as good.
    greedy_score = sequence_logprobs(row, [list(naive_greedy()[row])])[0]
    assert scores[0] >= greedy_score - 1e-4


def test_constrained_beam_search_on_llama_is_exact_with_enough_beams():
  model, params = tiny_llama()
  rng = np.random.default_rng(3)
  eos = 39
  titles = {tuple(rng.integers(1, 12, rng.integers(1, 4))) for _ in range(12)}
  titles = sorted(titles)
  trie = decoding.TokenTrie(titles, eos_id=eos)
  # With at least as many beams as titles no prefix is ever pruned, so the
  # search must return the exact ranking.
  k = len(titles)
  result = decoding.constrained_beam_search(
    model,
    params,
    trie,
    prompt_ids=PROMPTS,
    prompt_mask=PROMPT_MASK,
    num_beams=k,
    pad_id=0,
  )
  for row in range(2):
    exact = sequence_logprobs(row, [list(t) + [eos] for t in titles])
    order = np.argsort(exact)[::-1]
    np.testing.assert_array_equal(result.sequence_ids[row], order)
    np.testing.assert_allclose(
      result.scores[row], np.sort(exact)[::-1], atol=1e-4
    )
    for beam, title in enumerate(np.asarray(result.sequence_ids[row])):
      tokens = list(np.asarray(result.tokens[row, beam]))
      length = len(titles[title]) + 1
      assert tokens[:length] == list(titles[title]) + [eos]
      assert tokens[length:] == [0] * (trie.max_depth - length)


def test_banned_titles_are_skipped_and_their_extensions_kept():
  # Row 0 bans "a" (a prefix of "a b" and "a c") and "d"; row 1 bans
  # nothing. Brute force over the titles left is the reference: banning
  # "a" must not cut "a b" or "a b b".
  trie = decoding.TokenTrie(TITLES, eos_id=EOS)
  np.testing.assert_array_equal(trie.canonical, np.arange(len(TITLES)))
  banned = np.zeros((2, len(TITLES)), bool)
  banned[0, [2, 3]] = True
  result = bigram_title_search([[C, BOS], [C, BOS]], 4, banned=banned)
  allowed = [(i, p) for i, p in brute_force(BOS) if not banned[0, i]]
  assert [int(i) for i in result.sequence_ids[0]] == [i for i, _ in allowed]
  np.testing.assert_allclose(
    result.scores[0], np.log([p for _, p in allowed]), rtol=1e-5
  )
  assert [int(i) for i in result.sequence_ids[1]] == [
    i for i, _ in HAND_RANKING[:4]
  ]


def test_identical_sequences_share_the_first_index():
  trie = decoding.TokenTrie([[1, 2], [3], [1, 2]], eos_id=9)
  np.testing.assert_array_equal(trie.canonical, [0, 1, 0])


def test_trie_knows_parents_tokens_and_depths():
  trie = decoding.TokenTrie([[1, 2], [1], [3]], eos_id=9)
  # Nodes in insertion order: root, 1, 1-2, 1-2-9, 1-9, 3, 3-9.
  np.testing.assert_array_equal(trie.parents, [-1, 0, 1, 2, 1, 0, 5])
  np.testing.assert_array_equal(trie.node_tokens, [-1, 1, 2, 9, 9, 3, 9])
  np.testing.assert_array_equal(trie.depths, [0, 1, 2, 3, 2, 1, 2])
  np.testing.assert_array_equal(trie.leaf_nodes, [3, 4, 6])


def test_trie_prior_masses_and_gaps_by_hand():
  trie = decoding.TokenTrie([[1, 2], [1], [3]], eos_id=9)
  prior = decoding.trie_prior(trie, np.log([0.5, 0.2, 0.3]))
  # Node 1 holds "1 2" and "1": mass 0.7, its least leaf 0.2.
  np.testing.assert_allclose(
    np.exp(prior.log_mass), [1.0, 0.7, 0.5, 0.5, 0.2, 0.3, 0.3], rtol=1e-6
  )
  np.testing.assert_allclose(
    prior.gap,
    np.log([1 / 0.2, 0.7 / 0.2, 1, 1, 1, 1, 1]),
    rtol=1e-6,
    atol=1e-6,
  )
  with pytest.raises(ValueError, match="finite"):
    decoding.trie_prior(trie, [0.0, -np.inf, 0.0])
  with pytest.raises(ValueError, match="expected 3"):
    decoding.trie_prior(trie, [0.0, 0.0])


def test_prior_weighted_search_ranks_by_pmi_by_hand():
  # A prior that halves ab, doubles bd; lambda = 1: score = p / prior.
  prior = np.array([0.4, 0.1, 0.2, 0.1, 0.05, 0.15])
  hand = [p / prior[i] for i, p in sorted(HAND_RANKING)]
  # ab .225, ac .27, a .375, d .6, bd .08, abb .06
  order = [3, 2, 1, 0, 4, 5]
  assert list(np.argsort(hand)[::-1]) == order
  for beams in (3, 6):
    result = bigram_prior_search(prior, beams, prior_weight=1.0)
    assert [int(i) for i in result.sequence_ids[0]] == order[:beams]
    # Scores are log p - log prior + log (prior mass of the trie = 1).
    np.testing.assert_allclose(
      result.scores[0], np.log(np.array(hand)[order[:beams]]), rtol=1e-5
    )
  with pytest.raises(ValueError, match="prior_weight"):
    bigram_title_search([[BOS]], 2, prior_weight=-1.0)


def _random_titles(seed, count=12):
  rng = np.random.default_rng(seed)
  titles = {
    tuple(rng.integers(1, 12, rng.integers(1, 4))) for _ in range(count)
  }
  return sorted(titles)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_trie_log_likelihoods_match_full_passes(chunk_size):
  model, params = tiny_llama()
  eos = 39
  titles = _random_titles(3)
  trie = decoding.TokenTrie(titles, eos_id=eos)
  # Chunks smaller than the trie start mid-path: their ancestors repeat.
  scored = decoding.trie_log_likelihoods(
    model,
    params,
    trie,
    prompt_embeds=prompt_embeddings([0, 1]),
    prompt_mask=PROMPT_MASK,
    chunk_size=chunk_size,
  )
  assert scored.shape == (2, len(titles))
  for row in range(2):
    exact = sequence_logprobs(row, [list(t) + [eos] for t in titles])
    np.testing.assert_allclose(scored[row], exact, atol=1e-4)


def test_prior_weighted_search_on_llama_is_exact_with_enough_beams():
  model, params = tiny_llama()
  eos = 39
  titles = _random_titles(4)
  trie = decoding.TokenTrie(titles, eos_id=eos)
  log_prior = np.log(np.random.default_rng(5).dirichlet(np.ones(len(titles))))
  result = decoding.constrained_beam_search(
    model,
    params,
    trie,
    prompt_ids=PROMPTS,
    prompt_mask=PROMPT_MASK,
    num_beams=len(titles),
    pad_id=0,
    prior=decoding.trie_prior(trie, log_prior),
    prior_weight=0.7,
  )
  for row in range(2):
    exact = sequence_logprobs(row, [list(t) + [eos] for t in titles])
    pmi = np.asarray(exact) - 0.7 * log_prior  # the prior's total mass is 1
    np.testing.assert_array_equal(
      result.sequence_ids[row], np.argsort(pmi)[::-1]
    )
    np.testing.assert_allclose(
      result.scores[row], np.sort(pmi)[::-1], atol=1e-4
    )


def test_prior_weighted_search_does_not_stop_before_a_rare_ending():
  # An unnormalised prior (total 1.301, so lambda = 1 scores p / prior *
  # 1.301). "a b <eos>" is rare and "a b b" common, so the node "a b"
  # carries little correction until its end token. Two beams: "d" and "a"
  # stay live at step 1 ("b" .26 is pruned); at step 2 the pool holds "a"
  # (.976) and "d" (.78) and the live "a c" (.585) and "a b" (.39) trail
  # it, yet "a b <eos>" ends at .09 / .001 * 1.301 = 117. A stopping rule
  # without the gap bound returns [a, d].
  prior = np.array([0.001, 0.1, 0.1, 0.1, 0.5, 0.5])
  result = bigram_prior_search(prior, 2, prior_weight=1.0)
  assert [int(i) for i in result.sequence_ids[0]] == [0, 2]
  np.testing.assert_allclose(
    result.scores[0], np.log([90.0 * 1.301, 0.75 * 1.301]), rtol=1e-5
  )


def test_plausibility_keeps_tokens_near_each_steps_best():
  # alpha = 0.4 after <s>: a .3 and d .15 pass (>= .12), b .1 does not; after
  # a: b .5 and eos .25 pass (>= .2), c .15 does not; after a b: only eos
  # .6 (>= .24). Left: ab, a, d; by p / prior (first hand prior):
  # d .6, a .375, ab .225.
  prior = np.array([0.4, 0.1, 0.2, 0.1, 0.05, 0.15])
  result = bigram_prior_search(prior, 6, prior_weight=1.0, plausibility=0.4)
  assert [int(i) for i in result.sequence_ids[0]] == [3, 2, 0, -1, -1, -1]
  np.testing.assert_allclose(
    result.scores[0, :3], np.log([0.6, 0.375, 0.225]), rtol=1e-5
  )
  with pytest.raises(ValueError, match="plausibility"):
    bigram_title_search([[BOS]], 2, plausibility=1.0)
