"""Conversation state and one chat turn: what the user said -> items.

A `Session` remembers liked and disliked items, everything already
recommended, the last list (for "the second one"), a mood or genre filter
and a pending clarifying question. `parse` reads one message into an
`Intent` by cue words (no model):

  mentions   titles after "I liked / loved / enjoyed / like", "similar to",
             quoted titles, or a bare list of titles; after "hated / didn't
             like / not a fan of / no" they are disliked;
  references "not that one" (the last top item), "not the second one",
             "more like the second one", "#2", "the last one";
  filters    "darker" / "scarier", "lighter" / "funnier", or a catalogue
             genre ("a comedy", "some westerns");
  describe   "tell me about X", "describe X", "what is X about".

`turn` applies the intent to the session and asks the recommender for
items outside liked, disliked and already shown.
"""

import dataclasses
import re
import uuid

from ilm_jax.serving import catalog as catalog_lib

ORDINALS = {
  "first": 0,
  "1st": 0,
  "second": 1,
  "2nd": 1,
  "third": 2,
  "3rd": 2,
  "fourth": 3,
  "4th": 3,
  "fifth": 4,
  "5th": 4,
  "sixth": 5,
  "seventh": 6,
  "eighth": 7,
  "ninth": 8,
  "tenth": 9,
}
MOODS = {
  # Catalogue genres (ML-1M names) and description words of each mood.
  "dark": (
    {"Horror", "Thriller", "Crime", "Film-Noir", "Mystery", "War"},
    ("dark",),
  ),
  "light": (
    {"Comedy", "Children's", "Animation", "Musical", "Romance"},
    ("bright", "light"),
  ),
}
_MOOD_WORDS = {
  "darker": "dark",
  "dark": "dark",
  "scarier": "dark",
  "scary": "dark",
  "grim": "dark",
  "grimmer": "dark",
  "lighter": "light",
  "light": "light",
  "funnier": "light",
  "funny": "light",
  "happier": "light",
  "cheerful": "light",
}
_NEGATIVE = (
  r"(?:i\s+)?(?:really\s+)?(?:hated|hate|disliked|dislike|didn't like|"
  r"did not like|don't like|do not like|can't stand|cannot stand|"
  r"not a fan of|wasn't a fan of|couldn't stand|no more|nothing like|"
  r"not into)\b"
)
_POSITIVE = (
  r"(?:i\s+)?(?:really\s+|also\s+)?(?:liked|like|loved|love|enjoyed|enjoy|"
  r"adored|adore|am a fan of|fan of|favou?rites? (?:is|are|was|were)|"
  r"similar to|such as|watched|saw|something like|movies like|films like|"
  r"anything like)\b"
)
_DESCRIBE = re.compile(
  r"^(?:please\s+)?(?:tell me (?:more )?about|describe|what is|what's|"
  r"what was)\s+(.+?)(?:\s+about)?\s*[?.!]*$",
  re.I,
)
_ORDINAL = "|".join(sorted(ORDINALS, key=len, reverse=True))
_REFERENCE = re.compile(
  rf"(?P<neg>\bnot\b|\bno\b|\bdrop\b|\bwithout\b|didn't like|"
  rf"don't like|hate)?[^.;!?]*?"
  rf"(?:\bthe\s+(?P<ord>{_ORDINAL}|last)(?:\s+one)?|#(?P<num>\d+)|"
  rf"\bnumber\s+(?P<num2>\d+)|\b(?P<that>that|this)\s+one)",
  re.I,
)
_FILLER = re.compile(
  r"\b(?:please|recommend(?:ed)?|suggest|me|some|something|anything|a|an|"
  r"movies?|films?|more|another|one|else|too|also|as well|a lot|so much|"
  r"very much|really|i|and|but|what|should|watch|next|give|can|you|"
  r"would|could|hi|hello|hey|thanks|thank|ok|okay|yes|now|tonight|"
  r"similar|other|others|of|to|to watch|for|with|similar ones|"
  r"the same|same|way|kind|sort|like|some of|those|them|it|any)\b",
  re.I,
)
_SPLIT_CLAUSES = re.compile(r"[.;!?]+|\bbut\b|\bhowever\b|\bexcept\b", re.I)


@dataclasses.dataclass
class Session:
  """What one conversation has established so far (catalogue rows)."""

  id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
  liked: list[int] = dataclasses.field(default_factory=list)
  disliked: list[int] = dataclasses.field(default_factory=list)
  shown: list[int] = dataclasses.field(default_factory=list)
  last: list = dataclasses.field(default_factory=list)  # Recommendations
  mood: str = ""  # "dark", "light" or ""
  genres: set[str] = dataclasses.field(default_factory=set)
  pending: catalog_lib.Match | None = None  # awaiting "which one?"
  pending_positive: bool = True
  turns: int = 0

  def like(self, item: int) -> None:
    if item in self.disliked:
      self.disliked.remove(item)
    if item not in self.liked:
      self.liked.append(item)

  def dislike(self, item: int) -> None:
    if item in self.liked:
      self.liked.remove(item)
    if item not in self.disliked:
      self.disliked.append(item)


@dataclasses.dataclass
class Intent:
  """One message, parsed.

  Attributes:
    mentions: (text, positive) pairs of item mentions to resolve.
    references: (index into the last list, positive) pairs.
    mood: "dark", "light" or "" (unchanged).
    genres: catalogue genres asked for.
    describe: text of an item to describe, or "".
  """

  mentions: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
  references: list[tuple[int, bool]] = dataclasses.field(default_factory=list)
  mood: str = ""
  genres: set[str] = dataclasses.field(default_factory=set)
  describe: str = ""


def _split_titles(text: str, catalog: catalog_lib.Catalog) -> list[str]:
  """A span into title mentions: whole if it resolves, else by , / and."""
  text = text.strip(" ,")
  if not text:
    return []
  whole = catalog.resolve(text)
  if whole.status == "resolved" and whole.score >= 100:
    return [text]  # e.g. "Sense and Sensibility"
  parts = [p for p in re.split(r",|\s+&\s+|\bor\b", text) if p.strip()]
  out = []
  for part in parts:
    part = re.sub(r"^\s*and\s+", "", part).strip()
    first = catalog.resolve(part)
    if first.status != "unknown" or " and " not in part:
      out.append(part)
      continue
    out += [p.strip() for p in re.split(r"\band\b", part) if p.strip()]
  return [o for o in out if o]


def _genre_request(
  text: str, catalog: catalog_lib.Catalog
) -> tuple[set[str], str]:
  """(catalogue genres named in text, text without them)."""
  found = set()
  for word, genre in catalog.genre_vocabulary.items():
    # "a comedy", "some westerns", "horror movies", "something sci-fi".
    stem = re.escape(word[:-1] if word.endswith("y") else word)
    pattern = rf"(?<![\w-]){stem}(?:y|ies|s|ys)?(?![\w-])"
    if re.search(pattern, text, re.I):
      found.add(genre)
      text = re.sub(pattern, " ", text, flags=re.I)
  return found, text


def parse(message: str, catalog: catalog_lib.Catalog) -> Intent:
  """Reads one user message (see the module docstring for the cues)."""
  intent = Intent()
  text = " ".join(message.split())
  described = _DESCRIBE.match(text)
  if described:
    intent.describe = described.group(1).strip(" \"'")
    return intent
  # Quoted titles are mentions as they stand.
  for quoted in re.findall(r"[\"“]([^\"”]+)[\"”]", text):
    before = text[: text.find(quoted)].lower()
    positive = not re.search(_NEGATIVE, before.split(".")[-1])
    intent.mentions.append((quoted, positive))
  text = re.sub(r"[\"“][^\"”]+[\"”]", " ", text)
  for ref in _REFERENCE.finditer(text):
    if ref["that"]:
      index = 0
    elif ref["ord"]:
      index = (
        -1 if ref["ord"].lower() == "last" else ORDINALS[ref["ord"].lower()]
      )
    else:
      index = int(ref["num"] or ref["num2"]) - 1
    intent.references.append((index, not ref["neg"]))
  text = _REFERENCE.sub(" ", text)
  for word in re.findall(r"[\w']+", text.lower()):
    if word in _MOOD_WORDS:
      intent.mood = _MOOD_WORDS[word]
  for clause in _SPLIT_CLAUSES.split(text):
    negative = re.search(_NEGATIVE, clause, re.I)
    positive = re.search(_POSITIVE, clause, re.I)
    cue = negative or positive
    span = clause[cue.end() :] if cue else clause
    rest = span
    for word in _MOOD_WORDS:
      rest = re.sub(rf"\b{word}\b", " ", rest, flags=re.I)
    genres, bare = _genre_request(rest, catalog)
    if genres and not _FILLER.sub(" ", bare).strip(" ,'-"):
      intent.genres |= genres  # "some comedies please": no title left
      continue
    if not _FILLER.sub(" ", rest).strip(" ,'-"):
      continue  # nothing but filler words
    for mention in _split_titles(_strip_filler_edges(rest), catalog):
      intent.mentions.append((mention, not negative))
  return intent


def _strip_filler_edges(text: str) -> str:
  """Drops filler words at the start and end, keeps them inside titles."""
  words = text.strip(" ,").split()
  while words and _FILLER.fullmatch(words[0].strip(",").lower() or "x"):
    words.pop(0)
  while words and _FILLER.fullmatch(words[-1].strip(",.?!").lower() or "x"):
    words.pop()
  return " ".join(words).strip(" ,.?!")


@dataclasses.dataclass
class Reply:
  """One answer. `items` are Recommendations (best first).

  Attributes:
    session_id: the session this turn belongs to.
    reply: the text shown to the user.
    items: recommended items with scores and reasons.
    resolved: [{"mention", "item_id", "title", "liked"}] mentions matched.
    unresolved: [{"mention", "status" ("ambiguous"/"unknown"),
      "candidates": [{"item_id", "title"}]}] mentions not matched.
  """

  session_id: str
  reply: str
  items: list = dataclasses.field(default_factory=list)
  resolved: list[dict] = dataclasses.field(default_factory=list)
  unresolved: list[dict] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dict(
      session_id=self.session_id,
      reply=self.reply,
      items=[i.to_json() for i in self.items],
      resolved=self.resolved,
      unresolved=self.unresolved,
    )


def _pick_pending(session: Session, message: str, catalog) -> int | None:
  """The candidate a reply to "which one?" picks, or None."""
  candidates = session.pending.candidates[: catalog_lib.MAX_CANDIDATES]
  text = message.strip().lower().strip(".!? ")
  number = re.fullmatch(r"(?:#|number\s+)?(\d+)", text)
  if number and 1 <= int(number.group(1)) <= len(candidates):
    return candidates[int(number.group(1)) - 1]
  for word, index in ORDINALS.items():
    if re.search(rf"\b{word}\b", text) and index < len(candidates):
      return candidates[index]
  for item in candidates:
    if catalog_lib.key(catalog.titles[item]) == catalog_lib.key(message):
      return item
  year = re.search(r"\b(1[89]\d\d|20\d\d)\b", text)
  if year:
    hits = [i for i in candidates if catalog.years[i] == year.group(1)]
    if len(hits) == 1:
      return hits[0]
  return None


def _numbered(items, catalog) -> str:
  return "; ".join(
    f"{n}. {catalog.titles[i]}" for n, i in enumerate(items, start=1)
  )


def _allowed(session: Session, catalog) -> list[int] | None:
  """Catalogue rows the mood/genre filter admits (None: all)."""
  if not session.mood and not session.genres:
    return None
  out = []
  for item in range(len(catalog)):
    genres = set(catalog.genres(item))
    if session.genres and not genres & session.genres:
      continue
    if session.mood:
      mood_genres, words = MOODS[session.mood]
      text = catalog.attribute(item, "description").lower()
      if not genres & mood_genres and not any(
        re.search(rf"\b{w}\b", text) for w in words
      ):
        continue
    out.append(item)
  return out


def turn(recommender, session: Session, message: str, k: int = 5) -> Reply:
  """One conversational turn; updates `session` in place.

  Args:
    recommender: a `recommender.Recommender` (or anything with its
      `catalog`, `recommend` and `describe`).
    session: the conversation so far.
    message: what the user typed (non-empty).
    k: items to recommend.

  Returns:
    The Reply: a clarifying question (no items) while a mention is
    ambiguous; otherwise up to k items outside liked, disliked and shown.
  """
  catalog = recommender.catalog
  session.turns += 1
  reply = Reply(session.id, "")
  notes = []

  def record(match, positive):
    (session.like if positive else session.dislike)(match.item)
    reply.resolved.append(
      dict(
        mention=match.mention,
        item_id=catalog.item_ids[match.item],
        title=catalog.titles[match.item],
        liked=positive,
      )
    )

  if session.pending is not None:
    picked = _pick_pending(session, message, catalog)
    if picked is not None:
      match = dataclasses.replace(
        session.pending, status="resolved", item=picked
      )
      record(match, session.pending_positive)
      session.pending = None
      message = ""
    else:
      session.pending = None  # a new request instead of an answer
  intent = parse(message, catalog) if message else Intent()
  if intent.describe:
    match = catalog.resolve(intent.describe)
    if match.status == "resolved":
      text = recommender.describe(match.item)
      reply.reply = f"{catalog.titles[match.item]}: {text}"
      reply.resolved.append(
        dict(
          mention=match.mention,
          item_id=catalog.item_ids[match.item],
          title=catalog.titles[match.item],
          liked=False,
        )
      )
      return reply
    intent.mentions.append((intent.describe, True))
  for index, positive in intent.references:
    if not session.last or index >= len(session.last):
      notes.append(
        f"There is no item {index + 1} in the last list."
        if session.last
        else "I have not recommended anything yet."
      )
      continue
    item = session.last[index].item
    match = catalog_lib.Match(f"#{index + 1}", "resolved", item, (item,), 100)
    record(match, positive)
  if intent.mood:
    session.mood = intent.mood
  if intent.genres:
    session.genres = set(intent.genres)
  question = None
  for text, positive in intent.mentions:
    match = catalog.resolve(text)
    if match.status == "resolved":
      record(match, positive)
      continue
    reply.unresolved.append(
      dict(
        mention=text,
        status=match.status,
        candidates=[
          dict(item_id=catalog.item_ids[i], title=catalog.titles[i])
          for i in match.candidates[: catalog_lib.MAX_CANDIDATES]
        ],
      )
    )
    if match.status == "unknown":
      notes.append(f'I could not find "{text}" in the catalogue.')
    elif question is None:
      question = match
      session.pending, session.pending_positive = match, positive
  if question is not None:
    shown = question.candidates[: catalog_lib.MAX_CANDIDATES]
    more = len(question.candidates) - len(shown)
    extra = f" (and {more} more; add the year)" if more > 0 else ""
    notes.append(
      f'Which "{question.mention}" do you mean? '
      f"{_numbered(shown, catalog)}{extra}. Reply with the number."
    )
    reply.reply = " ".join(notes)
    return reply
  if not session.liked and not session.mood and not session.genres:
    notes.append(
      "Tell me a few movies you liked (or a genre or mood), and I will "
      "recommend some."
    )
    reply.reply = " ".join(notes)
    return reply
  exclude = set(session.liked) | set(session.disliked) | set(session.shown)
  allowed = _allowed(session, catalog)
  if allowed is not None:
    allowed = [i for i in allowed if i not in exclude]
  items = recommender.recommend(
    session.liked,
    k=k,
    exclude=sorted(exclude - set(session.liked)),
    allowed=allowed,
    reasons=True,
  )
  session.shown += [r.item for r in items]
  if items:  # "the second one" keeps meaning the last list shown
    session.last = items
  reply.items = items
  if not items:
    notes.append("I have nothing left to recommend with these filters.")
  else:
    basis = ", ".join(catalog.titles[i] for i in session.liked[-3:])
    lead = f"Since you liked {basis}" if basis else "For you"
    if session.mood or session.genres:
      lead += f" ({', '.join(sorted(session.genres) or [session.mood])})"
    lines = [f"{n}. {r.title} - {r.reason}" for n, r in enumerate(items, 1)]
    notes.append(f"{lead}: " + " ".join(lines))
  reply.reply = " ".join(notes)
  return reply


def apply_preferences(session: Session, message: str, catalog) -> None:
  """Records what a message likes and dislikes, without recommending.

  Used to replay earlier user turns of a stateless (OpenAI-style)
  conversation: resolved mentions, mood and genres only; ambiguous and
  unknown mentions and references to earlier lists are skipped.
  """
  intent = parse(message, catalog)
  for text, positive in intent.mentions:
    match = catalog.resolve(text)
    if match.status == "resolved":
      (session.like if positive else session.dislike)(match.item)
  if intent.mood:
    session.mood = intent.mood
  if intent.genres:
    session.genres = set(intent.genres)
