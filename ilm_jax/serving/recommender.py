"""A `Recommender` over a trained ILM export: ranking, reasons, descriptions.

Ranking is the phase-2 recommendation task decoded by beam search
constrained to the prefix trie of the catalogue titles, so every answer is
a catalogue item; the beams, best first, are the ranked list and their
summed log-probabilities the scores. Items the caller excludes (and the
history) are removed from the trie itself: the search runs over a trie of
the allowed titles only, padded to the full trie's array sizes so the
jitted search never recompiles (`decoding.constrained_beam_search` has no
exclusion mask).

Prompts come from the export's config (templates, `titles_with_soft`,
system prompt, lengths) through `data.ilm_tasks.build_prompting`, exactly as
phase 2 trained them. A history without a known user gets the mean user
CF vector (an extra row of the user table) as its `{user}` soft tokens.

Reasons come from the conversation task ("{liked}" -> "Title. reason"):
the prompt plus the recommended title is decoded greedily; the generated
reason is kept only if `grounding.check_reason` finds nothing in it that
the catalogue metadata contradicts, else the metadata reason of
`ilm_tasks.reason` is used. All model calls hold one lock.
"""

import dataclasses
import pathlib
import threading
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ilm_jax import checkpoint, data, decoding, layout
from ilm_jax.data import ilm_tasks, prompts
from ilm_jax.evaluators import generative
from ilm_jax.serving import catalog as catalog_lib
from ilm_jax.serving import export_bundle, grounding
from ilm_jax.serving import session as session_lib

BEAM_BUCKETS = (5, 10, 20, 50)  # num_beams is static: a few shapes only
MAX_K = BEAM_BUCKETS[-1]
REASON_TOKENS = 32  # generated tokens per reason
DESCRIPTION_TOKENS = 48
ANSWER_PREFIX_ROOM = 32  # title tokens a reason prompt can carry
# The per-token [B, L] arrays of an encoded prompt (what the LLM reads).
TOKEN_KEYS = generative.TOKEN_AXIS_KEYS
ENTITY_KEYS = ("entity_kind", "entity_index", "entity_mask")
# Prompts keep half or all of max_len after trimming the left padding:
# two shapes per decoder, each compiled once (compile times in
# docs/results/serving.md).
PROMPT_BUCKETS = 2


class NoExportError(FileNotFoundError):
  """The workdir holds no export bundle (message names the fix)."""


class UnknownItemError(KeyError):
  """A history entry or item is neither an item id nor a catalogue title."""

  def __init__(self, message: str, matches: Sequence[catalog_lib.Match]):
    super().__init__(message)
    self.message = message
    self.matches = list(matches)

  def __str__(self) -> str:
    return self.message


@dataclasses.dataclass
class Recommendation:
  """One ranked catalogue item.

  Attributes:
    item: catalogue row (CF-table index).
    item_id: the dataset's raw item id.
    title: catalogue title.
    score: summed log-probability of the title's tokens under the ILM
      (natural log, <= 0; higher is better).
    reason: one short sentence grounded in the catalogue metadata.
    reason_source: "model" (generated, checked against the metadata) or
      "metadata" (the template reason).
  """

  item: int
  item_id: str
  title: str
  score: float
  reason: str = ""
  reason_source: str = ""

  def to_json(self) -> dict:
    return dict(
      item_id=self.item_id,
      title=self.title,
      score=self.score,
      reason=self.reason,
      reason_source=self.reason_source,
    )


def _bucket(n: int) -> int:
  for size in BEAM_BUCKETS:
    if n <= size:
      return size
  return BEAM_BUCKETS[-1]


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def trim_padding(batch: dict, buckets: int = PROMPT_BUCKETS) -> dict:
  """Drops the leading columns that are padding in every row.

  Generation prompts are left-padded to `max_len`; the LLM would still run
  every padded column. The kept length is rounded up to a multiple of
  L / buckets (each distinct length compiles the decoders once).

  Args:
    batch: encoded generation prompts, [B, L] token arrays.
    buckets: kept lengths are multiples of ceil(L / buckets).

  Returns:
    What the model reads for generation: TOKEN_KEYS cut to their last L'
    columns, and ENTITY_KEYS.
  """
  multiple = -(-batch["attention_mask"].shape[1] // buckets)
  out = generative.trim_left_padding(batch, multiple)
  return {k: out[k] for k in TOKEN_KEYS + ENTITY_KEYS}


def masked_trie(
  full: decoding.TokenTrie, sequences, allowed: np.ndarray, eos_id: int
) -> decoding.TokenTrie:
  """The trie of the `allowed` items only, with the full trie's shapes.

  Args:
    full: the trie of every title (fixes array sizes and static sizes).
    sequences: the title token ids of every item.
    allowed: [n] int catalogue rows to keep (n >= 1).
    eos_id: the end token appended to every sequence.

  Returns:
    A TokenTrie whose `sequence_ids` are catalogue rows; extra nodes have
    no children and extra edges are never valid, so a jitted search with
    the full trie's shapes accepts it without recompiling.
  """
  trie = decoding.TokenTrie([sequences[i] for i in allowed], eos_id=eos_id)
  nodes, edges = full.num_nodes, len(full.edge_tokens)
  pad_nodes = nodes - trie.num_nodes
  pad_edges = edges - len(trie.edge_tokens)
  trie.sequence_ids = np.concatenate(
    [
      np.where(trie.sequence_ids >= 0, allowed[trie.sequence_ids], -1),
      np.full(pad_nodes, -1),
    ]
  ).astype(np.int32)
  trie.offsets = np.concatenate(
    [trie.offsets, np.full(pad_nodes, trie.offsets[-1])]
  ).astype(np.int32)
  trie.edge_tokens = np.concatenate(
    [trie.edge_tokens, np.zeros(pad_edges)]
  ).astype(np.int32)
  trie.edge_targets = np.concatenate(
    [trie.edge_targets, np.zeros(pad_edges)]
  ).astype(np.int32)
  trie.max_children, trie.max_depth = full.max_children, full.max_depth
  return trie


class Recommender:
  """The trained ILM as a recommender (thread-safe; one model in memory)."""

  def __init__(
    self, bundle: export_bundle.Bundle, dataset, *, warmup: bool = True
  ):
    """Args:
    bundle: a loaded export (`export_bundle.load_bundle`).
    dataset: the ProcessedDataset the export was trained on (metadata).
    warmup: compile the ranking and reason decoders now (one dummy call
      each), so the first request does not pay XLA compilation.
    """
    if list(bundle.item_ids) != list(dataset.item_ids):
      raise ValueError(
        "The export's item index does not match the dataset of its config "
        f"({len(bundle.item_ids)} vs {len(dataset.item_ids)} items)."
      )
    self.bundle, self.dataset = bundle, dataset
    self.config = bundle.config
    self.tokenizer = bundle.tokenizer
    self.model = bundle.model
    popularity = np.bincount(
      dataset.user_item_pairs[:, 1], minlength=dataset.num_items
    )
    self.catalog = catalog_lib.Catalog(
      dataset.item_titles, dataset.item_ids, dataset.item_attributes, popularity
    )
    try:
      self.sampler, self.encoder = ilm_tasks.build_prompting(
        self.config, dataset, self.tokenizer
      )
    except (AttributeError, KeyError) as e:
      raise NoExportError(
        f"The export's config lacks the field {e} (written by an older "
        "ilm_jax); re-run its export phase with this code: python -m "
        "ilm_jax.main --config=CONFIG --workdir=WORKDIR --config.phases=export"
      ) from e
    self.templates = self.sampler.templates
    self.max_history = self.config.ilm.data.max_history
    self.max_liked = self.sampler.max_liked
    # A history with no known user speaks as the mean user (an extra row).
    users = bundle.params["cf"]["users"]
    self.mean_user = int(users.shape[0])
    params = dict(bundle.params)
    params["cf"] = dict(
      params["cf"],
      users=jnp.concatenate([users, users.mean(0, keepdims=True)], axis=0),
    )
    self.params = params
    # The encoder checks user ids against the table it is given: this one
    # has the mean user as its last row.
    self.encoder.num_users = self.mean_user + 1
    self._user_index = {u: n for n, u in enumerate(bundle.user_ids)}
    self.trie, self.trie_report = generative.build_title_trie(
      self.tokenizer, dataset.item_titles
    )
    self._title_tokens = [
      self.tokenizer.encode(t, add_special_tokens=False)
      for t in dataset.item_titles
    ]
    self._embed = jax.jit(self.model.input_embeddings)
    self._lock = threading.Lock()
    if warmup:
      self.warmup()

  def warmup(self) -> float:
    """Compiles the decoders for the common request shapes; returns seconds.

    One item and a full history (short and long prompts), k=5 (chat) and
    k=10 (/v1/recommend), with reasons; other k compile on first use.
    """
    start = time.perf_counter()
    full = list(range(min(self.max_history, len(self.catalog) - 10)))
    for history in ([0], full):
      for k in (5, 10):
        self.recommend(history, k=k, reasons=True)
    seconds = time.perf_counter() - start
    logging.info("Decoders compiled in %.1fs.", seconds)
    return seconds

  @classmethod
  def from_workdir(
    cls, workdir, llm_checkpoint: str | None = None, warmup: bool = True
  ) -> "Recommender":
    """Loads `WORKDIR/export` (the adapter bundle) and the frozen LLM.

    Raises:
      NoExportError: no bundle; the message names the path and the command
        that writes it.
    """
    workdir = pathlib.Path(workdir).absolute()
    export_dir = layout.export_dir(workdir)
    if not (export_dir / "config.json").exists():
      raise NoExportError(
        f"No ILM export at {export_dir}. Train and export first: python -m "
        f"ilm_jax.main --config=configs/ml1m.py:cpu --workdir={workdir} "
        "(or add --config.phases=export to a finished run)."
      )
    start = time.perf_counter()
    try:
      bundle = export_bundle.load_bundle(export_dir, llm_checkpoint)
    except checkpoint.CheckpointError as e:
      raise NoExportError(str(e)) from e
    except (AttributeError, KeyError) as e:
      raise NoExportError(
        f"The export at {export_dir} lacks the config field {e} (written "
        "by an older ilm_jax); re-run its export phase with this code: "
        "python -m ilm_jax.main --config=CONFIG "
        f"--workdir={workdir} --config.phases=export"
      ) from e
    dataset = data.load_dataset(bundle.config.data)
    logging.info(
      "Loaded the export at %s (%d items) in %.1fs.",
      export_dir,
      len(bundle.item_titles),
      time.perf_counter() - start,
    )
    return cls(bundle, dataset, warmup=warmup)

  # Items -----------------------------------------------------------------

  def item_index(self, item: int | str) -> int:
    """Catalogue row of an item id, row number or unambiguous title.

    Raises:
      UnknownItemError: unknown, or an ambiguous title (candidates listed).
    """
    if isinstance(item, int | np.integer):
      if 0 <= int(item) < len(self.catalog):
        return int(item)
      raise UnknownItemError(f"No item with row {item}.", [])
    found = self.catalog.index_of(item)
    if found is not None:
      return found
    match = self.catalog.resolve(item)
    if match.status == "resolved":
      return match.item
    if match.status == "ambiguous":
      options = "; ".join(
        self.catalog.titles[i]
        for i in match.candidates[: catalog_lib.MAX_CANDIDATES]
      )
      raise UnknownItemError(f"{item!r} is ambiguous: {options}.", [match])
    raise UnknownItemError(f"{item!r} is not in the catalogue.", [match])

  def _recommendation(self, item: int, score: float) -> Recommendation:
    return Recommendation(
      item=item,
      item_id=self.catalog.item_ids[item],
      title=self.catalog.titles[item],
      score=float(score),
    )

  # Ranking ---------------------------------------------------------------

  def _ranking_request(self, history: Sequence[int], user: int):
    if history:
      return prompts.Request(
        "sequential",
        self.templates["sequential"].seen[0],
        user=user,
        history=tuple(history[-self.max_history :]),
      )
    return prompts.Request(
      "straightforward", self.templates["straightforward"].seen[0], user=user
    )

  def _user_row(self, user) -> int:
    if user is None:
      return self.mean_user
    if str(user) in self._user_index:
      return self._user_index[str(user)]
    raise UnknownItemError(f"Unknown user id {user!r}.", [])

  def _search(self, requests, trie, num_beams):
    batch = trim_padding(
      _stack([self.encoder.encode(r, with_target=False) for r in requests])
    )
    embeds = self._embed(self.params, batch)
    result = decoding.constrained_beam_search(
      self.model.llm,
      self.model.llm_params(self.params),
      trie,
      prompt_embeds=embeds,
      prompt_mask=batch["attention_mask"],
      num_beams=num_beams,
      pad_id=self.tokenizer.pad_id,
    )
    return np.asarray(result.sequence_ids), np.asarray(result.scores)

  def recommend(
    self,
    history: Iterable[int | str],
    k: int = 10,
    user: str | None = None,
    exclude: Iterable[int | str] = (),
    allowed: Iterable[int] | None = None,
    reasons: bool = False,
  ) -> list[Recommendation]:
    """Top-k catalogue items for a history, best first.

    Args:
      history: items (ids, rows or titles), oldest first; [] ranks for the
        user alone (the straightforward task).
      k: items to return, 1..MAX_K.
      user: a raw user id of the training data; None: the mean user.
      exclude: items never to return (the history is always excluded).
      allowed: catalogue rows to choose from (default: all).
      reasons: also fill `reason` (one model call more).

    Returns:
      Up to k Recommendations (fewer when fewer items are allowed), no
      item in history or exclude, scores non-increasing.

    Raises:
      ValueError: k out of range.
      UnknownItemError: an unknown or ambiguous history/exclude entry.
    """
    if not 1 <= k <= MAX_K:
      raise ValueError(f"k={k}; expected 1..{MAX_K}.")
    rows = [self.item_index(h) for h in history]
    banned = set(rows) | {self.item_index(e) for e in exclude}
    pool = np.arange(len(self.catalog)) if allowed is None else allowed
    pool = np.array(sorted(set(map(int, pool)) - banned), np.int64)
    if not len(pool):
      return []
    request = self._ranking_request(rows, self._user_row(user))
    with self._lock:
      trie = masked_trie(
        self.trie, self._title_tokens, pool, self.tokenizer.eos_id
      )
      ids, scores = self._search([request], trie, _bucket(k))
    out = [
      self._recommendation(int(i), s)
      for i, s in zip(ids[0], scores[0], strict=True)
      if i >= 0
    ][:k]
    if reasons:
      self.explain(out, rows[-self.max_liked :])
    return out

  def recommend_batch(
    self,
    histories: Sequence[Sequence[int | str]],
    k: int = 10,
    users: Sequence[str | None] | None = None,
    batch_size: int = 8,
  ) -> list[list[Recommendation]]:
    """`recommend` for many users at once (offline scoring).

    Rows share one trie (the full one), so the search asks for k plus the
    longest history's beams and drops each row's own history afterwards.

    Returns:
      One list of up to k Recommendations per history.
    """
    if not 1 <= k <= MAX_K:
      raise ValueError(f"k={k}; expected 1..{MAX_K}.")
    users = list(users) if users is not None else [None] * len(histories)
    rows = [[self.item_index(h) for h in hist] for hist in histories]
    longest = max((len(set(r)) for r in rows), default=0)
    beams = _bucket(k + longest)
    requests = [
      self._ranking_request(r, self._user_row(u))
      for r, u in zip(rows, users, strict=True)
    ]
    out = []
    for start in range(0, len(requests), batch_size):
      chunk = requests[start : start + batch_size]
      real = len(chunk)
      chunk = chunk + [chunk[-1]] * (batch_size - real)  # one shape
      with self._lock:
        ids, scores = self._search(chunk, self.trie, beams)
      for n in range(real):
        seen = set(rows[start + n])
        ranked = [
          self._recommendation(int(i), s)
          for i, s in zip(ids[n], scores[n], strict=True)
          if i >= 0 and i not in seen
        ]
        out.append(ranked[:k])
    return out

  # Text ------------------------------------------------------------------

  def _greedy(self, batch: dict, max_new_tokens: int) -> list[str]:
    batch = trim_padding(batch)
    embeds = self._embed(self.params, batch)
    tokens = decoding.greedy(
      self.model.llm,
      self.model.llm_params(self.params),
      prompt_embeds=embeds,
      prompt_mask=batch["attention_mask"],
      max_new_tokens=max_new_tokens,
      eos_id=self.tokenizer.eos_id,
      pad_id=self.tokenizer.pad_id,
    )
    return [self.tokenizer.decode(row) for row in np.asarray(tokens)]

  def _with_answer_prefix(self, example: dict, prefix: Sequence[int]) -> dict:
    """A generation prompt with answer tokens appended (left-padded).

    The prompt gains ANSWER_PREFIX_ROOM columns whatever the prefix length,
    so every reason batch of one prompt length has one shape.
    """
    n = len(prefix)
    out = {k: v for k, v in example.items() if k not in TOKEN_KEYS}
    for name, fill in (
      ("input_ids", None),
      ("soft_entity", -1),
      ("soft_slot", 0),
      ("attention_mask", True),
    ):
      pad = self.tokenizer.pad_id if fill is None else fill
      head = np.full(
        ANSWER_PREFIX_ROOM - n, pad if name != "attention_mask" else False
      )
      tail = np.asarray(prefix if fill is None else [fill] * n)
      out[name] = np.concatenate([head, example[name], tail]).astype(
        example[name].dtype
      )
    return out

  def explain(
    self, recommendations: list[Recommendation], liked: Sequence[int]
  ) -> None:
    """Fills `reason`/`reason_source` of each recommendation in place.

    The conversation task generates "Title. reason" for the liked items;
    the title is given, the reason decoded greedily and checked against the
    metadata (`grounding.check_reason`); a reason that fails, or any reason
    when nothing is liked, is the metadata template reason.
    """
    liked = [int(i) for i in liked][-self.max_liked :]
    generated = [""] * len(recommendations)
    if liked and recommendations:
      template = self.templates["conversation"].seen[0]
      request = prompts.Request("conversation", template, liked=tuple(liked))
      base = self.encoder.encode(request, with_target=False)
      examples = []
      for rec in recommendations:
        prefix = self.tokenizer.encode(
          f"{rec.title}.", add_special_tokens=False
        )
        # A title longer than the room is cut: the model then continues
        # the title, which fails the check, and the metadata reason is used.
        examples.append(
          self._with_answer_prefix(base, prefix[:ANSWER_PREFIX_ROOM])
        )
      size = _bucket(len(examples))
      examples += [examples[-1]] * (size - len(examples))
      with self._lock:
        generated = self._greedy(_stack(examples), REASON_TOKENS)
    for rec, text in zip(recommendations, generated, strict=False):
      checked = grounding.check_reason(text, rec.item, liked, self.catalog)
      if checked:
        rec.reason, rec.reason_source = checked, "model"
      elif liked:
        rec.reason = grounding.fix_articles(
          ilm_tasks.reason(self.dataset, rec.item, liked)
        )
        rec.reason_source = "metadata"
      else:
        rec.reason = grounding.metadata_summary(rec.item, self.catalog)
        rec.reason_source = "metadata"

  def describe(self, item: int | str) -> str:
    """The generated description of an item (the description task).

    Raises:
      UnknownItemError: unknown or ambiguous item.
    """
    row = self.item_index(item)
    request = prompts.Request(
      "description", self.templates["description"].seen[0], item=row
    )
    batch = _stack([self.encoder.encode(request, with_target=False)])
    with self._lock:
      return self._greedy(batch, DESCRIPTION_TOKENS)[0].strip()

  def chat(self, session, message: str, k: int = 5):
    """One conversational turn (`session.turn`); updates `session`.

    Returns:
      A `session.Reply` (text, items with reasons, resolved/unresolved).
    """
    return session_lib.turn(self, session, message, k=k)
