"""Phase-2 evaluators: the shuffled-entities probe, what ranked lists hold."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import ml1m
from ilm_jax import decoding, metric_writer, tree_utils
from ilm_jax.data import ilm_tasks, prompts, sources
from ilm_jax.evaluators import generative, registry, soft_tokens
from ilm_jax.models import ilm, llm_loading
from tests import test_ilm_model

USERS = 6


@pytest.fixture(scope="module")
def context():
  config = ml1m.get_config("tiny")
  dataset = sources.load_dataset(config.data)
  tokenizer = llm_loading.load_tokenizer(config.ilm.llm.checkpoint)
  sampler, encoder = ilm_tasks.build_prompting(config, dataset, tokenizer)
  # test_ilm_model's tiny random Llama, over the real tokenizer's vocabulary.
  llm_config = dataclasses.replace(
    test_ilm_model.LLM, vocab_size=tokenizer.vocab_size
  )
  return dict(
    config=config,
    dataset=dataset,
    tokenizer=tokenizer,
    sampler=sampler,
    encoder=encoder,
    llm_config=llm_config,
  )


def _model_and_params(context, adapter):
  tokens = context["config"].ilm.model.tokens_per_entity
  model_config = ml_collections.ConfigDict(
    dict(
      adapter=adapter,
      tokens_per_entity=tokens,
      max_target_tokens=16,
      mlp_hidden_dim=8,
    )
  )
  model = ilm.build(model_config, context["llm_config"])
  dataset, cf_dim = context["dataset"], 4
  keys = jax.random.split(jax.random.key(0), 4)
  params = dict(
    cf=dict(
      items=jax.random.normal(keys[0], (dataset.num_items, cf_dim)),
      users=jax.random.normal(keys[1], (dataset.num_users, cf_dim)),
    ),
    llm=tree_utils.unbox(
      model.llm.init(keys[2], jnp.zeros((1, 3), jnp.int32))["params"]
    ),
  )
  part = "prompt" if adapter == "prompt" else "proj"
  params[part] = ilm.init_adapter(model, keys[3], cf_dim, 8)
  return model, params


def _run(context, model, params):
  (evaluator,) = registry.from_config(
    {
      "shuffle": dict(
        type="shuffled_entities",
        split="test",
        tasks=("sequential",),
        num_users=USERS,
        batch_size=4,  # two batches, the second padded
      )
    },
    model=model,
    seed=0,
    **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
  )
  results = dict(evaluator.run(params))
  return evaluator, results.pop(metric_writer.PER_USER), results


def _nll_alone(context, model, params, request, entity_index=None):
  """Nats per answer token of one request encoded on its own."""
  example = context["encoder"].encode(request, True)
  batch = {k: np.asarray(v)[None] for k, v in example.items()}
  if entity_index is not None:
    batch["entity_index"] = entity_index[None]
  log_probs, mask, _, _ = jax.jit(model.answer_log_likelihood)(params, batch)
  return -float(np.sum(log_probs)) / float(np.sum(mask))


def test_true_and_shuffled_nll_match_prompts_scored_one_by_one(context):
  model, params = _model_and_params(context, "mlp")
  evaluator, per_user, means = _run(context, model, params)
  users = per_user["user_ids"]
  assert len(users) == USERS == means["shuffled_entities/users"]
  requests = [
    context["sampler"].evaluation_request(
      "sequential", int(u), "test", False, template_index=i
    )
    for i, u in enumerate(users)
  ]
  expected = [_nll_alone(context, model, params, r) for r in requests]
  np.testing.assert_allclose(
    per_user["sequential/target_nll"], expected, rtol=1e-4
  )
  # The swapped entities, redrawn with the evaluator's seeded generator in
  # its order (two batches of four rows, the padded rows included).
  rng = np.random.default_rng(0)
  shuffled = []
  examples = [context["encoder"].encode(r, True) for r in requests]
  for start in (0, 4):
    kinds = np.stack(
      [
        examples[min(i, USERS - 1)]["entity_kind"]
        for i in range(start, start + 4)
      ]
    )
    items = rng.integers(0, context["dataset"].num_items, kinds.shape)
    users_ = rng.integers(0, context["dataset"].num_users, kinds.shape)
    index = np.where(kinds == prompts.USER, users_, items).astype(np.int32)
    for row in range(min(4, USERS - start)):
      request = requests[start + row]
      shuffled.append(_nll_alone(context, model, params, request, index[row]))
  np.testing.assert_allclose(
    per_user["sequential/target_nll_shuffled"], shuffled, rtol=1e-4
  )
  np.testing.assert_allclose(
    per_user["sequential/target_nll_gain"],
    np.array(shuffled) - np.array(expected),
    rtol=1e-3,
    atol=1e-6,
  )
  # A random MLP projector maps every entity differently: swapping them
  # moves the NLL.
  assert np.all(per_user["sequential/target_nll_gain"] != 0)
  assert means["sequential/target_nll"] == pytest.approx(
    np.mean(expected), 1e-4
  )


def test_swapped_user_rows_are_rows_of_the_same_kind(context):
  """With sequence states, a swapped {user} is another user's state before
  the split's target (row num_users + p); items stay item ids."""
  model, _ = _model_and_params(context, "mlp")
  config = ml1m.get_config("tiny")
  config.ilm.data.user_state = "sequence"
  sampler, _ = ilm_tasks.build_prompting(
    config, context["dataset"], context["tokenizer"]
  )
  (evaluator,) = registry.from_config(
    {"shuffle": dict(type="shuffled_entities", split="test")},
    model=model,
    seed=0,
    sampler=sampler,
    **{k: context[k] for k in ("encoder", "tokenizer", "dataset")},
  )
  dataset = context["dataset"]
  kind = np.array([[prompts.USER, prompts.ITEM, prompts.ITEM]] * 50)
  swapped = evaluator._swapped(
    dict(entity_kind=kind), np.random.default_rng(0)
  )["entity_index"]
  test_rows = dataset.num_users + dataset.leave_one_out("test").ends
  assert set(swapped[:, 0]) <= set(test_rows.tolist())
  assert len(set(swapped[:, 0])) > 10
  assert swapped[:, 1:].max() < dataset.num_items


@pytest.mark.parametrize("adapter", ["prompt", "mlp"])
def test_reads_entities_says_whether_soft_tokens_follow_the_entities(
  context, adapter
):
  model, params = _model_and_params(context, adapter)
  kind = np.array([[prompts.USER, prompts.ITEM, prompts.ITEM]])
  first = model.soft_tokens(params, kind, np.array([[0, 1, 2]]))
  other = model.soft_tokens(params, kind, np.array([[3, 4, 5]]))
  assert model.reads_entities == (not np.array_equal(first, other))


def test_an_adapter_blind_to_entities_gains_nothing(context, monkeypatch):
  # The text-only prompt adapter gives every entity the same soft tokens,
  # so the evaluator scores each batch once, not twice.
  model, params = _model_and_params(context, "prompt")
  scored = []
  score = generative.ShuffledEntitiesEvaluator._nll_per_token
  monkeypatch.setattr(
    generative.ShuffledEntitiesEvaluator,
    "_nll_per_token",
    lambda self, *args: scored.append(1) or score(self, *args),
  )
  _, per_user, means = _run(context, model, params)
  assert len(scored) == 2  # two batches of four rows, one pass each
  np.testing.assert_array_equal(
    per_user["sequential/target_nll_shuffled"],
    per_user["sequential/target_nll"],
  )
  assert means["sequential/target_nll_gain"] == 0.0


def test_list_contents_flag_watched_and_popular_first_titles(
  context, monkeypatch
):
  monkeypatch.setattr(generative, "POPULAR", 5)  # of the 40 synthetic items
  model, _ = _model_and_params(context, "mlp")
  (evaluator,) = registry.from_config(
    {"rank": dict(type="generative_ranking", split="test", num_users=3)},
    model=model,
    seed=0,
    **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
  )
  dataset = context["dataset"]
  # Popularity by hand: training targets are items[1:-2] of each sequence.
  counts = np.zeros(dataset.num_items, np.int64)
  for user in range(dataset.num_users):
    for item in dataset.sequence(user)[1:-2]:
      counts[item] += 1
  most, least = int(np.argmax(counts)), int(np.argmin(counts))
  users = np.array([0, 1, 2])
  watched = [int(dataset.sequence(u)[0]) for u in users]  # before the target
  unseen = [
    next(
      i
      for i in np.argsort(counts)
      if i not in dataset.sequence(u)[:-1] and counts[i] == counts[least]
    )
    for u in users
  ]
  ranked = np.array([[watched[0], 1], [most, 1], [unseen[2], 1]])
  contents = evaluator.list_contents(ranked, users)
  np.testing.assert_array_equal(
    contents["share_top1_in_history"],
    [1.0, float(most in dataset.sequence(1)[:-1]), 0.0],
  )
  top5 = set(np.argsort(-counts, kind="stable")[:5].tolist())
  assert least not in top5
  np.testing.assert_array_equal(
    contents["share_top1_popular"], [float(watched[0] in top5), 1.0, 0.0]
  )


def _exact_ranking_config(dataset, **overrides):
  """A generative_ranking config with a beam per title (an exact search)."""
  return dict(
    type="generative_ranking",
    split="test",
    tasks=("sequential",),
    num_users=5,
    num_beams=dataset.num_items,
    batch_size=4,  # two batches, the second padded
    **overrides,
  )


def test_masked_ranking_is_the_exact_ranking_without_the_history(context):
  # With a beam per title both searches are exact, so the masked list must
  # be the unmasked list with each user's history items taken out.
  model, params = _model_and_params(context, "mlp")
  dataset = context["dataset"]
  config = _exact_ranking_config(dataset)
  rank, masked = registry.from_config(
    {"rank": config, "masked": config | {"mask_history": True}},
    model=model,
    seed=0,
    **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
  )
  assert len(set(rank.trie.canonical.tolist())) == dataset.num_items
  requests = rank._requests("sequential", False)
  full = rank._rank(params, requests, "unmasked")
  kept = masked._rank(params, requests, "masked")
  for row, request in enumerate(requests):
    history = set(dataset.sequence(request.user)[:-1].tolist())
    expected = [i for i in full[row] if i not in history]
    assert kept[row, : len(expected)].tolist() == expected
    assert np.all(kept[row, len(expected) :] == -1)
    assert history  # the mask had something to remove
  # Metric names carry the prefix; a masked list never starts with history.
  results = dict(masked.run(params))
  per_user = results.pop(metric_writer.PER_USER)
  assert "sequential/seen/masked_hr@10" in results
  assert "sequential/seen/hr@10" not in results
  np.testing.assert_array_equal(
    per_user["sequential/seen/masked_share_top1_in_history"], 0.0
  )


@pytest.mark.parametrize("source", ["llm", "popularity"])
def test_prior_ranking_is_the_exact_contrastive_ranking(context, source):
  # With a beam per title the search is exact, so each list must order the
  # catalogue by log p(title | prompt) - 0.5 log prior(title), the
  # likelihoods scored in one tree pass per prompt (decoding's tests check
  # those against full forward passes).
  model, params = _model_and_params(context, "mlp")
  dataset = context["dataset"]
  config = _exact_ranking_config(
    dataset, prior=source, prior_weight=0.5, prior_prompts=3
  )
  (rank,) = registry.from_config(
    {"rank_prior": config},
    model=model,
    seed=0,
    **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
  )
  assert len(set(rank.trie.canonical.tolist())) == dataset.num_items
  requests = rank._requests("sequential", False)
  likelihoods = np.concatenate(
    [
      decoding.trie_log_likelihoods(
        model.llm,
        model.llm_params(params),
        rank.trie,
        prompt_embeds=rank._embed(params, batch),
        prompt_mask=batch["attention_mask"],
      )[:real]
      for real, batch in rank._batches(requests)
    ]
  ).astype(np.float64)
  if source == "llm":  # log of the mean probability over 3 users' prompts
    prior = np.log(np.exp(likelihoods[:3]).mean(axis=0))
  else:
    targets = dataset.leave_one_out("train").targets
    prior = np.log1p(np.bincount(targets, minlength=dataset.num_items))
  np.testing.assert_allclose(
    rank.title_log_prior(params, requests), prior, rtol=1e-5, atol=1e-5
  )
  contrastive = likelihoods - 0.5 * prior
  ranked = rank._rank(params, requests, "prior")
  for row in range(len(requests)):
    assert sorted(ranked[row].tolist()) == list(range(dataset.num_items))
    assert np.all(np.diff(contrastive[row, ranked[row]]) <= 1e-4)
  # The prior matters here: some list is not in plain likelihood order.
  assert any(
    np.any(np.diff(likelihoods[row, ranked[row]]) > 1e-4)
    for row in range(len(requests))
  )
  results = dict(rank.run(params))
  results.pop(metric_writer.PER_USER)
  assert "sequential/seen/prior_hr@10" in results
  assert results["prior_users"] == 5


@pytest.mark.parametrize(
  "bad",
  [
    dict(prior_weight=-0.1),
    dict(prior="zipf"),
    dict(prior_prompts=0),
    dict(plausibility=1.5),
  ],
)
def test_bad_prior_settings_are_named(context, bad):
  model, _ = _model_and_params(context, "mlp")
  with pytest.raises(ValueError, match="evals.rank_prior: prior_weight"):
    registry.from_config(
      {
        "rank_prior": dict(
          type="generative_ranking", split="test", num_users=2, **bad
        )
      },
      model=model,
      seed=0,
      **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
    )


def test_title_ranking_names_each_users_target_from_its_own_tokens(
  context, monkeypatch
):
  model, params = _model_and_params(context, "mlp")
  dataset = context["dataset"]
  shared = {
    k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")
  }
  config = dict(
    type="generative_ranking",
    split="test",
    tasks=("title",),
    num_users=4,
    templates=("seen",),
  )
  (rank,) = registry.from_config(
    {"rank": config}, model=model, seed=0, **shared
  )
  requests = rank._requests("title", False)
  targets = [int(dataset.sequence(int(u))[-1]) for u in rank.users]
  seen = context["sampler"].templates["title"].seen
  assert [r.item for r in requests] == targets  # the item, not the user
  assert [r.target_item for r in requests] == targets
  assert [r.template for r in requests] == [seen[i] for i in range(4)]
  # Target first, second, absent, first (the rest of each list empty).
  other = [(t + 1) % dataset.num_items for t in targets]
  lists = np.array(
    [
      [targets[0], other[0]],
      [other[1], targets[1]],
      [other[2], (targets[2] + 2) % dataset.num_items],
      [targets[3], other[3]],
    ]
  )
  lists = np.pad(lists, ((0, 0), (0, 8)), constant_values=-1)
  monkeypatch.setattr(rank, "_rank", lambda params, requests, what: lists)
  results = dict(rank.run(params))
  per_user = results.pop(metric_writer.PER_USER)
  np.testing.assert_array_equal(per_user["title/seen/rank"], [0, 1, 10, 0])
  np.testing.assert_array_equal(per_user["title/seen/hr@5"], [1, 1, 0, 1])
  ndcg = [1.0, 1 / np.log2(3), 0.0, 1.0]
  np.testing.assert_allclose(per_user["title/seen/ndcg@10"], ndcg, rtol=1e-6)
  assert results["title/seen/hr@10"] == 0.75
  with pytest.raises(ValueError, match=r"evals.bad.tasks=\('description',\)"):
    registry.from_config(
      {"bad": config | {"tasks": ("description",)}},
      model=model,
      seed=0,
      **shared,
    )


def test_item_naming_counts_generations_that_start_with_the_target_title(
  context, monkeypatch
):
  model, params = _model_and_params(context, "mlp")
  dataset, tokenizer = context["dataset"], context["tokenizer"]
  (evaluator,) = registry.from_config(
    {
      "naming": dict(
        type="item_naming", split="test", num_users=USERS, batch_size=4
      )
    },
    model=model,
    seed=0,
    **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
  )
  # The items to name are the users' test targets.
  split = dataset.leave_one_out("test")
  target_of = dict(
    zip(split.users.tolist(), split.targets.tolist(), strict=True)
  )
  targets = [target_of[int(u)] for u in evaluator.users]
  np.testing.assert_array_equal(evaluator.items, targets)
  titles = [dataset.item_titles[i] for i in targets]
  other = [dataset.item_titles[(i + 1) % dataset.num_items] for i in targets]
  # Per user, in order: title then more text (named), a leading space
  # (named), the title cut short, another item's title, the whole
  # description, an empty answer.
  answers = [
    titles[0] + ". Genres: Drama.",
    " " + titles[1],
    titles[2][:-1],
    other[3],
    dataset.item_texts[targets[4]],
    "",
  ]
  expected = [1.0, 1.0, 0.0, float(other[3].startswith(titles[3])), 1.0, 0.0]
  calls = []

  def fake_greedy(llm, llm_params, *, prompt_embeds, max_new_tokens, **kw):
    rows = len(prompt_embeds)
    start = sum(len(c) for c in calls)
    chunk = answers[start : start + rows]
    calls.append(chunk)
    chunk += [""] * (rows - len(chunk))  # the padded rows of the last batch
    ids = [tokenizer.encode(a, add_special_tokens=False) for a in chunk]
    out = np.full((rows, max_new_tokens), kw["eos_id"], np.int32)
    for row, tokens in enumerate(ids):
      out[row, : len(tokens)] = tokens[:max_new_tokens]
    return jnp.asarray(out)

  monkeypatch.setattr(generative.decoding, "greedy", fake_greedy)
  results = dict(evaluator.run(params))
  per_user = results.pop(metric_writer.PER_USER)
  name = "naming/seen/share_title_exact"
  np.testing.assert_array_equal(per_user[name], expected)
  assert results[name] == pytest.approx(np.mean(expected))
  assert results["naming/users"] == USERS
  # Genres, against the target and against the shuffled control (a
  # permutation of the same targets); the synthetic titles have no year.
  assert sorted(evaluator.shuffled) == sorted(targets)

  def shares_genre(answer, item):
    # Synthetic items have one genre each.
    listed = dataset.item_texts[item].split("Genres: ")[1].split(".")[0]
    said = (
      answer.split("Genres: ")[1].split(".")[0] if "Genres: " in answer else ""
    )
    return float(listed in said.split(", "))

  for column, items in (("", targets), ("_shuffled", evaluator.shuffled)):
    np.testing.assert_array_equal(
      per_user[f"naming/seen/share_genre_overlap{column}"],
      [shares_genre(a, i) for a, i in zip(answers, items, strict=True)],
    )
    assert not per_user[f"naming/seen/share_year_exact{column}"].any()
  # Room for the longest target title and the genres after it.
  longest = max(
    len(tokenizer.encode(t, add_special_tokens=False)) for t in titles
  )
  assert evaluator.max_new_tokens == longest + generative._GENRE_TOKENS


def test_item_naming_scores_title_year_and_genres_by_hand(context):
  evaluator = generative.ItemNamingEvaluator.__new__(
    generative.ItemNamingEvaluator
  )
  evaluator.dataset = types.SimpleNamespace(
    item_titles=["Heat (1995)", "Up (2009)", "Untitled"],
    item_texts=[
      "Heat (1995). Genres: Action, Crime, Thriller. Director: M. Mann.",
      "Up (2009). Genres: Animation, Children's.",
      "Untitled. Director: Nobody.",
    ],
  )
  answers = [
    "Heat (1995). Genres: Crime.",  # all three
    " Heat 2 (1995). Genres: Drama. Cast: Crime",  # year; genres not listed
    "Up (2010). Genres: Children's, Comedy.",  # title stops at "Up (20"
    "Untitled (2001). Genres: Drama.",  # the item has no year nor genres
  ]
  scores = evaluator._scores(answers, [0, 0, 1, 2])
  np.testing.assert_array_equal(scores["share_title_exact"], [1, 0, 0, 1])
  np.testing.assert_array_equal(scores["share_year_exact"], [1, 1, 0, 0])
  np.testing.assert_array_equal(scores["share_genre_overlap"], [1, 0, 1, 0])


def test_item_naming_asks_the_title_prompt_when_told(context, monkeypatch):
  model, params = _model_and_params(context, "mlp")
  shared = {
    k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")
  }
  (evaluator,) = registry.from_config(
    {
      "naming": dict(
        type="item_naming", split="test", num_users=3, task="title"
      )
    },
    model=model,
    seed=0,
    **shared,
  )
  asked = []

  def fake_generate(params, requests, what, max_new_tokens):
    asked.extend(requests)
    return [context["dataset"].item_titles[r.item] for r in requests]

  monkeypatch.setattr(evaluator, "_generate", fake_generate)
  results = dict(evaluator.run(params))
  seen = context["sampler"].templates["title"].seen
  assert [r.task for r in asked] == ["title"] * 3
  assert [r.template for r in asked] == [seen[n % len(seen)] for n in range(3)]
  assert [r.item for r in asked] == evaluator.items.tolist()
  assert results["naming/seen/share_title_exact"] == 1.0
  with pytest.raises(ValueError, match=r"evals.bad.task='sequential'"):
    registry.from_config(
      {"bad": dict(type="item_naming", split="test", task="sequential")},
      model=model,
      seed=0,
      **shared,
    )


@pytest.mark.parametrize("kind", ["item_naming", "generative_ranking"])
def test_unknown_template_kinds_are_named(context, kind):
  model, _ = _model_and_params(context, "mlp")
  with pytest.raises(
    ValueError, match=r"evals.bad.templates=\('seen', 'sen'\)"
  ):
    registry.from_config(
      {"bad": dict(type=kind, split="test", templates=("seen", "sen"))},
      model=model,
      seed=0,
      **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
    )


# --- soft_token_stats ------------------------------------------------------


def test_soft_token_statistics_by_hand():
  # Two entities, two slots: slot 0 identical (share 0), slot 1 along one
  # axis with norms 1 and 2 around the mean 1.5 (shares 0.5 and 0.25).
  tokens = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]])
  stats = soft_tokens.token_statistics(tokens)
  assert stats["entity_share"] == pytest.approx((0.0 + 0.375) / 2)
  assert stats["entity_cosine"] == pytest.approx(1.0)
  assert stats["slot_cosine"] == pytest.approx(0.0)  # [1,0] vs [0,1]
  assert stats["norm"] == pytest.approx(1.0)  # median of 1, 1, 1, 2
  # Opposite single tokens: each is all content, cosine -1; no slot pairs.
  stats = soft_tokens.token_statistics(np.array([[[3.0, 4.0]], [[-3.0, -4.0]]]))
  assert stats == dict(entity_share=1.0, entity_cosine=-1.0, norm=5.0)


def test_soft_token_statistics_match_a_loop_over_pairs():
  tokens = np.random.default_rng(0).normal(size=(5, 3, 4)) + 2.0
  unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
  pairs = [
    unit[a, t] @ unit[b, t]
    for t in range(3)
    for a in range(5)
    for b in range(5)
    if a != b
  ]
  slots = [
    unit[a, s] @ unit[a, t]
    for a in range(5)
    for s in range(3)
    for t in range(3)
    if s != t
  ]
  stats = soft_tokens.token_statistics(tokens)
  assert stats["entity_cosine"] == pytest.approx(np.mean(pairs))
  assert stats["slot_cosine"] == pytest.approx(np.mean(slots))


@pytest.mark.parametrize("shape", [(4, 8), (1, 2, 8)])
def test_soft_token_statistics_reject_bad_shapes(shape):
  with pytest.raises(ValueError, match=r"expected \[entities >= 2"):
    soft_tokens.token_statistics(np.ones(shape))


def _stats(context, model, params, num_entities=5):
  (evaluator,) = registry.from_config(
    {
      "soft": dict(
        type="soft_token_stats", split="test", num_entities=num_entities
      )
    },
    model=model,
    seed=0,
    **{k: context[k] for k in ("sampler", "encoder", "tokenizer", "dataset")},
  )
  return dict(evaluator.run(params))


def test_soft_token_stats_of_the_adapters(context):
  # MLP: distinct CF rows give distinct tokens; one shared CF row gives
  # every item the same tokens (share 0, cosine 1).
  model, params = _model_and_params(context, "mlp")
  stats = _stats(context, model, params)
  embedding = np.asarray(params["llm"]["embedding"], np.float64)
  llm_norm = np.linalg.norm(embedding, axis=-1).mean()
  assert stats["soft_tokens/llm_token_norm"] == pytest.approx(llm_norm, 1e-5)
  for kind in ("items", "users"):
    assert stats[f"soft_tokens/{kind}/entity_share"] > 0.05
    assert stats[f"soft_tokens/{kind}/norm_over_llm"] == pytest.approx(
      stats[f"soft_tokens/{kind}/norm"] / llm_norm, 1e-5
    )
  same = dict(params, cf=dict(params["cf"]))
  same["cf"]["items"] = jnp.broadcast_to(
    params["cf"]["items"][:1], params["cf"]["items"].shape
  )
  stats = _stats(context, model, same)
  assert stats["soft_tokens/items/entity_share"] == pytest.approx(0, abs=1e-5)
  assert stats["soft_tokens/items/entity_cosine"] == pytest.approx(1, 1e-5)
  assert stats["soft_tokens/users/entity_share"] > 0.05
  # The text-only prompt is one set of tokens for every entity; the
  # zero-shot LLM has no soft tokens.
  model, params = _model_and_params(context, "prompt")
  stats = _stats(context, model, params, num_entities=0)
  assert stats["soft_tokens/users/entity_share"] == pytest.approx(0, abs=1e-6)
  assert stats["soft_tokens/users/entity_cosine"] == pytest.approx(1, 1e-5)
  model, params = _model_and_params(context, "none")
  assert _stats(context, model, params) == {}
