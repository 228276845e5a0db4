"""Phase-2 prompts: templates with soft-token placeholders -> token arrays.

A template such as "{user} has watched {history}. What next?" is rendered
through the LLM's chat template; each placeholder becomes the soft tokens of
its entities (a user, one item, or a list of items), optionally preceded by
the item's title. The model later replaces the embedding at every soft
position with the projected Q-Former output of that entity (slot k of its
`tokens_per_entity` outputs). In text-only mode placeholders become plain
text (titles; "the user").

Layout of one encoded example (length L, up to E entities):
  input_ids [L]      token ids; soft positions hold the pad id
  soft_entity [L]    -1 for text, else the entity (0..E-1) whose token it is
  soft_slot [L]      which of that entity's soft tokens
  entity_kind [E]    ITEM, USER or PROMPT; entity_index [E]: CF-table row
  entity_mask [E]    real entities
  attention_mask [L] real tokens
  targets [L]        the next token (training); loss_mask [L] where it counts
  answer_positions [A]  the first A loss positions, in order (0 past the
                     end, where loss_mask is False): the only positions
                     whose vocabulary logits training needs
Training examples are right-padded; generation prompts are left-padded.
L and A can differ per task (`max_len`, `max_answer_tokens` as mappings):
batches of one task then take that task's shape, so short tasks do not pay
for the longest one's padding.
"""

import dataclasses
import json
import pathlib
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

ITEM, USER, PROMPT = 0, 1, 2  # PROMPT: the text-only baseline's learned prompt
PROMPT_PLACEHOLDERS = ("user", "history", "item", "liked")
# What each task's requests fill: a template may use only these (a
# description request has no user, so "{user}" there would have nothing to
# show).
TASK_PLACEHOLDERS = {
  "sequential": ("user", "history"),
  "straightforward": ("user",),
  "description": ("item",),
  "conversation": ("liked",),
  "title": ("item",),
}
TARGET_FIELDS = ("title", "text", "reason")
DEFAULT_TEMPLATES = pathlib.Path(__file__).parent / "templates" / "prompts.json"
_MARKER = "\x00{}\x00"  # survives the chat template, never in real text


class TemplateError(ValueError):
  """A template names an unknown placeholder or is malformed."""


@dataclasses.dataclass(frozen=True)
class TaskTemplates:
  target: str
  seen: tuple[str, ...]
  unseen: tuple[str, ...]


def _fields(template: str) -> list[str]:
  return [
    name
    for _, name, _, _ in string.Formatter().parse(template)
    if name is not None
  ]


def check_placeholders(task: str, template: str, where: str = "") -> None:
  """Raises TemplateError unless `template` is well-formed for `task`.

  Args:
    task: a task name of TASK_PLACEHOLDERS.
    template: the prompt template.
    where: what to name in the message (file, task, template number).

  Raises:
    TemplateError: an unknown task, a malformed template, or a placeholder
      that is unknown or that the task's requests never fill.
  """
  where = where or f"task {task!r}"
  if task not in TASK_PLACEHOLDERS:
    raise TemplateError(
      f"{where}: unknown task {task!r}; known: {', '.join(TASK_PLACEHOLDERS)}"
    )
  try:
    names = _fields(template)
  except ValueError as e:
    raise TemplateError(f"{where}: {e}: {template!r}") from e
  allowed = TASK_PLACEHOLDERS[task]
  for name in names:
    if name not in allowed:
      kind = "unknown" if name not in PROMPT_PLACEHOLDERS else "unfilled"
      raise TemplateError(
        f"{where}: {kind} placeholder {{{name}}} in {template!r}; "
        f"task {task!r} allows "
        f"{', '.join('{' + p + '}' for p in allowed)}"
      )


def load_templates(
  path: str | pathlib.Path | None = None,
) -> dict[str, TaskTemplates]:
  """Reads and checks a templates file (default: the packaged one).

  Raises:
    TemplateError: naming the file, task, template and the bad placeholder.
  """
  path = pathlib.Path(path or DEFAULT_TEMPLATES)
  raw = json.loads(path.read_text())
  tasks = {}
  for task, spec in raw.items():
    if task.startswith("_"):
      continue
    for kind in ("seen", "unseen"):
      for number, template in enumerate(spec[kind]):
        check_placeholders(
          task, template, f"{path}: task {task!r}, {kind} template {number}"
        )
    for name in _fields(spec["target"]):
      if name not in TARGET_FIELDS:
        raise TemplateError(
          f"{path}: task {task!r} target: unknown field "
          f"{{{name}}}; allowed: {', '.join(TARGET_FIELDS)}"
        )
    if not spec["seen"] or len(spec["unseen"]) != 1:
      raise TemplateError(
        f"{path}: task {task!r} needs seen templates and "
        "exactly one unseen template."
      )
    tasks[task] = TaskTemplates(
      spec["target"], tuple(spec["seen"]), tuple(spec["unseen"])
    )
  return tasks


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt before tokenization (entities are CF-table rows).

  `user` is the user's index; `user_row`, when >= 0, is the row of the
  user table that `{user}` shows instead of row `user` (a sequence state
  before the target, `ilm.data.user_state='sequence'`).
  """

  task: str
  template: str
  user: int = -1
  history: tuple[int, ...] = ()
  item: int = -1
  liked: tuple[int, ...] = ()
  target_text: str = ""
  target_item: int = -1
  user_row: int = -1

  @property
  def user_index(self) -> int:
    """The user-table row of `{user}`: `user_row`, else `user`."""
    return self.user_row if self.user_row >= 0 else self.user


@dataclasses.dataclass
class EncodeStats:
  """What encoding had to cut, so nothing is dropped silently."""

  history_items_truncated: int = 0
  target_tokens_truncated: int = 0
  # Sequential requests whose history is empty (as given or after
  # truncation): their prompt mentions no item.
  empty_histories: int = 0


class PromptEncoder:
  """Turns `Request`s into fixed-length arrays for one tokenizer."""

  def __init__(
    self,
    tokenizer,
    item_titles: Sequence[str],
    *,
    tokens_per_entity: int,
    max_len: int | Mapping[str, int],
    max_entities: int,
    max_answer_tokens: int | Mapping[str, int] = 64,
    soft_tokens: bool = True,
    titles_with_soft: bool = False,
    system_prompt: str = "",
    learned_prompt: bool = False,
    num_users: int | None = None,
  ):
    """Args:
    tokenizer: an `llm_tokenizer.LlmTokenizer`.
    item_titles: title of every item (CF-table row order).
    tokens_per_entity: soft tokens per user or item.
    max_len: sequence length (prompt + target), or a length per task
      name (every task that will be encoded must be listed).
    max_entities: entities per example (the user plus history items).
    max_answer_tokens: answer positions listed in `answer_positions`
      (int or per task); answer tokens beyond it are not scored.
    soft_tokens: False for the text-only baseline (titles, no soft tokens).
    titles_with_soft: also write each item's title before its soft tokens.
    system_prompt: a system message; "" keeps the chat template's default.
    learned_prompt: start the user message with one PROMPT entity of
      tokens_per_entity soft tokens (prompt tuning; the text-only baseline
      trains only these).
    num_users: rows of the user table, to check user ids (None: only
      checks that they are not negative).
    """
    self.tokenizer = tokenizer
    self.item_titles = list(item_titles)
    self.tokens_per_entity = tokens_per_entity
    self.max_len = max_len
    self.max_answer_tokens = max_answer_tokens
    self.max_entities = max_entities
    self.soft_tokens = soft_tokens
    self.titles_with_soft = titles_with_soft
    self.system_prompt = system_prompt
    self.learned_prompt = learned_prompt
    self.num_users = num_users
    self.stats = EncodeStats()
    self._separator = tokenizer.encode(", ", add_special_tokens=False)

  def length(self, task: str) -> int:
    """Encoded length L of `task`'s examples."""
    return _per_task(self.max_len, task, "max_len")

  def answer_tokens(self, task: str) -> int:
    """Width A of `task`'s answer_positions."""
    return _per_task(self.max_answer_tokens, task, "max_answer_tokens")

  def _text(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)

  def _entity_tokens(self, kind, index, entities, ids, soft):
    if kind == ITEM and (self.titles_with_soft or not self.soft_tokens):
      title = self._text(
        self.item_titles[index] + (" " if self.soft_tokens else "")
      )
      ids += title
      soft += [(-1, 0)] * len(title)
    if not self.soft_tokens and kind != PROMPT:
      if kind == USER:
        words = self._text("the user")
        ids += words
        soft += [(-1, 0)] * len(words)
      return
    entities.append((kind, index))
    for slot in range(self.tokens_per_entity):
      ids.append(self.tokenizer.pad_id)
      soft.append((len(entities) - 1, slot))

  def _prompt(self, request: Request, history: Sequence[int]):
    """Token ids and (entity, slot) pairs of the rendered prompt."""
    names = _fields(request.template)
    text = request.template.format(**{n: _MARKER.format(n) for n in names})
    if self.learned_prompt:
      text = _MARKER.format("prompt") + text
    messages = [{"role": "user", "content": text}]
    if self.system_prompt:
      messages.insert(0, {"role": "system", "content": self.system_prompt})
    rendered = self.tokenizer.apply_chat_template(
      messages, add_generation_prompt=True
    )
    ids, soft, entities = [], [], []
    if self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
      ids.append(self.tokenizer.bos_id)
      soft.append((-1, 0))
    for number, part in enumerate(re.split("\x00", rendered)):
      if number % 2 == 0:
        tokens = self._text(part)
        ids += tokens
        soft += [(-1, 0)] * len(tokens)
        continue
      if part == "prompt":
        group = [(PROMPT, 0)]
      elif part == "user":
        group = [(USER, request.user_index)]
      elif part == "item":
        group = [(ITEM, request.item)]
      else:
        group = [
          (ITEM, i) for i in (history if part == "history" else request.liked)
        ]
      for position, (kind, index) in enumerate(group):
        if position:
          ids += self._separator
          soft += [(-1, 0)] * len(self._separator)
        self._entity_tokens(kind, index, entities, ids, soft)
    return ids, soft, entities

  def _check(self, request: Request) -> None:
    """Placeholders fit the task; every entity id names a real row."""
    check_placeholders(request.task, request.template)
    names = _fields(request.template)
    items = len(self.item_titles)
    checks = [
      ("item", [request.item], items),
      ("history", request.history, items),
      ("liked", request.liked, items),
      ("user", [request.user_index], self.num_users),
    ]
    for name, ids, count in checks:
      if name not in names:
        continue
      for entity in ids:
        if entity < 0 or (count is not None and entity >= count):
          upper = "" if count is None else f" and < {count}"
          raise ValueError(
            f"Task {request.task!r}: {{{name}}} id {entity} is out of "
            f"range (ids are >= 0{upper}); a wrong id would show another "
            "entity's soft tokens."
          )

  def encode(self, request: Request, with_target: bool = True) -> dict:
    """Encodes one request; training layout if with_target else generation.

    Raises:
      TemplateError: the template has a placeholder the task never fills.
      ValueError: an entity id is out of range, or the prompt cannot fit.
    """
    self._check(request)
    history = list(request.history)
    max_len = self.length(request.task)
    target = (
      self._text(request.target_text) + [self.tokenizer.eos_id]
      if with_target
      else []
    )
    while True:
      ids, soft, entities = self._prompt(request, history)
      too_long = len(ids) + len(target) > max_len
      if (too_long or len(entities) > self.max_entities) and history:
        history.pop(0)  # drop the oldest item first
        self.stats.history_items_truncated += 1
        continue
      break
    if "history" in _fields(request.template) and not history:
      self.stats.empty_histories += 1
      if self.stats.empty_histories == 1:
        logging.warning(
          "A %s prompt has an empty history (given %d items); its prompt "
          "mentions no item. Counted in empty_histories.",
          request.task,
          len(request.history),
        )
    if len(entities) > self.max_entities:
      raise ValueError(
        f"{len(entities)} entities > max_entities="
        f"{self.max_entities} for task {request.task!r}."
      )
    room = max_len - len(ids)
    if room < (1 if with_target else 0):
      raise ValueError(
        f"The prompt of task {request.task!r} needs "
        f"{len(ids)} tokens; max_len={max_len}."
      )
    if len(target) > room:
      self.stats.target_tokens_truncated += len(target) - room
      target = target[:room]
    return self._arrays(
      ids, soft, entities, target, request, with_target, max_len
    )

  def _arrays(self, ids, soft, entities, target, request, with_target, length):
    pad = self.tokenizer.pad_id
    sequence = ids + target
    n = len(sequence)
    # Right-pad for training, left-pad for generation.
    offset = 0 if with_target else length - n
    out = dict(
      input_ids=np.full(length, pad, np.int32),
      soft_entity=np.full(length, -1, np.int32),
      soft_slot=np.zeros(length, np.int32),
      attention_mask=np.zeros(length, bool),
      targets=np.full(length, pad, np.int32),
      loss_mask=np.zeros(length, bool),
      entity_kind=np.zeros(self.max_entities, np.int32),
      entity_index=np.zeros(self.max_entities, np.int32),
      entity_mask=np.zeros(self.max_entities, bool),
      target_item=np.int32(request.target_item),
    )
    out["input_ids"][offset : offset + n] = sequence
    out["attention_mask"][offset : offset + n] = True
    for position, (entity, slot) in enumerate(soft):
      out["soft_entity"][offset + position] = entity
      out["soft_slot"][offset + position] = slot
    for number, (kind, index) in enumerate(entities):
      out["entity_kind"][number] = kind
      out["entity_index"][number] = index
      out["entity_mask"][number] = True
    if with_target:
      # Position t predicts token t+1: the loss covers the target tokens.
      out["targets"][: n - 1] = sequence[1:]
      out["loss_mask"][len(ids) - 1 : n - 1] = True
    answer = np.flatnonzero(out["loss_mask"])[
      : self.answer_tokens(request.task)
    ]
    out["answer_positions"] = np.zeros(
      self.answer_tokens(request.task), np.int32
    )
    out["answer_positions"][: len(answer)] = answer
    return out


def _per_task(value, task: str, name: str) -> int:
  """`value` itself, or its entry for `task` when it is a mapping."""
  if not isinstance(value, Mapping):
    return int(value)
  if task not in value:
    raise ValueError(
      f"{name} has no entry for task {task!r}; it lists {sorted(value)}."
    )
  return int(value[task])
