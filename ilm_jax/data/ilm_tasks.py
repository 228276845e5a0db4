"""Phase-2 multi-task examples drawn from a processed dataset.

Five tasks (templates in templates/prompts.json):
  sequential       {user} + {history} -> the next item's title
  straightforward  {user} -> an item the user liked
  description      {item} -> the item's text (title, year, genres, people)
  conversation     {liked} items -> a title + a reason from shared metadata
  title            {item} -> the item's title alone (ours, off by default:
                   the grounding part of description, a short answer)
Training example k is a pure function of (seed, k), so the grain iterator
over example numbers (`training_prompts`, data/pipeline.py) is
deterministic, shardable and resumable. Training uses only the training part
of each sequence (items[:-2]); evaluation requests follow
`ProcessedDataset.leave_one_out` (valid: items[-2], test: items[-1]).

What `{user}` shows (`ilm.data.user_state`):
  user      the user's CF row, the same in every prompt (the paper's): MF's
            user vector, or SASRec's state after the training part.
  sequence  SASRec's sequence state before the prompt's target (ours, as
            CoLLM and LLaRA feed a sequential recommender's state): in
            training the state after the history before the target; in
            evaluation the state after the split's history (items[:-2]
            for valid, items[:-1] for test). The `user` row is fixed at
            items[:-2], so in training it points at no particular target
            and at test time it misses the valid item.
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

from ilm_jax.data import pipeline, processing, prompts

TASKS = (
  "sequential",
  "straightforward",
  "description",
  "conversation",
  "title",
)
# Tasks whose request holds one item (no user): {item} -> its text.
ITEM_TASKS = ("description", "title")
# What a prompt's {user} row is (see the module docstring).
USER_STATES = ("user", "sequence")
_GROUP_STREAM = 1  # keeps the per-batch task draws apart from the examples


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
    user_state: str = "user",
  ):
    if user_state not in USER_STATES:
      raise ValueError(
        f"ilm.data.user_state={user_state!r}; allowed: {USER_STATES}."
      )
    unknown = set(task_weights) - set(TASKS)
    if unknown:
      raise ValueError(
        f"task_weights names unknown tasks {sorted(unknown)}; known: {TASKS}."
      )
    self.dataset = dataset
    self.templates = templates
    self.tasks = [t for t in TASKS if task_weights.get(t, 0) > 0]
    missing = [t for t in self.tasks if t not in templates]
    if missing:
      raise ValueError(
        f"task_weights gives {missing} a positive weight but the templates "
        f"have no such task (tasks with templates: {sorted(templates)}); "
        "add its templates or set its weight to 0."
      )
    weights = np.array([task_weights[t] for t in self.tasks], np.float64)
    self.task_probs = weights / weights.sum()
    self.max_history = max_history
    self.max_liked = max_liked
    self.seed = seed
    self.user_state = user_state
    # The valid split's histories are the training parts (items[:-2]).
    self._splits = {s: dataset.leave_one_out(s) for s in ("valid", "test")}
    train = self._splits["valid"]
    # Users with at least two training items can give a (history, next).
    self._sequential_users = np.flatnonzero(train.ends - train.starts >= 2)
    self._positives = self._positive_lists()

  def _positive_lists(self) -> list[np.ndarray]:
    pairs = self.dataset.user_item_pairs
    order = np.argsort(pairs[:, 0], kind="stable")
    users, items = pairs[order, 0], pairs[order, 1]
    bounds = np.searchsorted(users, np.arange(self.dataset.num_users + 1))
    return [
      items[bounds[u] : bounds[u + 1]] for u in range(self.dataset.num_users)
    ]

  def _item_request(self, task: str, template: str, item: int):
    """An item task's request: the item's full text, or its title alone."""
    ds = self.dataset
    text = (
      ds.item_texts[item] if task == "description" else ds.item_titles[item]
    )
    return prompts.Request(
      task, template, item=item, target_text=text, target_item=item
    )

  def user_row(self, user: int, target_position: int) -> int:
    """The user-table row of `{user}` in a prompt whose target is the
    interaction at `target_position` (of the dataset's `sequence_items`).

    "user": the user's own row (-1: `Request.user` itself). "sequence":
    row `num_users + target_position`, the sequence state before the
    target (the phase appends `sequence_states` to the user table).
    """
    if self.user_state == "user":
      return -1
    return self.dataset.num_users + int(target_position)

  def split_user_rows(self, split: str, users: np.ndarray) -> np.ndarray:
    """int64 [N]: the user-table row `{user}` shows in `users`' prompts of
    `split` ("valid" or "test"), as `evaluation_request` builds them."""
    ends = self._splits[split].ends
    return np.array(
      [
        row if (row := self.user_row(u, ends[u])) >= 0 else u
        for u in np.asarray(users, np.int64)
      ],
      np.int64,
    )

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
    if task in ITEM_TASKS:
      return self._item_request(task, template, int(rng.integers(ds.num_items)))
    user = int(rng.choice(self._sequential_users))
    sequence = self._splits["valid"].history(user)
    cut = int(rng.integers(1, len(sequence)))
    history = tuple(
      int(i) for i in sequence[max(0, cut - self.max_history) : cut]
    )
    target = int(sequence[cut])
    row = self.user_row(user, self._splits["valid"].starts[user] + cut)
    if task == "straightforward":
      positives = self._positives[user]
      # A sequence state points at the next item, so with it the task asks
      # for that item; the user's own row asks for any training positive.
      if len(positives) and self.user_state == "user":
        target = int(positives[rng.integers(len(positives))])
      return prompts.Request(
        task,
        template,
        user=user,
        target_text=ds.item_titles[target],
        target_item=target,
        user_row=row,
      )
    if task == "sequential":
      return prompts.Request(
        task,
        template,
        user=user,
        history=history,
        target_text=ds.item_titles[target],
        target_item=target,
        user_row=row,
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
      user_or_item: the user (recommendation tasks) or item (ITEM_TASKS).
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
    if task in ITEM_TASKS:
      return self._item_request(task, template, user_or_item)
    user = user_or_item
    examples = self._splits[split]  # one example per user
    full = examples.history(user)
    history = tuple(
      int(i) for i in full[max(0, len(full) - self.max_history) :]
    )
    target = int(examples.targets[user])
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
      user_row=self.user_row(user, examples.ends[user]),
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


def training_prompts(
  sampler: TaskSampler,
  encoder: prompts.PromptEncoder,
  length: int,
  group_size: int = 0,
) -> pipeline.Examples:
  """Encoded training examples: example k = encode(training_request(k)).

  With `group_size` (the global batch size), examples k of one group
  k // group_size share one task, so an unshuffled iterator (the examples
  are independent draws already) yields one-task batches whose arrays take
  that task's encoded length. Batches then vary in shape by task (one
  compiled step per task) instead of all padding to the longest task.

  Args:
    sampler: the run's task sampler.
    encoder: the run's prompt encoder.
    length: examples per epoch.
    group_size: the global batch size for one-task batches; 0: every
      example draws its own task.

  Returns:
    Examples of the encoder's arrays plus "task" (int32, index in TASKS).
  """

  def element(index: int) -> dict:
    group = index // group_size if group_size else None
    request = sampler.training_request(index, group)
    example = encoder.encode(request)
    example["task"] = np.int32(TASKS.index(request.task))
    return example

  return pipeline.stacked(length, element, "ilm/training_prompts")


def build_prompting(
  config, dataset: processing.ProcessedDataset, tokenizer
) -> tuple["TaskSampler", prompts.PromptEncoder]:
  """The phase-2 task sampler and prompt encoder of an experiment config.

  Reads `config.seed`, `config.ilm.data` (templates, task weights, history
  and length caps, system prompt, one-task batches) and the prompt-shaping
  fields of `config.ilm.model`. With one-task batches the encoder's lengths
  become per-task (`task_lengths`).

  Args:
    config: the experiment config (a phase-2 run's, or an export's).
    dataset: the processed dataset.
    tokenizer: the LLM's tokenizer.

  Returns:
    (TaskSampler, PromptEncoder).
  """
  data_config = config.ilm.data
  templates = prompts.load_templates(data_config.templates or None)
  sampler = TaskSampler(
    dataset,
    templates,
    task_weights=data_config.task_weights.to_dict(),
    max_history=data_config.max_history,
    seed=config.seed,
    user_state=data_config.get("user_state", "user"),
  )
  user_rows = dataset.num_users
  if sampler.user_state == "sequence":  # the phase appends the states
    user_rows += dataset.num_interactions
  encoder = prompts.PromptEncoder(
    tokenizer,
    dataset.item_titles,
    tokens_per_entity=config.ilm.model.tokens_per_entity,
    max_len=data_config.max_len,
    max_answer_tokens=config.ilm.model.max_target_tokens,
    max_entities=1 + max(data_config.max_history, 3),
    soft_tokens=config.ilm.model.adapter in ("qformer", "mlp"),
    titles_with_soft=data_config.titles_with_soft,
    system_prompt=data_config.system_prompt,
    learned_prompt=config.ilm.model.adapter == "prompt",
    num_users=user_rows,
  )
  if data_config.one_task_batches:
    lengths, answers = task_lengths(
      sampler,
      encoder,
      max_len=data_config.max_len,
      max_answer_tokens=config.ilm.model.max_target_tokens,
    )
    logging.info(
      "One-task batches; tokens per task (prompt + answer, scored answer): %s.",
      ", ".join(f"{t} {lengths[t]}/{answers[t]}" for t in lengths),
    )
    encoder.max_len, encoder.max_answer_tokens = lengths, answers
  return sampler, encoder
