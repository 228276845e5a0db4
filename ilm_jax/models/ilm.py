"""The ILM composite: CF tables -> Q-Former -> projector -> frozen LLM.

Params are one tree with stable top-level names, so freezing and sharding
rules are plain regexes:
  cf       frozen CF tables {"items": [I, d], "users": [U, d]}
  qformer  the Q-Former (from phase 1, or random for ILM-rand)
  proj     the projector into the LLM's embedding space
  prompt   the text-only baseline's learned prompt {"embedding": [T, D]}
  llm      the frozen pretrained LLM
  lora     LoRA factors of the LLM's dense layers, trained with the
           adapter (only with `config.ilm.llm.lora.rank > 0`;
           `llm.init_lora`)
Adapters (config `adapter`): "qformer" (ILM: every query output becomes a
soft token through a linear projector), "mlp" (CoLLM-style MLP from the raw
CF vector to `tokens_per_entity` soft tokens), "prompt" (text-only: titles
as text and `tokens_per_entity` learned prompt tokens at the start of the
request, prompt tuning with no CF input), "none" (the zero-shot LLM).

`soft_token_norm="llm"` rescales every soft token to the mean L2 norm of
the frozen LLM's token embeddings (a departure from the paper, whose
projector output goes in as is: there, phase 2 grew the soft tokens to
five times that norm, docs/results/ilm.md).

`query_centering=K` (adapter "qformer"; 0 = off, the paper) subtracts from
each Q-Former output the mean output, query by query, of K fixed reference
entities of the same kind (evenly spaced ids of the item or user table),
computed by the current Q-Former in the same call, so it follows the
Q-Former as it trains. Why: the Q-Former's outputs share one large
component across all items (9/10 of their norm after phase 1 here), so
each gradient step on the linear projector moves mostly that component and
phase 2 learned one soft token for every item (docs/results/ilm.md). A
departure from the paper, ours.

`qformer_projector="per_query"` (adapter "qformer"; the configs' default)
gives each query its own linear map into the LLM's space where the paper
shares one ("linear"); see models/projector.py. A departure from the paper,
ours. A model config without the field (adapters exported before it
existed) is the paper's "linear".

`config.ilm.llm.lora.rank > 0` lets the LLM adapt through LoRA on the
dense layers `lora.targets` (models/llm.py): a departure from the paper,
whose LLM stays frozen (CoLLM and LLaRA, the MLP-projector baselines'
sources, train LoRA beside their projector). Why: every phase-2 lever
tried kept the target item in the soft tokens' reach while the frozen LLM
did not name it (docs/results/ilm.md, sessions 15-18).

`user_target.weight > 0` (adapters with CF input; 0 = off, the paper) adds
to the answer loss an InfoNCE loss between the `{user}` soft tokens of each
prompt that has a `{user}` row and the soft tokens of that prompt's target
item, against the other prompts' targets and `user_target.negatives`
uniformly drawn items (`user_target_contrastive`). Why: the adapter has to
learn to turn the user row into the next item's title through the frozen
LLM from a few thousand prompts, and did not (docs/results/ilm.md, session
16); this gives it a dense, LLM-free signal in the soft-token space. In the
spirit of phase 1's UI loss (the paper's, there between the user's and a
rated item's Q-Former outputs); this one, in phase 2, is ours.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilm_jax.data import ilm_tasks, prompts
from ilm_jax.models import llm, projector, qformer

ADAPTERS = ("qformer", "mlp", "prompt", "none")
# adapter "qformer": one linear layer for every query (the paper) or one per
# query (ours; models/projector.py).
QFORMER_PROJECTORS = ("linear", "per_query")
# What training changes (and the adapter export holds).
ADAPTER_PARTS = ("qformer", "proj", "prompt", "lora")
SOFT_TOKEN_NORMS = ("", "llm")


@dataclasses.dataclass(frozen=True)
class IlmModel:
  """Functional composite: every method takes the full params tree."""

  adapter: str
  llm: llm.Llama
  qformer: qformer.QFormer | None
  projector: nn.Module | None
  tokens_per_entity: int
  max_target_tokens: int  # answer tokens scored per example (loss, ppl)
  soft_token_norm: str = ""  # "" as projected; "llm": the LLM's token norm
  query_centering: int = 0  # reference entities per kind (0: off)
  # The {user} -> target-item contrastive loss (0: off; see the docstring).
  user_target_weight: float = 0.0
  user_target_temperature: float = 0.1
  user_target_negatives: int = 256

  @property
  def reads_entities(self):
    """Whether the soft tokens depend on which items and user a prompt
    holds: False for the text-only prompt ("prompt") and the zero-shot LLM
    ("none"), whose prompts carry no CF input. Any other adapter counts as
    reading them, so a new one never has its probe pass skipped."""
    return self.adapter not in ("prompt", "none")

  def llm_params(self, params):
    """The LLM's params for `self.llm.apply`: params["llm"], with the
    "lora" group's factors among its layers' when the LLM has LoRA.

    Raises:
      ValueError: the LLM has LoRA and `params` no "lora" group.
    """
    if not self.llm.config.lora_rank:
      return params["llm"]
    if "lora" not in params:
      raise ValueError(
        f"ilm.llm.lora.rank={self.llm.config.lora_rank} but the params have "
        f"no 'lora' group (groups: {sorted(params)}): an adapter trained "
        "without LoRA needs ilm.llm.lora.rank=0."
      )
    return llm.with_lora(params["llm"], params["lora"])

  def soft_tokens(self, params, entity_kind, entity_index, rng=None):
    """Soft tokens of entities: [B, E] -> [B, E, tokens_per_entity, D]."""
    if self.adapter == "prompt":  # one learned prompt, whatever the entity
      prompt = params["prompt"]["embedding"]
      return jnp.broadcast_to(prompt, entity_index.shape + prompt.shape)
    tables = params["cf"]
    items = jnp.take(tables["items"], entity_index, axis=0, mode="clip")
    users = jnp.take(tables["users"], entity_index, axis=0, mode="clip")
    cf = jnp.where((entity_kind == prompts.USER)[..., None], users, items)
    flat = cf.reshape(-1, cf.shape[-1]).astype(jnp.float32)
    if self.adapter == "qformer":
      references = []
      if self.query_centering:
        references = [
          table[reference_ids(table.shape[0], self.query_centering)]
          for table in (tables["items"], tables["users"])
        ]
      queries = self.qformer.apply(
        {"params": params["qformer"]},
        jnp.concatenate([flat, *references]).astype(jnp.float32),
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
        method=qformer.QFormer.encode_queries,
      )
      if self.query_centering:
        is_user = (entity_kind == prompts.USER).reshape(-1)
        item_end = len(flat) + len(references[0])
        mean = jnp.where(
          is_user[:, None, None],
          queries[item_end:].mean(axis=0),
          queries[len(flat) : item_end].mean(axis=0),
        )
        queries = queries[: len(flat)] - mean
      soft = self.projector.apply({"params": params["proj"]}, queries)
    else:
      soft = self.projector.apply({"params": params["proj"]}, flat)
    if self.soft_token_norm == "llm":
      squared = jnp.sum(jnp.square(soft), axis=-1, keepdims=True)
      soft = soft * (
        mean_token_norm(params["llm"]["embedding"])
        * jax.lax.rsqrt(squared + 1e-12)
      )
    return soft.reshape(entity_index.shape + soft.shape[-2:])

  def input_embeddings(self, params, batch, rng=None):
    """LLM input embeddings with soft tokens spliced in: [B, L, D]."""
    embeds = self.llm.apply(
      {"params": params["llm"]}, batch["input_ids"], method=llm.Llama.embed
    )
    if self.adapter == "none":
      return embeds
    soft = self.soft_tokens(
      params, batch["entity_kind"], batch["entity_index"], rng
    )
    rows = jnp.arange(embeds.shape[0])[:, None]
    entity = jnp.maximum(batch["soft_entity"], 0)
    gathered = soft[rows, entity, batch["soft_slot"]].astype(embeds.dtype)
    is_soft = (batch["soft_entity"] >= 0)[..., None]
    return jnp.where(is_soft, gathered, embeds)

  def answer_log_likelihood(self, params, batch, rng=None):
    """Per-token log-likelihood of the answer tokens (teacher forcing).

    Returns:
      (log-probs [B, T] (0 off the mask), mask [B, T], answer tokens that
      did not fit in max_target_tokens [B], greedy-correct [B, T]).
    """
    embeds = self.input_embeddings(params, batch, rng)
    hidden, _ = self.llm.apply(
      {"params": self.llm_params(params)},
      input_embeds=embeds,
      attention_mask=batch["attention_mask"],
      return_hidden=True,
    )
    # Vocabulary logits only where the answer is predicted: the first
    # answer positions of each row, in order (listed by the encoder, whose
    # per-task width sets how many; else the first max_target_tokens).
    if "answer_positions" in batch:
      order = batch["answer_positions"]
    else:
      order = jnp.argsort(~batch["loss_mask"], axis=1, stable=True)[
        :, : self.max_target_tokens
      ]
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    targets = jnp.take_along_axis(batch["targets"], order, axis=1)
    mask = jnp.take_along_axis(batch["loss_mask"], order, axis=1)
    logits = self.llm.apply(
      {"params": params["llm"]}, hidden, method=llm.Llama.logits
    )
    log_probs = -optax.softmax_cross_entropy_with_integer_labels(
      logits, targets
    )
    dropped = batch["loss_mask"].sum(axis=1) - mask.sum(axis=1)
    correct = jnp.argmax(logits, axis=-1) == targets
    return log_probs * mask, mask, dropped, correct & mask

  def loss(self, params, batch, rng):
    """Mean answer-token cross-entropy, for the trainer."""
    log_probs, mask, dropped, correct = self.answer_log_likelihood(
      params, batch, rng
    )
    tokens = jnp.maximum(mask.sum(), 1)
    loss = -log_probs.sum() / tokens
    metrics = dict(
      token_accuracy=correct.sum() / tokens,
      answer_tokens=mask.sum(),
      answer_tokens_dropped=dropped.sum(),
    )
    if self.user_target_weight:
      rng, negatives_rng = (
        (None, None) if rng is None else jax.random.split(rng)
      )
      contrastive, rows = self.user_target_contrastive(
        params, batch, negatives_rng, rng
      )
      loss = loss + self.user_target_weight * contrastive
      metrics["user_target_loss"] = contrastive
      metrics["user_target_rows"] = rows
    if "task" in batch:
      # Per task: the answer tokens' summed negative log-likelihood and
      # their count. Means of both over a log interval divide into the
      # task's loss there (e.g. the target-title loss of `sequential`);
      # a per-task mean here would average in the batches without it.
      rows = batch["task"][:, None] == jnp.arange(len(ilm_tasks.TASKS))
      nll = -(log_probs.sum(axis=1) @ rows)
      count = mask.sum(axis=1).astype(jnp.float32) @ rows
      for i, task in enumerate(ilm_tasks.TASKS):
        metrics[f"answer_nll_sum/{task}"] = nll[i]
        metrics[f"answer_tokens/{task}"] = count[i]
    return loss, metrics

  def unit_soft_tokens(self, params, kind, index, rng=None):
    """One kind's entities' soft tokens, flattened and L2-normalised.

    Args:
      params: the full params tree.
      kind: `prompts.ITEM` or `prompts.USER` (a Python int).
      index: int `[N]` rows of that kind's CF table.
      rng: dropout key for the adapter (None: deterministic).

    Returns:
      f32 `[N, tokens_per_entity * D]`, each row of unit L2 norm: the
      vectors whose dot products are the cosines of the `user_target` loss
      and of `cf_user_signal`'s soft-token ranking.
    """
    tokens = self.soft_tokens(
      params, jnp.full((1, index.shape[0]), kind), index[None], rng
    )[0]
    flat = tokens.reshape(index.shape[0], -1).astype(jnp.float32)
    return flat * jax.lax.rsqrt(
      jnp.sum(jnp.square(flat), axis=-1, keepdims=True) + 1e-12
    )

  def user_target_contrastive(self, params, batch, negatives_rng, rng=None):
    """InfoNCE between `{user}` soft tokens and the target item's (ours).

    For each prompt b with a `{user}` entity and `target_item[b] >= 0`:
    u_b = the user's soft tokens, flattened `[T * D]` and L2-normalised;
    candidates = every prompt's target item, then `user_target_negatives`
    items drawn uniformly with replacement (from `negatives_rng`), their
    soft tokens normalised the same way; logits = u_b . c / temperature;
    the loss is -log softmax at b's own target. A candidate that is the
    same item as b's target, other than b's own column, is left out of b's
    softmax (it is not a negative). Rows without a user are ignored; with
    none the loss is 0.

    Args:
      params: the full params tree.
      batch: a training batch (`entity_kind`, `entity_index`,
        `entity_mask` `[B, E]`, `target_item` `[B]`).
      negatives_rng: key for the drawn negatives (None: none drawn).
      rng: dropout key for the adapter (None: deterministic).

    Returns:
      (mean loss over the rows with a user, f32 scalar; their count, f32).
    """
    is_user = (batch["entity_kind"] == prompts.USER) & batch["entity_mask"]
    rows = jnp.arange(is_user.shape[0])
    user = batch["entity_index"][rows, jnp.argmax(is_user, axis=1)]
    target = batch["target_item"].astype(jnp.int32)
    valid = is_user.any(axis=1) & (target >= 0)
    target = jnp.maximum(target, 0)
    candidates = target
    if negatives_rng is not None and self.user_target_negatives:
      num_items = params["cf"]["items"].shape[0]
      drawn = jax.random.randint(
        negatives_rng, (self.user_target_negatives,), 0, num_items
      )
      candidates = jnp.concatenate([target, drawn])
    user_rng, item_rng = (None, None) if rng is None else jax.random.split(rng)
    users = self.unit_soft_tokens(params, prompts.USER, user, user_rng)
    items = self.unit_soft_tokens(params, prompts.ITEM, candidates, item_rng)
    logits = users @ items.T / self.user_target_temperature  # [B, C]
    columns = jnp.arange(candidates.shape[0])
    duplicate = (candidates[None, :] == target[:, None]) & (
      columns[None, :] != rows[:, None]
    )
    logits = jnp.where(duplicate, -jnp.inf, logits)
    nll = -jax.nn.log_softmax(logits, axis=-1)[rows, rows]
    count = valid.sum().astype(jnp.float32)
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1.0), count


def reference_ids(num_rows: int, count: int) -> np.ndarray:
  """`count` evenly spaced ids of range(num_rows) (all rows when fewer)."""
  if count >= num_rows:
    return np.arange(num_rows)
  return np.linspace(0, num_rows - 1, count).round().astype(np.int32)


def mean_token_norm(embedding: jax.Array) -> jax.Array:
  """Mean L2 norm of the rows of a [V, D] token-embedding table (f32)."""
  rows = embedding.astype(jnp.float32)
  return jax.lax.stop_gradient(jnp.mean(jnp.linalg.norm(rows, axis=-1)))


def build(
  model_config, llm_config: llm.LlamaConfig, qformer_config=None
) -> IlmModel:
  """The composite for `config.ilm.model`.

  Args:
    model_config: adapter, tokens_per_entity, max_target_tokens,
      mlp_hidden_dim, soft_token_norm, query_centering, qformer_projector,
      user_target ({weight, temperature, negatives}).
    llm_config: the frozen LLM's architecture (from its checkpoint).
    qformer_config: the Q-Former config (adapter "qformer" only).

  Raises:
    ValueError: an unknown adapter, projector or norm, a negative
      query_centering, tokens_per_entity != num_queries for the Q-Former,
      or a user_target loss with no CF adapter or a bad weight or
      temperature.
  """
  adapter = model_config.adapter
  if adapter not in ADAPTERS:
    raise ValueError(
      f"ilm.model.adapter={adapter!r}; expected one of {ADAPTERS}."
    )
  # Exports written before the field existed read as "" (as projected).
  soft_token_norm = model_config.get("soft_token_norm", "")
  query_centering = model_config.get("query_centering", 0)
  qformer_projector = model_config.get("qformer_projector", "linear")
  if qformer_projector not in QFORMER_PROJECTORS:
    raise ValueError(
      f"ilm.model.qformer_projector={qformer_projector!r}; expected one of "
      f"{QFORMER_PROJECTORS}."
    )
  if query_centering < 0:
    raise ValueError(
      f"ilm.model.query_centering={query_centering}; expected 0 (off) or a "
      "positive number of reference entities per kind."
    )
  if soft_token_norm not in SOFT_TOKEN_NORMS:
    raise ValueError(
      f"ilm.model.soft_token_norm={soft_token_norm!r}; expected one of "
      f"{SOFT_TOKEN_NORMS}."
    )
  qformer_module, proj = None, None
  if adapter == "qformer":
    if model_config.tokens_per_entity != qformer_config.num_queries:
      raise ValueError(
        f"ilm.model.tokens_per_entity={model_config.tokens_per_entity} must "
        f"equal qformer.model.num_queries={qformer_config.num_queries}: "
        "every query output becomes one soft token."
      )
    qformer_module = qformer.make_model(qformer_config)
    if qformer_projector == "per_query":
      proj = projector.PerQueryProjector(
        llm_config.hidden_size, qformer_config.num_queries
      )
    else:
      proj = projector.LinearProjector(llm_config.hidden_size)
  elif adapter == "mlp":
    proj = projector.MlpProjector(
      llm_config.hidden_size,
      model_config.tokens_per_entity,
      model_config.mlp_hidden_dim,
    )
  user_target = model_config.get("user_target", {})
  weight = float(user_target.get("weight", 0.0))
  if weight and adapter not in ("qformer", "mlp"):
    raise ValueError(
      f"ilm.model.user_target.weight={weight}: the user-target loss needs "
      f"soft tokens from the CF tables (adapter 'qformer' or 'mlp'), not "
      f"adapter={adapter!r}."
    )
  temperature = float(user_target.get("temperature", 0.1))
  if weight < 0 or temperature <= 0:
    raise ValueError(
      f"ilm.model.user_target: weight={weight} must be >= 0 and "
      f"temperature={temperature} > 0."
    )
  return IlmModel(
    adapter=adapter,
    llm=llm.Llama(llm_config),
    qformer=qformer_module,
    projector=proj,
    tokens_per_entity=model_config.tokens_per_entity,
    max_target_tokens=model_config.max_target_tokens,
    soft_token_norm=soft_token_norm,
    query_centering=query_centering,
    user_target_weight=weight,
    user_target_temperature=temperature,
    user_target_negatives=int(user_target.get("negatives", 256)),
  )


def init_adapter(model: IlmModel, rng, cf_dim: int, qformer_hidden: int):
  """Fresh projector params (the Q-Former comes from phase 1 or its init).

  The "prompt" adapter's tokens start as small random vectors (Lester et
  al., 2021, found sampled-vocabulary init only slightly better).
  """
  if model.adapter == "prompt":
    shape = (model.tokens_per_entity, model.llm.config.hidden_size)
    return dict(embedding=0.02 * jax.random.normal(rng, shape, jnp.float32))
  if model.adapter == "qformer":
    num_queries = model.tokens_per_entity  # tied to the Q-Former's queries
    x = jnp.zeros((1, num_queries, qformer_hidden), jnp.float32)
  elif model.adapter == "mlp":
    x = jnp.zeros((1, cf_dim), jnp.float32)
  else:
    return {}
  return jax.jit(model.projector.init)(rng, x)["params"]
