"""Phase-1 evaluators: retrieval with Q-Former features, and ITG loss.

`item_text_retrieval`: every item's query features against every item's
text [CLS] feature (similarity = max over queries, as ITC); recall@1/5/10
of the true text for each item (i2t) and of the true item for each text
(t2i), over all items.

`cooccurrence_retrieval`: for held-out consecutive pairs (valid: the last
train item -> items[-2]; test: items[-2] -> items[-1]) rank all other items
by the similarity of their query sets (as the II loss) -> recall@10.

`itg_loss`: the item-grounded text generation loss on a fixed item subset,
without dropout.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ilm_jax import losses, progress
from ilm_jax.data import pipeline
from ilm_jax.evaluators import registry
from ilm_jax.models import qformer


def _rank_of_diagonal(similarity: np.ndarray) -> np.ndarray:
  """Rank (0 = best) of entry [i, i] in each row; ties count against it."""
  diagonal = np.diagonal(similarity)[:, None]
  return (similarity >= diagonal).sum(axis=1) - 1


def recall_at(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  return {f"recall@{k}": float((ranks < k).mean()) for k in ks}


class _FeatureCache:
  """The last params' features, shared by the evaluators of one eval round.

  The item-text retrieval and co-occurrence evaluators (valid and test)
  all encode every item with the same params; encoding 3,416 ML-1M items
  takes ~40 s on 2 cores. Arrays in the key match by identity (the cache
  holds them, and JAX/our inputs are never mutated), other values by ==.
  """

  def __init__(self):
    self._objects, self._value = (), None

  def get(self, objects, compute):
    same = len(objects) == len(self._objects) and all(
      a is b if isinstance(a, jax.Array | np.ndarray) else a == b
      for a, b in zip(objects, self._objects, strict=True)
    )
    if not same:
      self._objects, self._value = (), None  # free the old arrays first
      self._value = compute()
      self._objects = tuple(objects)
    return self._value


_FEATURES = _FeatureCache()


class _QFormerEvaluator:
  def __init__(
    self,
    name,
    config,
    *,
    dataset,
    model_config,
    item_table,
    text_ids,
    text_mask,
    seed=0,
    **unused,
  ):
    del unused
    self.name, self.config, self.split = name, config, config["split"]
    self.dataset, self.item_table = dataset, item_table
    self.text_ids, self.text_mask, self.seed = text_ids, text_mask, seed
    self.model_config = ml_collections.FrozenConfigDict(model_config)
    self.batch_size = config.get("batch_size", 256)

  @functools.cached_property
  def _features(self):
    model = qformer.make_model(self.model_config)

    def features(params, cf, ids, mask):
      def apply(method, *args):
        return model.apply({"params": params}, *args, method=method)

      items = apply(lambda m, c: m.item_features(m.encode_queries(c)), cf)
      texts = apply(
        lambda m, i, k: m.text_features(m.encode_text(i, k)), ids, mask
      )
      return items, texts

    return jax.jit(features)

  def all_features(self, params):
    """(item query features [N, Q, E], text features [N, E]) for all items."""
    inputs = (self.item_table, self.text_ids, self.text_mask, self.batch_size)
    return _FEATURES.get(
      (*jax.tree.leaves(params), *inputs, self.model_config),
      lambda: self._all_features(params),
    )

  def _all_features(self, params):
    n = len(self.item_table)
    items = pipeline.Examples(
      n,
      lambda rows: dict(
        cf=self.item_table[rows],
        ids=self.text_ids[rows],
        text_mask=self.text_mask[rows],
      ),
      f"{self.dataset.name}/items",
    )
    item_features, text_features = [], []
    bar = progress.Progress(f"{self.name}: encoding items", total=n)
    for batch in pipeline.eval_batches(items, self.batch_size):
      i, t = self._features(
        params, batch["cf"], batch["ids"], batch["text_mask"]
      )
      real = batch["mask"]
      item_features.append(np.asarray(i)[real])
      text_features.append(np.asarray(t)[real])
      bar.update(int(real.sum()))
    bar.done()
    return np.concatenate(item_features), np.concatenate(text_features)


@registry.register("item_text_retrieval")
class ItemTextRetrieval(_QFormerEvaluator):
  def run(self, params):
    item_features, text_features = self.all_features(params)
    similarity = np.asarray(
      losses.item_text_similarity(
        jnp.asarray(item_features), jnp.asarray(text_features)
      )
    )
    for direction, matrix in (("i2t", similarity), ("t2i", similarity.T)):
      for metric, value in recall_at(_rank_of_diagonal(matrix)).items():
        yield f"{direction}/{metric}", value
    yield "items", len(item_features)


@registry.register("cooccurrence_retrieval")
class CooccurrenceRetrieval(_QFormerEvaluator):
  def run(self, params):
    item_features, _ = self.all_features(params)
    # The last history item of each user's split example -> its target.
    examples = self.dataset.leave_one_out(self.split)
    users = np.flatnonzero(examples.ends > examples.starts)
    anchors = examples.items[examples.ends[users] - 1]
    targets = examples.targets[users]
    similarity = np.array(
      losses.pooled_similarity(
        jnp.asarray(item_features[anchors]), jnp.asarray(item_features)
      )
    )
    similarity[np.arange(len(users)), anchors] = -np.inf  # not itself
    target_scores = similarity[np.arange(len(users)), targets][:, None]
    ranks = (similarity >= target_scores).sum(axis=1) - 1
    yield "ii/recall@10", float((ranks < 10).mean())
    yield "ii/pairs", len(users)


@registry.register("itg_loss")
class TextGenerationLoss(_QFormerEvaluator):
  @functools.cached_property
  def _loss(self):
    """The jitted ITG loss, compiled once per evaluator (not per run)."""
    config = ml_collections.ConfigDict(self.model_config.to_dict())
    config.losses = dict(itc=0.0, itm=0.0, itg=1.0, ii=0.0, ui=0.0)
    return jax.jit(
      lambda p, batch: qformer.phase1_losses(
        p, batch, jax.random.key(0), config, deterministic=True
      )[0]
    )

  def run(self, params):
    count = min(self.config.get("num_items", 512), len(self.item_table))
    items = np.sort(
      np.random.default_rng(self.seed).choice(
        len(self.item_table), count, replace=False
      )
    )
    loss = self._loss
    total = 0.0
    bar = progress.Progress(f"{self.name}: ITG loss items", total=count)
    for start in range(0, count, self.batch_size):
      rows = items[start : start + self.batch_size]
      batch = dict(
        item_cf=self.item_table[rows],
        text_ids=self.text_ids[rows],
        text_mask=self.text_mask[rows],
      )
      total += float(loss(params, batch)) * len(rows)
      bar.update(len(rows))
    bar.done()
    yield "itg/loss", total / count
