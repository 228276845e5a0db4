"""`soft_token_stats`: what the adapter hands the LLM, in numbers.

For a fixed, seeded sample of items and of users (`num_entities` each; 0 =
all), the soft tokens `[N, T, D]` of each entity and, per kind
(`soft_tokens/items/...`, `soft_tokens/users/...`):

  entity_share     median over entities of |x - mean| / |x|, where the mean
                   is over the sampled entities at the same slot; averaged
                   over slots. 0: every entity gets the same token (no
                   identity can pass); near 1 (a little above, for
                   tokens shorter than their offset from the mean):
                   the tokens are all content.
  entity_cosine    mean cosine between different entities' tokens at the
                   same slot (1: the tokens have collapsed onto one vector).
  slot_cosine      mean cosine between one entity's different slots (1: the
                   T tokens repeat one vector; absent when T = 1).
  norm             median L2 norm of a soft token.
  norm_over_llm    that norm over the mean L2 norm of the frozen LLM's token
                   embeddings (`soft_tokens/llm_token_norm`).

The Q-Former adapter's tokens collapsed in phase 2 (entity share 0.09, cosine
0.99, norm 8x the LLM's; docs/results/ilm.md) while the MLP projector's did
not (0.81, 0.08, 1.3x); this evaluator writes those figures for every run.
A diagnostic of our own, not one of the paper's metrics. The zero-shot
adapter ("none") has no soft tokens and yields nothing.
"""

import jax
import numpy as np

from ilm_jax.data import prompts
from ilm_jax.evaluators import registry
from ilm_jax.models import ilm

KINDS = (("items", prompts.ITEM), ("users", prompts.USER))


def token_statistics(tokens: np.ndarray) -> dict[str, float]:
  """The statistics above for one kind's soft tokens.

  Args:
    tokens: float `[N, T, D]`, N >= 2 entities' T soft tokens.

  Returns:
    entity_share, entity_cosine, norm, and slot_cosine when T > 1.

  Raises:
    ValueError: for another rank or fewer than two entities.
  """
  tokens = np.asarray(tokens, np.float64)
  if tokens.ndim != 3 or tokens.shape[0] < 2:
    raise ValueError(
      f"soft tokens of shape {tokens.shape}; expected [entities >= 2, "
      "tokens, dim]."
    )
  norms = np.linalg.norm(tokens, axis=-1)  # [N, T]
  safe = np.maximum(norms, 1e-12)
  deviation = np.linalg.norm(tokens - tokens.mean(axis=0), axis=-1)
  share = np.median(deviation / safe, axis=0).mean()
  unit = tokens / safe[..., None]
  n, t = norms.shape
  # Per slot: the sum over all entity pairs minus the diagonal, averaged.
  by_slot = np.einsum("atd,btd->t", unit, unit) - (unit * unit).sum((0, 2))
  entity_cosine = by_slot.sum() / (t * n * (n - 1))
  stats = dict(
    entity_share=float(share),
    entity_cosine=float(entity_cosine),
    norm=float(np.median(norms)),
  )
  if t > 1:
    by_entity = np.einsum("atd,asd->a", unit, unit) - (unit * unit).sum((1, 2))
    stats["slot_cosine"] = float(by_entity.sum() / (n * t * (t - 1)))
  return stats


@registry.register("soft_token_stats")
class SoftTokenStatsEvaluator:
  """Entity share, cosines and norms of the soft tokens of sampled entities."""

  def __init__(self, name, config, *, model, dataset, seed=0, **unused):
    del unused
    self.name, self.config, self.split = name, config, config["split"]
    self.model, self.seed = model, seed
    count = config.get("num_entities", 256)
    rng = np.random.default_rng(seed)
    self.entities = {
      kind: _sample(rng, total, count)
      for kind, total in (
        ("items", dataset.num_items),
        ("users", dataset.num_users),
      )
    }
    self._soft_tokens = jax.jit(model.soft_tokens)

  def run(self, params):
    if self.model.adapter == "none":
      return
    llm_norm = float(ilm.mean_token_norm(params["llm"]["embedding"]))
    yield "soft_tokens/llm_token_norm", llm_norm
    for kind, code in KINDS:
      index = self.entities[kind][None].astype(np.int32)
      tokens = self._soft_tokens(params, np.full_like(index, code), index)[0]
      stats = token_statistics(np.asarray(tokens, np.float32))
      stats["norm_over_llm"] = stats["norm"] / llm_norm
      for metric, value in stats.items():
        yield f"soft_tokens/{kind}/{metric}", value


def _sample(rng, total: int, count: int) -> np.ndarray:
  """`count` distinct ids of range(total) (0 or more than total: all)."""
  if count == 0 or count >= total:
    return np.arange(total)
  return np.sort(rng.choice(total, count, replace=False))
