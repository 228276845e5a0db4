"""The ILM composite on tiny random parts: splicing, loss, gradients."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common, ml1m
from ilm_jax import optim, sharding, train, tree_utils
from ilm_jax.data import ilm_tasks, prompts
from ilm_jax.models import ilm, llm, qformer

LLM = llm.LlamaConfig(
  vocab_size=50,
  hidden_size=16,
  intermediate_size=32,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
)
CF_DIM, NUM_ITEMS, NUM_USERS = 6, 5, 3


def _qformer_config(num_queries=2):
  config = ml1m.base_config().qformer.model
  config.update(
    cf_dim=CF_DIM,
    num_queries=num_queries,
    num_layers=2,
    hidden_size=8,
    num_heads=2,
    intermediate_size=16,
    vocab_size=40,
    max_position_embeddings=16,
    pretrained="",
    dropout_rate=0.0,
    embed_dim=4,
  )
  return config


def _model(adapter, tokens=2, llm_config=LLM, **fields):
  model_config = ml_collections.ConfigDict(
    dict(
      adapter=adapter,
      tokens_per_entity=tokens,
      max_target_tokens=4,
      mlp_hidden_dim=8,
      **fields,
    )
  )
  return ilm.build(model_config, llm_config, _qformer_config(tokens))


def _params(model, rng=0):
  keys = jax.random.split(jax.random.key(rng), 5)
  params = dict(
    cf=dict(
      items=jax.random.normal(keys[0], (NUM_ITEMS, CF_DIM)),
      users=jax.random.normal(keys[1], (NUM_USERS, CF_DIM)),
    ),
    llm=tree_utils.unbox(
      model.llm.init(keys[2], jnp.zeros((1, 3), jnp.int32))["params"]
    ),
  )
  if model.adapter == "qformer":
    params["qformer"] = qformer.init_params(_qformer_config(), keys[3])
  adapter = ilm.init_adapter(model, keys[4], CF_DIM, 8)
  if adapter:
    params["prompt" if model.adapter == "prompt" else "proj"] = adapter
  if model.llm.config.lora_rank:
    params["lora"] = tree_utils.unbox(
      llm.init_lora(model.llm.config, jax.random.fold_in(keys[2], 1))
    )
  return params


def _batch():
  # Sequence: [5, soft(user 2: slots 0,1), 7, soft(item 4: 0,1), 9, 3, eos].
  ids = np.array([[5, 0, 0, 7, 0, 0, 9, 3, 2, 0]], np.int32)
  return dict(
    input_ids=ids,
    soft_entity=np.array([[-1, 0, 0, -1, 1, 1, -1, -1, -1, -1]], np.int32),
    soft_slot=np.array([[0, 0, 1, 0, 0, 1, 0, 0, 0, 0]], np.int32),
    entity_kind=np.array([[prompts.USER, prompts.ITEM]], np.int32),
    entity_index=np.array([[2, 4]], np.int32),
    entity_mask=np.ones((1, 2), bool),
    attention_mask=np.array([[1] * 9 + [0]], bool),
    targets=np.array([[0, 0, 0, 0, 0, 0, 3, 2, 0, 0]], np.int32),
    loss_mask=np.array([[0, 0, 0, 0, 0, 0, 1, 1, 0, 0]], bool),
  )


@pytest.mark.parametrize(
  "adapter", [pytest.param("qformer", marks=pytest.mark.slow), "mlp"]
)
def test_soft_tokens_replace_exactly_the_placeholder_embeddings(adapter):
  model = _model(adapter)
  params = _params(model)
  batch = _batch()
  embeds = np.asarray(jax.jit(model.input_embeddings)(params, batch))
  table = np.asarray(params["llm"]["embedding"])
  soft_tokens = jax.jit(model.soft_tokens)
  soft = np.asarray(
    soft_tokens(params, batch["entity_kind"], batch["entity_index"])
  )
  assert soft.shape == (1, 2, 2, LLM.hidden_size)
  for position in (0, 3, 6, 7, 8, 9):  # text positions keep their embedding
    np.testing.assert_array_equal(
      embeds[0, position], table[batch["input_ids"][0, position]]
    )
  expected = {1: (0, 0), 2: (0, 1), 4: (1, 0), 5: (1, 1)}
  for position, (entity, slot) in expected.items():
    np.testing.assert_array_equal(embeds[0, position], soft[0, entity, slot])
  # The user's soft tokens come from the user table, the item's from items.
  user_only = dict(
    params, cf=dict(params["cf"], items=params["cf"]["items"] * 0)
  )
  changed = np.asarray(
    soft_tokens(user_only, batch["entity_kind"], batch["entity_index"])
  )
  np.testing.assert_allclose(changed[0, 0], soft[0, 0], rtol=1e-6)
  assert not np.allclose(changed[0, 1], soft[0, 1])


@pytest.mark.slow
def test_loss_is_answer_cross_entropy_and_grads_reach_the_adapter():
  model = _model("qformer")
  params = _params(model)
  batch = _batch()
  loss, metrics = jax.jit(model.loss)(params, batch, None)
  logits = jax.jit(
    lambda p, b: model.llm.apply(
      {"params": p["llm"]},
      input_embeds=model.input_embeddings(p, b),
      attention_mask=b["attention_mask"],
    )[0]
  )(params, batch)
  log_probs = jax.nn.log_softmax(np.asarray(logits[0]), axis=-1)
  expected = -(log_probs[6, 3] + log_probs[7, 2]) / 2
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  assert int(metrics["answer_tokens"]) == 2
  assert int(metrics["answer_tokens_dropped"]) == 0

  grads = jax.jit(jax.grad(lambda p: model.loss(p, batch, None)[0]))(params)
  assert float(tree_utils.global_norm(grads["proj"])) > 0
  assert float(jnp.abs(grads["qformer"]["query_tokens"]).sum()) > 0
  assert float(tree_utils.global_norm(grads["qformer"]["cf_input"])) > 0


def test_text_only_model_ignores_soft_positions():
  model = _model("none")
  params = _params(model)
  embeds = jax.jit(model.input_embeddings)(params, _batch())
  table = np.asarray(params["llm"]["embedding"])
  np.testing.assert_array_equal(
    np.asarray(embeds[0]), table[_batch()["input_ids"][0]]
  )


def test_text_only_prompt_adapter_trains_only_its_learned_prompt():
  model = _model("prompt")
  params = _params(model)
  # One PROMPT entity (2 slots) at positions 1-2; position 4-5 are text here.
  batch = dict(
    _batch(),
    soft_entity=np.array([[-1, 0, 0, -1, -1, -1, -1, -1, -1, -1]], np.int32),
    entity_kind=np.array([[prompts.PROMPT, prompts.ITEM]], np.int32),
    entity_mask=np.array([[True, False]]),
  )
  embeds = np.asarray(jax.jit(model.input_embeddings)(params, batch))
  prompt = np.asarray(params["prompt"]["embedding"])
  assert prompt.shape == (2, LLM.hidden_size)
  np.testing.assert_array_equal(embeds[0, 1:3], prompt)
  table = np.asarray(params["llm"]["embedding"])
  np.testing.assert_array_equal(embeds[0, 3:], table[batch["input_ids"][0, 3:]])
  grads = jax.jit(jax.grad(lambda p: model.loss(p, batch, None)[0]))(params)
  assert float(jnp.abs(grads["prompt"]["embedding"]).sum()) > 0
  assert set(params) == {"cf", "llm", "prompt"}


@pytest.mark.slow
def test_phase2_freezes_exactly_the_q_former_leaves_the_loss_never_uses():
  """ml1m's phase-2 `frozen` regexes against the loss's own gradients: a
  Q-Former leaf is frozen iff the ILM loss gives it an all-zero gradient
  (the phase-1 heads and the text branch), so no unused leaf holds Adam
  moments or decays, and no used one is held fixed. Attention key biases
  are used but have a zero gradient in exact arithmetic (softmax ignores
  a shift shared by every key), so they are left out of the comparison."""
  model = _model("qformer")
  params = _params(model)
  grads = jax.jit(jax.grad(lambda p: model.loss(p, _batch(), None)[0]))(params)
  frozen = optim.frozen_mask(params, ml1m.base_config().ilm.optim)
  unused, frozen_paths = set(), set()
  for path, grad, is_frozen in zip(
    tree_utils.leaf_paths(params),
    jax.tree.leaves(grads),
    jax.tree.leaves(frozen),
    strict=True,
  ):
    if path.startswith("qformer/") and not path.endswith("/key/bias"):
      if not np.any(np.asarray(grad)):
        unused.add(path)
      if is_frozen:
        frozen_paths.add(path)
  assert "qformer/embeddings/word_embeddings/embedding" in unused
  assert "qformer/layers_1/text_ffn/intermediate/kernel" in unused
  assert "qformer/temperature" in unused
  assert frozen_paths == unused


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 2])
def test_training_leaves_every_frozen_parameter_bitwise_unchanged(
  tmp_path, lora_rank
):
  """Real trainer, real ml1m freeze rules, tiny random parts; with LoRA
  (ilm.llm.lora) its factors train and the LLM's own weights do not."""
  model = _model(
    "qformer",
    llm_config=LLM.replace(lora_rank=lora_rank, lora_targets=("q", "v")),
  )
  initial = _params(model)
  assert ("lora" in initial) == bool(lora_rank)
  cfg = ml1m.get_config("tiny").ilm
  cfg.optim.update(warmup_steps=0, learning_rate=1e-2)
  cfg.train.update(steps=3, batch_size=2, log_every=1, checkpoint_every=3)
  cfg.evals = {}
  examples = [{k: v[0] for k, v in _batch().items()} for _ in range(4)]
  task = train.Task(
    name="ilm",
    # Copies: the trainer donates its state buffers.
    init_params=lambda rng: jax.tree.map(jnp.array, initial),
    loss_fn=model.loss,
    train_iterator=iter(
      grain.MapDataset.source(examples).repeat().batch(2).to_iter_dataset()
    ),
  )
  mesh_config = common.mesh_config()
  result = train.train(
    task,
    cfg,
    mesh=sharding.make_mesh(mesh_config, jax.devices()[:1]),
    mesh_config=mesh_config,
    workdir=tmp_path,
  )
  assert result.step == 3
  frozen = optim.frozen_mask(initial, cfg.optim)
  paths = tree_utils.leaf_paths(initial)
  moved = dict(
    zip(
      paths,
      jax.tree.leaves(
        jax.tree.map(
          lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
          initial,
          result.params,
        )
      ),
      strict=True,
    )
  )
  for path, is_frozen in zip(paths, jax.tree.leaves(frozen), strict=True):
    if path.startswith(("llm/", "cf/")):
      assert is_frozen, path
    assert not (is_frozen and moved[path]), f"frozen {path} changed"
  assert moved["qformer/query_tokens"] and moved["proj/dense/kernel"]
  if lora_rank:
    # B starts at zero, so A's first gradient is zero; both move by step 3.
    lora_paths = [p for p in paths if p.startswith("lora/")]
    assert len(lora_paths) == 4 and all(moved[p] for p in lora_paths)
  # No optimizer state for any frozen leaf (Adam moments of llm/ or cf/).
  tx, mask, _ = optim.make(cfg.optim, initial, 3)
  trainable, _ = optim.Partition.from_mask(mask).split(initial)
  opt_paths = tree_utils.leaf_paths(jax.eval_shape(tx.init, trainable))
  assert any("qformer" in p for p in opt_paths)
  assert not any("llm" in p or "/cf/" in p for p in opt_paths), opt_paths


def test_token_count_must_match_the_qformer_queries():
  config = ml_collections.ConfigDict(
    dict(
      adapter="qformer",
      tokens_per_entity=3,
      max_target_tokens=4,
      mlp_hidden_dim=8,
    )
  )
  with pytest.raises(ValueError, match="tokens_per_entity=3 must equal"):
    ilm.build(config, LLM, _qformer_config(2))


def test_per_task_answer_sums_split_the_loss_by_task():
  """Two rows of different tasks: each task's summed NLL and token count
  are its own row's, and together they give the batch loss."""
  model = _model("mlp")
  params = _params(model)
  one = _batch()
  batch = {k: np.concatenate([v, v]) for k, v in one.items()}
  batch["loss_mask"][1, 7] = False  # the second row scores one token only
  batch["task"] = np.array(
    [
      ilm_tasks.TASKS.index("conversation"),
      ilm_tasks.TASKS.index("sequential"),
    ],
    np.int32,
  )
  loss, metrics = jax.jit(model.loss)(params, batch, None)
  log_probs, mask, _, _ = jax.jit(model.answer_log_likelihood)(
    params, batch, None
  )
  row_nll = -np.asarray(log_probs).sum(axis=1)
  assert float(metrics["answer_tokens/conversation"]) == 2
  assert float(metrics["answer_tokens/sequential"]) == 1
  assert float(metrics["answer_tokens/description"]) == 0
  np.testing.assert_allclose(
    float(metrics["answer_nll_sum/conversation"]), row_nll[0], rtol=1e-6
  )
  np.testing.assert_allclose(
    float(metrics["answer_nll_sum/sequential"]), row_nll[1], rtol=1e-6
  )
  total = sum(float(metrics[f"answer_nll_sum/{t}"]) for t in ilm_tasks.TASKS)
  np.testing.assert_allclose(total / 3, float(loss), rtol=1e-6)


def test_soft_token_norm_llm_rescales_to_the_mean_token_norm_and_trains():
  plain, scaled = _model("mlp"), _model("mlp", soft_token_norm="llm")
  params = _params(plain)
  batch = _batch()
  kind, index = batch["entity_kind"], batch["entity_index"]
  before = np.asarray(plain.soft_tokens(params, kind, index))
  after = np.asarray(scaled.soft_tokens(params, kind, index))
  table = np.asarray(params["llm"]["embedding"], np.float64)
  target = np.linalg.norm(table, axis=-1).mean()
  # Same directions as projected, every token at the LLM's mean norm.
  np.testing.assert_allclose(
    np.linalg.norm(after, axis=-1), np.full(after.shape[:-1], target), 1e-5
  )
  unit = before / np.linalg.norm(before, axis=-1, keepdims=True)
  np.testing.assert_allclose(after, unit * target, rtol=1e-4, atol=1e-6)
  # The projector still gets a gradient through the rescaling.
  grads = jax.grad(lambda p: scaled.loss(p, batch, None)[0])(params)
  assert np.abs(np.asarray(grads["proj"]["out"]["kernel"])).sum() > 0
  with pytest.raises(ValueError, match="soft_token_norm='unit'"):
    _model("mlp", soft_token_norm="unit")


def test_reference_ids_are_evenly_spaced_and_capped_at_the_table():
  np.testing.assert_array_equal(ilm.reference_ids(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(ilm.reference_ids(3, 5), [0, 1, 2])


def test_query_centering_subtracts_the_reference_mean_per_kind():
  plain = _model("qformer")
  centered = _model("qformer", query_centering=NUM_ITEMS + NUM_USERS)
  params = _params(plain)
  encode = lambda cf: plain.qformer.apply(  # noqa: E731
    {"params": params["qformer"]}, cf, method=qformer.QFormer.encode_queries
  )
  items, users = params["cf"]["items"], params["cf"]["users"]
  # By hand: every item's query outputs minus their mean over all items
  # (the reference set, capped at the table), and likewise for users.
  expected = {}
  for kind, table in ((prompts.ITEM, items), (prompts.USER, users)):
    queries = encode(table)
    proj = plain.projector.apply(
      {"params": params["proj"]}, queries - queries.mean(axis=0)
    )
    expected[kind] = np.asarray(proj)
    index = jnp.arange(len(table))[None]
    got = centered.soft_tokens(params, jnp.full_like(index, kind), index)[0]
    np.testing.assert_allclose(np.asarray(got), expected[kind], atol=1e-5)
    # Linear projector: the centred tokens average to its bias.
    np.testing.assert_allclose(
      np.asarray(got).mean(axis=0)[0],
      np.asarray(params["proj"]["dense"]["bias"]),
      atol=1e-5,
    )
  # Mixed kinds in one batch: each entity is centred by its own kind.
  batch = _batch()
  got = np.asarray(
    centered.soft_tokens(params, batch["entity_kind"], batch["entity_index"])
  )[0]
  for slot, (kind, index) in enumerate(
    zip(batch["entity_kind"][0], batch["entity_index"][0], strict=True)
  ):
    np.testing.assert_allclose(got[slot], expected[int(kind)][index], atol=1e-5)
  # The Q-Former still gets a gradient, through the mean as well.
  grads = jax.grad(lambda p: centered.loss(p, batch, None)[0])(params)
  assert np.abs(np.asarray(grads["qformer"]["query_tokens"])).sum() > 0
  with pytest.raises(ValueError, match="query_centering=-1"):
    _model("qformer", query_centering=-1)


def test_per_query_projector_maps_each_query_with_its_own_layer():
  shared = _model("qformer")
  per_query = _model("qformer", qformer_projector="per_query")
  params = _params(shared)
  params["proj"] = ilm.init_adapter(per_query, jax.random.key(7), CF_DIM, 8)
  kernel = np.asarray(params["proj"]["kernel"])
  assert kernel.shape == (2, 8, LLM.hidden_size)  # [queries, in, llm]
  assert params["proj"]["bias"].shape == (2, LLM.hidden_size)
  params["proj"]["bias"] = jnp.arange(2 * LLM.hidden_size, dtype=jnp.float32)
  params["proj"]["bias"] = params["proj"]["bias"].reshape(2, -1)
  queries = np.asarray(
    shared.qformer.apply(
      {"params": params["qformer"]},
      params["cf"]["items"],
      method=qformer.QFormer.encode_queries,
    )
  )
  index = jnp.arange(NUM_ITEMS)[None]
  got = np.asarray(
    per_query.soft_tokens(params, jnp.full_like(index, prompts.ITEM), index)
  )[0]
  # By hand: query t of item i through kernel t and bias t.
  bias = np.asarray(params["proj"]["bias"])
  for i in range(NUM_ITEMS):
    for t in range(2):
      np.testing.assert_allclose(
        got[i, t], queries[i, t] @ kernel[t] + bias[t], rtol=1e-5, atol=1e-5
      )
  # Equal query outputs give different tokens per slot: the layers differ.
  same = np.broadcast_to(queries[:1, :1], queries[:1].shape)
  tokens = np.asarray(
    per_query.projector.apply({"params": params["proj"]}, same)
  )
  assert not np.allclose(tokens[0, 0], tokens[0, 1])
  grads = jax.grad(lambda p: per_query.loss(p, _batch(), None)[0])(params)
  assert np.abs(np.asarray(grads["proj"]["kernel"][1])).sum() > 0
  with pytest.raises(ValueError, match="expects 2 query outputs"):
    per_query.projector.apply({"params": params["proj"]}, queries[:, :1])
  with pytest.raises(ValueError, match="qformer_projector='dense'"):
    _model("qformer", qformer_projector="dense")


def test_projector_default_is_per_query_but_old_exports_stay_linear():
  """The configs choose one map per query (ours); a model config written
  before the field existed (an older adapter export; `_model` builds one
  without it) must rebuild the paper's shared layer, whose kernel is
  [in, llm], or its saved params would not load."""
  assert ml1m.get_config("cpu").ilm.model.qformer_projector == "per_query"
  assert ml1m.get_config().ilm.model.qformer_projector == "per_query"
  old_export = _model("qformer")
  params = ilm.init_adapter(old_export, jax.random.key(0), CF_DIM, 8)
  assert params["dense"]["kernel"].shape == (8, LLM.hidden_size)


def _user_target_batch():
  """Three rows: users 2 and 0 both asked for item 1; a row with no user."""
  one = _batch()
  batch = {k: np.concatenate([v, v, v]) for k, v in one.items()}
  batch["entity_index"] = np.array([[2, 4], [0, 3], [1, 0]], np.int32)
  batch["entity_kind"] = np.array(
    [[prompts.USER, prompts.ITEM]] * 2 + [[prompts.ITEM, prompts.ITEM]],
    np.int32,
  )
  batch["target_item"] = np.array([1, 1, 3], np.int32)
  return batch


def _user_target_reference(model, params, batch, negatives):
  """The InfoNCE of models/ilm.py, one row at a time in numpy (f64)."""
  kinds, index = batch["entity_kind"], batch["entity_index"]
  soft = np.asarray(model.soft_tokens(params, kinds, index), np.float64)
  items = np.asarray(
    model.soft_tokens(
      params,
      np.full((1, NUM_ITEMS), prompts.ITEM),
      np.arange(NUM_ITEMS)[None],
    )[0],
    np.float64,
  ).reshape(NUM_ITEMS, -1)
  items /= np.linalg.norm(items, axis=1, keepdims=True)
  candidates = list(batch["target_item"]) + list(negatives)
  losses = []
  for b in range(len(batch["target_item"])):
    users = np.flatnonzero(kinds[b] == prompts.USER)
    if not len(users):
      continue
    u = soft[b, users[0]].reshape(-1)
    u /= np.linalg.norm(u)
    target = batch["target_item"][b]
    logits = [
      u @ items[c] / model.user_target_temperature
      for j, c in enumerate(candidates)
      if j == b or c != target
    ]
    own = u @ items[target] / model.user_target_temperature
    losses.append(np.log(np.sum(np.exp(logits))) - own)
  return np.mean(losses)


@pytest.mark.parametrize(
  "adapter", [pytest.param("qformer", marks=pytest.mark.slow), "mlp"]
)
def test_user_target_loss_matches_a_row_by_row_reference(adapter):
  """In-batch targets only, then with drawn negatives: the same InfoNCE as
  the explicit loop; the duplicate target of another row is no negative,
  the row without a user is left out, and the loss adds to the answer's."""
  batch = _user_target_batch()
  plain = _model(adapter)
  params = _params(plain)
  for negatives in (0, 7):
    model = _model(
      adapter,
      user_target=dict(weight=0.5, temperature=0.2, negatives=negatives),
    )
    key = jax.random.key(3)
    value, rows = jax.jit(model.user_target_contrastive)(
      params, batch, key if negatives else None
    )
    drawn = (
      np.asarray(jax.random.randint(key, (negatives,), 0, NUM_ITEMS))
      if negatives
      else []
    )
    expected = _user_target_reference(model, params, batch, drawn)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert float(rows) == 2
  # In the trainer's loss: answer loss + weight * this term (deterministic).
  answer, _ = jax.jit(plain.loss)(params, batch, None)
  total, metrics = jax.jit(model.loss)(params, batch, None)
  value, _ = model.user_target_contrastive(params, batch, None)
  np.testing.assert_allclose(
    float(total), float(answer) + 0.5 * float(value), rtol=1e-5
  )
  np.testing.assert_allclose(
    float(metrics["user_target_loss"]), float(value), rtol=1e-6
  )
  grads = jax.grad(lambda p: model.user_target_contrastive(p, batch, None)[0])(
    params
  )
  assert float(tree_utils.global_norm(grads["proj"])) > 0


def test_user_target_loss_is_zero_without_a_user_row_and_checks_its_config():
  model = _model("mlp", user_target=dict(weight=1.0))
  params = _params(model)
  batch = _user_target_batch()
  batch["entity_kind"][:] = prompts.ITEM
  value, rows = model.user_target_contrastive(params, batch, None)
  assert float(value) == 0.0 and float(rows) == 0.0
  with pytest.raises(ValueError, match="adapter='prompt'"):
    _model("prompt", user_target=dict(weight=1.0))
  with pytest.raises(ValueError, match="temperature=0.0"):
    _model("mlp", user_target=dict(weight=1.0, temperature=0.0))
  assert _model("mlp").user_target_weight == 0.0  # off unless asked for
