"""Phase-2 evaluators: the LLM generates, we score what it generated.

`generative_ranking`: recommendation prompts (sequential, straightforward)
decoded by beam search constrained to the prefix trie of all item titles;
the beams, best first, are a ranked top-k list -> HR@5/10, NDCG@5/10, on
seen templates (cycled over users) and the unseen template separately.

`description`: item-description prompts decoded greedily; semantic
consistency is the share of items whose generated text, embedded with
MiniLM, is nearest (cosine) to that item's own text among all items; the
log-perplexity of the reference text is measured by teacher forcing.

Both evaluate a fixed, seeded subset (`num_users` / `num_items`; 0 = all):
the first `num_users` of one seeded permutation of all users, so a smaller
subset is a prefix of a larger one (the 100-user rows are the first 100
users of the 500-user rows), and each user keeps its seen template (the
template index is the user's position in that permutation).
`generative_ranking` also yields (metric_writer.PER_USER, block): per user,
every HR/NDCG averaged above and `<task>/<which>/rank`, the target's 0-based
position in the beam list (the list's length when it is absent). What the
lists hold, per user and as means: `share_top1_in_history` (the first
title is one the user already watched before the target: in ML-1M, never
the answer) and `share_top1_popular` (it is one of the `POPULAR` items
with the most training interactions: a popularity-like recommender); per
user only, `top1_item` (the first title's item id); over all users,
`coverage@1` / `coverage@10` (the share of the catalogue named in any
user's top-1 / top-10 list: do the lists collapse onto a few titles?).

`shuffled_entities`: does the model use *which* items and user its prompt
holds? The target title's negative log-likelihood (nats per answer token,
teacher forcing) of each user's seen-template prompt, once as is and once
with every soft-token entity swapped for a random one of the same kind
(seeded); `<task>/target_nll_gain` = shuffled - true, per user (0 without
a second pass for adapters that read no entity: text-only, zero-shot). A gain
near 0 says the adapter passes no usable identity (it may still teach the
LLM what a title looks like); a counterfactual probe of our own, not one of
the paper's metrics.

`item_naming`: can the LLM name an item from its soft tokens alone? For each
user of the subset, the description prompt of the split's target item
(the item the sequential task must name), decoded greedily;
`naming/<which>/share_title_exact` is 1 when the answer starts with that
item's exact title (the description answer begins with it), and
`share_year_exact` / `share_genre_overlap` score coarser attributes, each
beside its `_shuffled` chance level (the same answers scored against
another user's target). A recommender that writes titles needs this
grounding first; prompts that write the title as text (text-only,
zero-shot) pass by copying it, an upper reference. Our probe, not one of
the paper's metrics.
"""

import functools
import hashlib
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from absl import logging

from ilm_jax import decoding, metric_writer, metrics, progress, resources
from ilm_jax.data import ilm_tasks, pipeline, prompts
from ilm_jax.evaluators import registry
from ilm_jax.models import bert


def _templates(name, config, default) -> tuple[str, ...]:
  """`evals.<name>.templates`: which template kinds to evaluate.

  Raises:
    ValueError: empty, or a kind other than 'seen' / 'unseen'.
  """
  templates = tuple(config.get("templates", default))
  if not templates or set(templates) - {"seen", "unseen"}:
    raise ValueError(
      f"evals.{name}.templates={templates!r}: expected a non-empty "
      "tuple of 'seen' and/or 'unseen'."
    )
  return templates


def seeded_subset(total: int, count: int, seed: int) -> np.ndarray:
  """The first `count` (0: all) of a seeded permutation of range(total)."""
  order = np.random.default_rng(seed).permutation(total)
  return order[:count] if count else order


def split_targets(dataset, split: str, users) -> np.ndarray:
  """int64 `[len(users)]`: each user's target item in `split`
  (`ProcessedDataset.leave_one_out`: valid items[-2], test items[-1])."""
  examples = dataset.leave_one_out(split)
  target_of = dict(
    zip(examples.users.tolist(), examples.targets.tolist(), strict=True)
  )
  return np.array([target_of[int(u)] for u in users], np.int64)


def build_title_trie(tokenizer, titles) -> tuple[decoding.TokenTrie, dict]:
  """The trie of every title's answer tokens (+ eos), with a report.

  Titles whose tokens do not decode back to the same text, and titles that
  tokenize identically to an earlier one, are reported (not dropped): the
  search can still emit them, but they are worth knowing about.
  """
  sequences, not_round_trip, seen, duplicates = [], [], {}, []
  for index, title in enumerate(titles):
    tokens = tokenizer.encode(title, add_special_tokens=False)
    if tokenizer.decode(tokens) != title:
      not_round_trip.append(title)
    key = tuple(tokens)
    if key in seen:
      duplicates.append((seen[key], index))
    seen.setdefault(key, index)
    sequences.append(tokens)
  trie = decoding.TokenTrie(sequences, eos_id=tokenizer.eos_id)
  report = dict(
    titles=len(titles),
    not_round_trip=len(not_round_trip),
    duplicate_token_sequences=len(duplicates),
  )
  if not_round_trip:
    logging.warning(
      "%d titles do not round-trip through the tokenizer, e.g. %s",
      len(not_round_trip),
      not_round_trip[:5],
    )
  if duplicates:
    logging.warning(
      "%d titles share tokens with an earlier title: %s",
      len(duplicates),
      duplicates[:5],
    )
  return trie, report


COVERAGE_AT = (1, 10)  # list lengths of the coverage@k metrics


def ranked_list_metrics(
  ranked: np.ndarray, targets: np.ndarray, num_items: int
) -> dict[str, np.ndarray]:
  """HR/NDCG@5/10 per row of a ranked top-k list of item ids (-1: empty)."""
  k = ranked.shape[1]
  scores = np.full((len(ranked), num_items + 1), -np.inf, np.float32)
  rows = np.arange(len(ranked))[:, None]
  # Position p scores k - p; empty slots go to a dummy column.
  scores[rows, np.where(ranked >= 0, ranked, num_items)] = k - np.arange(k)
  scores = scores[:, :num_items]
  return jax.tree.map(
    np.asarray,
    metrics.ranking_metrics(jnp.asarray(scores), jnp.asarray(targets)),
  )


_PROMPT_LENGTH_STEP = 16
# Per-user columns that are positions or ids, not values to average.
_PER_USER_ONLY = ("rank", "top1_item")
TOKEN_AXIS_KEYS = ("input_ids", "soft_entity", "soft_slot", "attention_mask")


def trim_left_padding(batch: dict, multiple: int) -> dict:
  """Drops leading all-padding columns of a left-padded generation batch.

  Args:
    batch: encoded generation prompts; TOKEN_AXIS_KEYS are [B, L].
    multiple: the kept length is the longest prompt rounded up to a
      multiple of this (at most L): few distinct shapes, few compilations.

  Returns:
    The batch with TOKEN_AXIS_KEYS cut to their last L' columns.
  """
  length = batch["attention_mask"].shape[1]
  longest = int(batch["attention_mask"].sum(axis=1).max())
  keep = min(length, -(-longest // multiple) * multiple)
  return {
    k: v[:, length - keep :] if k in TOKEN_AXIS_KEYS else v
    for k, v in batch.items()
  }


class _PromptEvaluator:
  """Shared setup: model functions, the encoder, the subset, batching."""

  def __init__(
    self,
    name,
    config,
    *,
    model,
    sampler,
    encoder,
    tokenizer,
    dataset,
    seed=0,
    **unused,
  ):
    del unused
    self.name, self.config, self.split = name, config, config["split"]
    self.model, self.sampler, self.encoder = model, sampler, encoder
    self.tokenizer, self.dataset = tokenizer, dataset
    self.seed = seed
    self.batch_size = config.get("batch_size", 8)
    self._embed = jax.jit(model.input_embeddings)

  def _batches(self, requests, with_target=False, what=None):
    """(real rows, batch) of `requests` in fixed-size batches.

    Generation prompts are left-padded to their task's training length;
    columns that are padding in every row are dropped, down to a multiple
    of `_PROMPT_LENGTH_STEP` (few distinct shapes, so few compilations):
    the prefill pays only for the batch's longest prompt.
    """
    bar = progress.Progress(what or self.name, total=len(requests))
    examples = pipeline.stacked(
      len(requests),
      lambda i: self.encoder.encode(requests[i], with_target),
      what or self.name,
    )
    for batch in pipeline.eval_batches(examples, self.batch_size):
      real = int(batch.pop("mask").sum())
      if not with_target:
        batch = trim_left_padding(batch, _PROMPT_LENGTH_STEP)
      yield real, batch
      bar.update(real)
    bar.done()

  def _generate(self, params, requests, what, max_new_tokens):
    """Greedy continuations of `requests`, decoded: list[str]."""
    texts = []
    for real, batch in self._batches(requests, what=what):
      embeds = self._embed(params, batch)
      tokens = decoding.greedy(
        self.model.llm,
        self.model.llm_params(params),
        prompt_embeds=embeds,
        prompt_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        eos_id=self.tokenizer.eos_id,
        pad_id=self.tokenizer.pad_id,
      )
      texts += [self.tokenizer.decode(row) for row in np.asarray(tokens)[:real]]
    return texts


class _UserPromptEvaluator(_PromptEvaluator):
  """One prompt per user of a fixed, seeded subset (`num_users`; 0 = all)."""

  def __init__(self, name, config, **context):
    super().__init__(name, config, **context)
    self.users = seeded_subset(
      self.dataset.num_users, config.get("num_users", 0), self.seed
    )

  def target_items(self) -> np.ndarray:
    """[users] int64: each subset user's target item in the split."""
    return split_targets(self.dataset, self.split, self.users)

  def _requests(self, task, unseen):
    """Each user's evaluation request; user n keeps seen template n.

    An item task (`ilm_tasks.ITEM_TASKS`) asks about the user's target.
    """
    about = self.target_items() if task in ilm_tasks.ITEM_TASKS else self.users
    return [
      self.sampler.evaluation_request(
        task, int(x), self.split, unseen, template_index=i
      )
      for i, x in enumerate(about)
    ]


@registry.register("generative_ranking")
class GenerativeRankingEvaluator(_UserPromptEvaluator):
  """HR/NDCG of trie-constrained beam search over all item titles.

  With `mask_history=True` the search may not finish a title the user has
  already interacted with (every item before the split's target), the
  masked protocol of phase 0's `masked_*` rows; its metrics are named
  `<task>/<seen|unseen>/masked_<metric>`, so it can run beside the
  unmasked evaluator and be paired with phase 0's `masked_hr@10`.

  With `prior_weight` lambda > 0 the search ranks by log p(title | prompt)
  - lambda log prior(title) (contrastive decoding against a prior,
  `decoding.constrained_beam_search`): `prior="llm"` is the model's own
  marginal over titles, log mean_r p(title | prompt_r) over the prompts of
  the subset's first `prior_prompts` users (same task and template kind),
  every title scored exactly (`decoding.trie_log_likelihoods`); it holds
  what the LLM says whoever the user is (popular titles, short titles).
  `prior="popularity"` is log(1 + the item's count as a training target).
  `plausibility` (alpha, with a prior only) keeps a step's token only if
  its probability is at least alpha times the step's best.
  Its metrics are named `<task>/<which>/<prefix><metric>`, prefix from
  `prefix` (default "masked_" and/or "prior_").

  The `title` task (in `tasks`) ranks the catalogue for each user's split
  target from that item's own soft tokens ("Which movie is {item}?"): can
  the beam search pick the item out of every title when told which it is?
  A grounding probe on the same users as the recommendation rows.

  Raises:
    ValueError: a task in `tasks` whose answer is not a title; a negative
      `prior_weight`, a `prior` other than 'llm' / 'popularity',
      `prior_prompts` < 1, or `plausibility` outside [0, 1).
  """

  def __init__(self, name, config, **context):
    super().__init__(name, config, **context)
    self.tasks = tuple(config.get("tasks", ("sequential",)))
    if not self.tasks or set(self.tasks) - set(_TITLE_TASKS):
      raise ValueError(
        f"evals.{name}.tasks={self.tasks!r}: expected a non-empty tuple of "
        f"{', '.join(map(repr, _TITLE_TASKS))} (tasks answered by a title)."
      )
    self.trie, self.trie_report = build_title_trie(
      self.tokenizer, self.dataset.item_titles
    )
    self.num_beams = config.get("num_beams", 10)
    self.mask_history = bool(config.get("mask_history", False))
    self.prior_weight = float(config.get("prior_weight", 0.0))
    self.prior_source = config.get("prior", "llm")
    self.prior_prompts = int(config.get("prior_prompts", 16))
    self.plausibility = float(config.get("plausibility", 0.0))
    if (
      self.prior_weight < 0
      or self.prior_source not in PRIORS
      or self.prior_prompts < 1
      or not 0 <= self.plausibility < 1
    ):
      raise ValueError(
        f"evals.{name}: prior_weight={self.prior_weight} (expected >= 0), "
        f"prior={self.prior_source!r} (expected one of {PRIORS}), "
        f"prior_prompts={self.prior_prompts} (expected >= 1), "
        f"plausibility={self.plausibility} (expected in [0, 1))."
      )
    self.prefix = config.get("prefix") or (
      ("masked_" if self.mask_history else "")
      + ("prior_" if self.prior_weight else "")
    )
    self.templates = _templates(name, config, ("seen", "unseen"))
    split = self.dataset.leave_one_out(self.split)
    self._history_of = dict(
      zip(split.users.tolist(), split.histories(), strict=True)
    )
    training = self.dataset.leave_one_out("train")
    counts = np.bincount(training.targets, minlength=self.dataset.num_items)
    self._popular = np.argsort(-counts, kind="stable")[:POPULAR]
    self._log_popularity = np.log1p(counts)

  def list_contents(self, ranked, users) -> dict[str, np.ndarray]:
    """Per user, whether the first title is watched before / popular."""
    top1 = ranked[:, 0]
    watched = [top1[n] in self._history_of[int(u)] for n, u in enumerate(users)]
    return dict(
      share_top1_in_history=np.asarray(watched, np.float64),
      share_top1_popular=np.isin(top1, self._popular).astype(np.float64),
      top1_item=top1.astype(np.float64),  # an id, -1 if empty: no mean
    )

  def _banned(self, users: np.ndarray, rows: int) -> np.ndarray:
    """[rows, items] bool: each user's history items, as the trie names them."""
    banned = np.zeros((rows, self.dataset.num_items), bool)
    for row, user in enumerate(users):
      history = np.asarray(self._history_of[int(user)], np.int64)
      banned[row, self.trie.canonical[history]] = True
    return banned

  def title_log_prior(self, params, requests) -> np.ndarray:
    """[items] log prior of each title (see the class docstring)."""
    if self.prior_source == "popularity":
      return self._log_popularity
    scored = []
    for real, batch in self._batches(
      requests[: self.prior_prompts], what=f"{self.name} prior prompts"
    ):
      scored.append(
        decoding.trie_log_likelihoods(
          self.model.llm,
          self.model.llm_params(params),
          self.trie,
          prompt_embeds=self._embed(params, batch),
          prompt_mask=batch["attention_mask"],
          pad_id=self.tokenizer.pad_id,
        )[:real]
      )
    scored = np.concatenate(scored).astype(np.float64)
    return scipy.special.logsumexp(scored, axis=0) - np.log(len(scored))

  def _rank(self, params, requests, what):
    prior = None
    if self.prior_weight:
      prior = decoding.trie_prior(
        self.trie, self.title_log_prior(params, requests)
      )
    ranked, done = [], 0
    for real, batch in self._batches(requests, what=what):
      embeds = self._embed(params, batch)
      banned = None
      if self.mask_history:
        users = [r.user for r in requests[done : done + real]]
        banned = self._banned(users, len(batch["attention_mask"]))
      result = decoding.constrained_beam_search(
        self.model.llm,
        self.model.llm_params(params),
        self.trie,
        prompt_embeds=embeds,
        prompt_mask=batch["attention_mask"],
        num_beams=self.num_beams,
        pad_id=self.tokenizer.pad_id,
        banned=banned,
        prior=prior,
        prior_weight=self.prior_weight,
        plausibility=self.plausibility if prior is not None else 0.0,
      )
      ranked.append(np.asarray(result.sequence_ids)[:real])
      done += real
    return np.concatenate(ranked)

  def run(self, params):
    start = time.perf_counter()
    per_user = {"user_ids": np.asarray(self.users)}
    for task in self.tasks:
      for which in self.templates:
        requests = self._requests(task, which == "unseen")
        ranked = self._rank(
          params, requests, f"{self.name} {task}/{which} users"
        )
        targets = np.array([r.target_item for r in requests])
        values = ranked_list_metrics(ranked, targets, self.dataset.num_items)
        found = ranked == targets[:, None]
        values["rank"] = np.where(
          found.any(axis=1), found.argmax(axis=1), ranked.shape[1]
        )
        values.update(self.list_contents(ranked, self.users))
        for metric, column in values.items():
          name = f"{task}/{which}/{self.prefix}{metric}"
          per_user[name] = column
          if metric not in _PER_USER_ONLY:
            yield name, float(np.mean(column, dtype=np.float64))
        for k in (k for k in COVERAGE_AT if k <= ranked.shape[1]):
          yield (
            f"{task}/{which}/{self.prefix}coverage@{k}",
            metrics.catalog_coverage(ranked, self.dataset.num_items, k),
          )
    yield f"{self.prefix}users", len(self.users)
    yield metric_writer.PER_USER, per_user
    # One prompt per user, task and template kind.
    prompts = len(self.templates) * len(self.tasks) * len(self.users)
    yield (
      f"{self.prefix}ranking_prompts_per_s",
      prompts / (time.perf_counter() - start),
    )


# Tasks whose answer is one title, so a beam over the title trie ranks it.
_TITLE_TASKS = ("sequential", "straightforward", "conversation", "title")
_MAX_TEXT_TOKENS = 128  # MiniLM input length for semantic consistency
POPULAR = 100  # items counted as popular by share_top1_popular
PRIORS = ("llm", "popularity")  # generative_ranking's prior sources


@functools.lru_cache(maxsize=1)
def _sentence_encoder():
  model, params = bert.load_bert_model()
  tokenizer = bert.WordPieceTokenizer.from_pretrained(
    max_length=_MAX_TEXT_TOKENS
  )
  apply = jax.jit(
    lambda p, ids, mask: bert.mean_pool(
      model.apply({"params": p}, ids, mask), mask
    )
  )
  return tokenizer, params, apply


def sentence_embeddings(texts, batch_size: int = 64) -> np.ndarray:
  """MiniLM sentence embeddings (mean-pooled, L2-normalised) [N, 384]."""
  tokenizer, params, apply = _sentence_encoder()
  texts = [t if t.strip() else "." for t in texts]

  def gather(rows: np.ndarray) -> dict:
    encoded = tokenizer.encode([texts[i] for i in rows])
    return {"ids": encoded.ids, "token_mask": encoded.mask}

  out = []
  examples = pipeline.Examples(len(texts), gather, "sentences")
  for batch in pipeline.eval_batches(examples, batch_size):
    embeddings = apply(params, batch["ids"], batch["token_mask"])
    out.append(np.asarray(embeddings)[batch["mask"]])
  return np.concatenate(out)


def cached_sentence_embeddings(texts, cache_dir=None) -> np.ndarray:
  """`sentence_embeddings` of a fixed corpus, cached on disk by content.

  Embedding all 3,416 ML-1M item texts takes minutes on 2 cores and every
  description evaluation (each variant, each run) needs the same matrix.
  """
  key = "\x00".join(["minilm", str(_MAX_TEXT_TOKENS), *texts])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  root = pathlib.Path(cache_dir or resources.DEFAULT_CACHE_DIR)
  path = root / "embeddings" / f"{digest}.npy"
  if path.exists():
    return np.load(path)
  embeddings = sentence_embeddings(texts)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f"{digest}.{jax.process_index()}.partial.npy")
  np.save(partial, embeddings)
  partial.replace(path)
  return embeddings


@registry.register("description")
class DescriptionEvaluator(_PromptEvaluator):
  """Semantic consistency and log-perplexity of item descriptions."""

  def __init__(self, name, config, **context):
    super().__init__(name, config, **context)
    self.items = seeded_subset(
      self.dataset.num_items, config.get("num_items", 0), self.seed
    )
    self.max_new_tokens = config.get("max_new_tokens", 48)
    self._log_likelihood = jax.jit(self.model.answer_log_likelihood)
    self._item_text_embeddings = None

  def run(self, params):
    if self._item_text_embeddings is None:
      self._item_text_embeddings = cached_sentence_embeddings(
        self.dataset.item_texts
      )
    for unseen in (False, True):
      requests = [
        self.sampler.evaluation_request(
          "description", int(i), self.split, unseen, template_index=n
        )
        for n, i in enumerate(self.items)
      ]
      which = "unseen" if unseen else "seen"
      generated = self._generate(
        params,
        requests,
        f"{self.name} {which} descriptions",
        self.max_new_tokens,
      )
      similarity = sentence_embeddings(generated) @ self._item_text_embeddings.T
      consistent = similarity.argmax(axis=1) == self.items
      nll, tokens = 0.0, 0
      for real, batch in self._batches(
        requests, with_target=True, what=f"{self.name} {which} perplexity"
      ):
        log_probs, mask, _, _ = self._log_likelihood(params, batch)
        nll -= float(np.asarray(log_probs)[:real].sum())
        tokens += int(np.asarray(mask)[:real].sum())
      yield (
        f"description/{which}/semantic_consistency",
        float(consistent.mean()),
      )
      yield f"description/{which}/log_perplexity", nll / max(tokens, 1)
      logging.info(
        "[%s] %s description of %r: %r",
        self.name,
        which,
        self.dataset.item_titles[self.items[0]],
        generated[0],
      )
    yield "items", len(self.items)


@registry.register("shuffled_entities")
class ShuffledEntitiesEvaluator(_UserPromptEvaluator):
  """Target-title NLL with the prompt's true vs randomly swapped entities."""

  def __init__(self, name, config, **context):
    super().__init__(name, config, **context)
    self._log_likelihood = jax.jit(self.model.answer_log_likelihood)

  def _swapped(self, batch, rng):
    """The batch with each entity replaced by a random one of its kind.

    A `{user}` row becomes a random user's row of the same kind: their own
    row, or with `ilm.data.user_state='sequence'` their state before this
    split's target."""
    kind = batch["entity_kind"]
    items = rng.integers(0, self.dataset.num_items, kind.shape)
    users = self.sampler.split_user_rows(
      self.split, rng.integers(0, self.dataset.num_users, kind.size)
    ).reshape(kind.shape)
    index = np.where(kind == prompts.USER, users, items).astype(np.int32)
    return dict(batch, entity_index=index)

  def _nll_per_token(self, params, batch, real):
    log_probs, mask, _, _ = self._log_likelihood(params, batch)
    nll = -np.asarray(log_probs, np.float64)[:real].sum(axis=1)
    return nll / np.maximum(np.asarray(mask)[:real].sum(axis=1), 1)

  def run(self, params):
    per_user = {"user_ids": np.asarray(self.users)}
    rng = np.random.default_rng(self.seed)
    for task in self.config["tasks"]:
      requests = self._requests(task, unseen=False)
      true, shuffled = [], []
      for real, batch in self._batches(
        requests, with_target=True, what=f"{self.name} {task} users"
      ):
        true.append(self._nll_per_token(params, batch, real))
        if not self.model.reads_entities:
          # Nothing to swap: the same prompts, the same NLL. Skipping the
          # pass halves the evaluator's time for text-only and zero-shot.
          shuffled.append(true[-1])
          continue
        swapped = self._swapped(batch, rng)
        shuffled.append(self._nll_per_token(params, swapped, real))
      columns = {
        f"{task}/target_nll": np.concatenate(true),
        f"{task}/target_nll_shuffled": np.concatenate(shuffled),
      }
      columns[f"{task}/target_nll_gain"] = (
        columns[f"{task}/target_nll_shuffled"] - columns[f"{task}/target_nll"]
      )
      for metric, column in columns.items():
        per_user[metric] = column
        yield metric, float(np.mean(column))
    yield "shuffled_entities/users", len(self.users)
    yield metric_writer.PER_USER, per_user


@registry.register("item_naming")
class ItemNamingEvaluator(_UserPromptEvaluator):
  """What of its target item the LLM names from the item's soft tokens.

  Per user (0/1): `share_title_exact` (the answer starts with the exact
  title), `share_year_exact` (the first "(YYYY)" of the answer is the
  title's year), `share_genre_overlap` (the answer's "Genres: ..." list
  shares a genre with the item's). The `_shuffled` variants score the same
  answers against another user's target (a seeded permutation): the chance
  level of a model that writes plausible years and genres without reading
  the soft tokens, to pair with the real score.

  `evals.<name>.task`: the prompt, "description" (default; its answer
  starts with the title) or "title" (the title alone; genres never
  match there).

  Raises:
    ValueError: `task` is neither, or the templates have no such task.
  """

  def __init__(self, name, config, **context):
    super().__init__(name, config, **context)
    self.templates = _templates(name, config, ("seen",))
    self.task = config.get("task", "description")
    if self.task not in ilm_tasks.ITEM_TASKS or (
      self.task not in self.sampler.templates
    ):
      raise ValueError(
        f"evals.{name}.task={self.task!r}: expected one of "
        f"{ilm_tasks.ITEM_TASKS}, a task of the prompt templates."
      )
    self.items = self.target_items()
    self.shuffled = np.random.default_rng(self.seed).permutation(self.items)
    # Room for the longest of these titles and the genres after it.
    self.max_new_tokens = _GENRE_TOKENS + max(
      len(
        self.tokenizer.encode(
          self.dataset.item_titles[i], add_special_tokens=False
        )
      )
      for i in set(self.items.tolist())
    )

  def _scores(self, texts, items) -> dict[str, np.ndarray]:
    """0/1 per answer: exact title, year and a shared genre with `items`."""
    titles, item_texts = self.dataset.item_titles, self.dataset.item_texts
    columns = {
      "share_title_exact": [],
      "share_year_exact": [],
      "share_genre_overlap": [],
    }
    for text, item in zip(texts, items, strict=True):
      text = text.strip()
      columns["share_title_exact"].append(text.startswith(titles[item]))
      year = _YEAR.search(titles[item])
      said = _YEAR.search(text)
      columns["share_year_exact"].append(
        bool(year and said and year.group(1) == said.group(1))
      )
      columns["share_genre_overlap"].append(
        bool(_genres(text) & _genres(item_texts[item]))
      )
    return {k: np.asarray(v, np.float64) for k, v in columns.items()}

  def run(self, params):
    per_user = {"user_ids": np.asarray(self.users)}
    titles = self.dataset.item_titles
    for which in self.templates:
      requests = self._requests(self.task, which == "unseen")
      generated = self._generate(
        params, requests, f"{self.name} {which} items", self.max_new_tokens
      )
      columns = self._scores(generated, self.items)
      shuffled = self._scores(generated, self.shuffled)
      columns.update(
        {
          f"{k}_shuffled": v
          for k, v in shuffled.items()
          if k != "share_title_exact"
        }
      )
      for metric, column in columns.items():
        name = f"naming/{which}/{metric}"
        per_user[name] = column
        yield name, float(column.mean())
      logging.info(
        "[%s] %s: %r named as %r",
        self.name,
        which,
        titles[self.items[0]],
        generated[0],
      )
    yield "naming/users", len(self.users)
    yield metric_writer.PER_USER, per_user


# Answer tokens past the title: ". Genres: Action, Adventure, Sci-Fi."
_GENRE_TOKENS = 16
_YEAR = re.compile(r"\((\d{4})\)")
_GENRE_LIST = re.compile(r"Genres: ([^.]*)")


def _genres(text: str) -> set[str]:
  """The genres of the first "Genres: a, b." in `text` (empty if none)."""
  found = _GENRE_LIST.search(text)
  if not found:
    return set()
  return {g.strip() for g in found.group(1).split(",") if g.strip()}
