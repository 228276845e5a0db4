"""Phase-2 multi-task examples drawn from a processed dataset.

Four tasks (templates in templates/prompts.json):
  sequential       {user} + {history} -> the next item's title
  straightforward  {user} -> an item the user liked
  description      {item} -> the item's text (title, year, genres, people)
  conversation     {liked} items -> a title + a reason from shared metadata
Training example k is a pure function of (seed, k), so a grain MapDataset
over indices is deterministic, shardable and resumable. Training uses only
the train part of each sequence (items[:-2]); evaluation targets follow the
OpenP5 split (valid: items[-2], test: items[-1]).
"""

from collections.abc import Mapping, Sequence

import grain
import numpy as np

from ilm_jax.data import processing, prompts

TASKS = ("sequential", "straightforward", "description", "conversation")
RECOMMENDATION_TASKS = ("sequential", "straightforward")


def _genres(dataset, item) -> list[str]:
  value = dataset.item_attributes.get("genres", [""] * dataset.num_items)[item]
  return [g.strip() for g in value.split(",") if g.strip()]


def reason(
  dataset: processing.ProcessedDataset, target: int, liked: Sequence[int]
) -> str:
  """A one-line reason grounded in metadata the target shares with `liked`."""
  director = dataset.item_attributes.get("director")
  for item in liked:
    if director and director[target] and director[target] == director[item]:
      return (
        f"It is directed by {director[target]}, like "
        f"{dataset.item_titles[item]}."
      )
  target_genres = _genres(dataset, target)
  for item in liked:
    shared = [g for g in target_genres if g in _genres(dataset, item)]
    if shared:
      return (
        f"It is a {' and '.join(shared[:2]).lower()} movie, like "
        f"{dataset.item_titles[item]}."
      )
  return "Viewers who liked the same movies also watched it."


class TaskSampler:
  """Draws `prompts.Request`s for training and builds evaluation requests."""

  def __init__(
    self,
    dataset: processing.ProcessedDataset,
    templates: Mapping[str, prompts.TaskTemplates],
    *,
    task_weights: Mapping[str, float],
    max_history: int,
    max_liked: int = 3,
    seed: int = 0,
  ):
    unknown = set(task_weights) - set(TASKS)
    if unknown:
      raise ValueError(
        f"task_weights names unknown tasks {sorted(unknown)}; known: {TASKS}."
      )
    self.dataset = dataset
    self.templates = templates
    self.tasks = [t for t in TASKS if task_weights.get(t, 0) > 0]
    weights = np.array([task_weights[t] for t in self.tasks], np.float64)
    self.task_probs = weights / weights.sum()
    self.max_history = max_history
    self.max_liked = max_liked
    self.seed = seed
    lengths = np.array(
      [len(dataset.train_sequence(u)) for u in range(dataset.num_users)]
    )
    # Users with at least two training items can give a (history, next).
    self._sequential_users = np.flatnonzero(lengths >= 2)
    self._positives = self._positive_lists()

  def _positive_lists(self) -> list[np.ndarray]:
    pairs = self.dataset.user_item_pairs
    order = np.argsort(pairs[:, 0], kind="stable")
    users, items = pairs[order, 0], pairs[order, 1]
    bounds = np.searchsorted(users, np.arange(self.dataset.num_users + 1))
    return [
      items[bounds[u] : bounds[u + 1]] for u in range(self.dataset.num_users)
    ]

  def training_request(self, index: int) -> prompts.Request:
    """The request of training example `index` (deterministic)."""
    rng = np.random.default_rng([self.seed, index])
    task = self.tasks[rng.choice(len(self.tasks), p=self.task_probs)]
    template = self.templates[task].seen[
      rng.integers(len(self.templates[task].seen))
    ]
    ds = self.dataset
    if task == "description":
      item = int(rng.integers(ds.num_items))
      return prompts.Request(
        task,
        template,
        item=item,
        target_text=ds.item_texts[item],
        target_item=item,
      )
    user = int(rng.choice(self._sequential_users))
    sequence = ds.train_sequence(user)
    cut = int(rng.integers(1, len(sequence)))
    history = tuple(
      int(i) for i in sequence[max(0, cut - self.max_history) : cut]
    )
    target = int(sequence[cut])
    if task == "straightforward":
      positives = self._positives[user]
      if len(positives):
        target = int(positives[rng.integers(len(positives))])
      return prompts.Request(
        task,
        template,
        user=user,
        target_text=ds.item_titles[target],
        target_item=target,
      )
    if task == "sequential":
      return prompts.Request(
        task,
        template,
        user=user,
        history=history,
        target_text=ds.item_titles[target],
        target_item=target,
      )
    count = min(len(history), int(rng.integers(1, self.max_liked + 1)))
    liked = tuple(int(i) for i in rng.choice(history, count, replace=False))
    text = f"{ds.item_titles[target]}. {reason(ds, target, liked)}"
    return prompts.Request(
      task, template, liked=liked, target_text=text, target_item=target
    )

  def evaluation_request(
    self,
    task: str,
    user_or_item: int,
    split: str,
    unseen: bool,
    template_index: int = 0,
  ) -> prompts.Request:
    """The OpenP5-style evaluation prompt for one user (or item).

    Args:
      task: a task name.
      user_or_item: the user (recommendation tasks) or item (description).
      split: "valid" (target items[-2]) or "test" (target items[-1]).
      unseen: use the held-out template instead of a seen one.
      template_index: which seen template (ignored when unseen).
    """
    choices = self.templates[task]
    template = (
      choices.unseen[0]
      if unseen
      else choices.seen[template_index % len(choices.seen)]
    )
    ds = self.dataset
    if task == "description":
      item = user_or_item
      return prompts.Request(
        task,
        template,
        item=item,
        target_text=ds.item_texts[item],
        target_item=item,
      )
    user = user_or_item
    sequence = ds.sequence(user)
    end = len(sequence) - (2 if split == "valid" else 1)
    history = tuple(
      int(i) for i in sequence[max(0, end - self.max_history) : end]
    )
    target = int(sequence[end])
    if task == "conversation":
      liked = history[-self.max_liked :]
      return prompts.Request(
        task,
        template,
        liked=liked,
        target_item=target,
        target_text=f"{ds.item_titles[target]}. {reason(ds, target, liked)}",
      )
    return prompts.Request(
      task,
      template,
      user=user,
      history=history if task == "sequential" else (),
      target_text=ds.item_titles[target],
      target_item=target,
    )


class TrainingPrompts(grain.MapDataset):
  """Encoded training examples: element k = encode(training_request(k))."""

  def __init__(
    self, sampler: TaskSampler, encoder: prompts.PromptEncoder, length: int
  ):
    super().__init__()
    self._sampler, self._encoder, self._length = sampler, encoder, length

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"TrainingPrompts(length={self._length})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    request = self._sampler.training_request(index % self._length)
    example = self._encoder.encode(request)
    example["task"] = np.int32(TASKS.index(request.task))
    return example
