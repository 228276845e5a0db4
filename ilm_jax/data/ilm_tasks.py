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

import dataclasses
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from ilm_jax.data import processing, prompts

TASKS = ("sequential", "straightforward", "description", "conversation")
_GROUP_STREAM = 1  # keeps the per-batch task draws apart from the examples
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

  def task_of_group(self, group: int) -> str:
    """The task of every example in batch `group` (one-task batches)."""
    rng = np.random.default_rng([self.seed, _GROUP_STREAM, group])
    return self.tasks[rng.choice(len(self.tasks), p=self.task_probs)]

  def training_request(
    self, index: int, group: int | None = None, task: str | None = None
  ) -> prompts.Request:
    """The request of training example `index` (deterministic).

    Args:
      index: the example number.
      group: if given, the task is `task_of_group(group)` (all examples of
        a batch share it, so the batch takes that task's length); else each
        example draws its own task.
      task: force this task (e.g. to sample one task's prompt lengths).
    """
    rng = np.random.default_rng([self.seed, index])
    drawn = self.tasks[rng.choice(len(self.tasks), p=self.task_probs)]
    if task is None:
      task = drawn if group is None else self.task_of_group(group)
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


def task_lengths(
  sampler: TaskSampler,
  encoder: prompts.PromptEncoder,
  *,
  max_len: int,
  max_answer_tokens: int,
  samples: int = 512,
  multiple: int = 8,
) -> tuple[dict[str, int], dict[str, int]]:
  """Per-task encoded length and answer width, from a sample of prompts.

  Each task's length is the longest prompt + scored answer (at most
  `max_answer_tokens` answer tokens) among `samples` seeded training
  requests of that task, rounded up to `multiple`, at most `max_len`; its
  answer width likewise.
  Rarer, longer examples are cut as usual (oldest history items first,
  then answer tokens) and counted in the encoder's stats.

  Args:
    sampler: the run's task sampler.
    encoder: an encoder whose `max_len` is the int cap (its stats are left
      as they were).
    max_len: the cap on the encoded length.
    max_answer_tokens: the cap on the answer width.
    samples: requests drawn per task.
    multiple: lengths are rounded up to a multiple of this (fewer shapes).

  Returns:
    ({task: length}, {task: answer width}) for every task with templates.
  """
  stats = dataclasses.replace(encoder.stats)
  lengths, answers = {}, {}
  # Every task with templates: evaluators may use a task training skips.
  for task in [t for t in TASKS if t in sampler.templates]:
    longest, answer = 1, 1
    for index in range(samples):
      example = encoder.encode(sampler.training_request(index, task=task))
      answer_length = int(example["loss_mask"].sum())
      # Answer tokens past the scored ones need no room.
      scored = min(answer_length, max_answer_tokens)
      prompt_length = int(example["attention_mask"].sum()) - answer_length
      longest = max(longest, prompt_length + scored)
      answer = max(answer, scored)
    lengths[task] = min(max_len, -(-longest // multiple) * multiple)
    answers[task] = min(max_answer_tokens, -(-answer // multiple) * multiple)
  encoder.stats = stats
  return lengths, answers


class TrainingPrompts(grain.MapDataset):
  """Encoded training examples: element k = encode(training_request(k)).

  With `group_size` (the global batch size), examples k of one group
  k // group_size share one task, so an unshuffled iterator (the examples
  are independent draws already) yields one-task batches whose arrays take
  that task's encoded length. Batches then vary in shape by task (one
  compiled step per task) instead of all padding to the longest task.
  """

  def __init__(
    self,
    sampler: TaskSampler,
    encoder: prompts.PromptEncoder,
    length: int,
    group_size: int = 0,
  ):
    super().__init__()
    self._sampler, self._encoder, self._length = sampler, encoder, length
    self._group_size = group_size

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"TrainingPrompts(length={self._length})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    index %= self._length
    group = index // self._group_size if self._group_size else None
    request = self._sampler.training_request(index, group)
    example = self._encoder.encode(request)
    example["task"] = np.int32(TASKS.index(request.task))
    return example
