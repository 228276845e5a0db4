"""Catalogue search: free-text item mentions -> catalogue items.

People type "the matrix", "Matrix", "matrix 1999", "The Matrx" or "star
wars" for catalogue titles such as "Matrix, The (1999)" or "The Matrix
(1999)". Every title is reduced to a key (lower case, punctuation dropped,
a trailing ", The" moved to the front, the year and leading article split
off), and a mention resolves in tiers, each with rapidfuzz scores in
0..100:

  exact     the key equals a title's key (or an alternative title's);
  typo      whole-title similarity (`fuzz.ratio`) >= `typo_cutoff`;
  partial   every word of the mention is a word of the title.

A tier with one item (after the year filter) resolves; a tier with several
is *ambiguous* (the caller asks which one, listing the candidates, most
popular first); no tier matching is *unknown* (reported, never guessed).
"""

import dataclasses
import functools
import re
import unicodedata
from collections.abc import Sequence

from rapidfuzz import fuzz, process

_YEAR = re.compile(r"\(?\b(1[89]\d\d|20\d\d)\b\)?\s*$")
_TRAILING_ARTICLE = re.compile(
  r"^(?P<rest>.*?),\s*(?P<article>the|a|an|les|la|le|l'|il|el|das|der|die)"
  r"(?P<tail>\s*[:(].*)?$",
  re.IGNORECASE,
)
_LEADING_ARTICLE = re.compile(r"^(the|a|an)\s+")
_ALT_TITLE = re.compile(
  r"\(([^()]*[^\d()][^()]*)\)"
)  # "(a.k.a. ...)", not years
MAX_CANDIDATES = 8  # listed in a clarifying question


def split_year(text: str) -> tuple[str, str]:
  """("The Matrix", "1999") from "The Matrix (1999)"; "" when no year."""
  match = _YEAR.search(text.strip())
  if not match or match.start() == 0:
    return text.strip(), ""
  return text[: match.start()].strip(), match.group(1)


def normalise(text: str) -> str:
  """Lower case, no accents or punctuation, article at the front, no year.

  "Matrix, The (1999)" -> "the matrix"; "Godfather: Part II, The" ->
  "the godfather part ii".
  """
  text, _ = split_year(text)
  match = _TRAILING_ARTICLE.match(text.strip())
  if match:
    text = f"{match['article']} {match['rest']}{match['tail'] or ''}"
  text = unicodedata.normalize("NFKD", text)
  text = "".join(c for c in text if not unicodedata.combining(c)).lower()
  text = text.replace("&", " and ")
  text = re.sub(r"[^\w\s]", " ", text)
  return " ".join(text.split())


def key(text: str) -> str:
  """`normalise` without a leading English article: the matching key."""
  return _LEADING_ARTICLE.sub("", normalise(text))


@dataclasses.dataclass(frozen=True)
class Match:
  """The outcome of resolving one mention.

  Attributes:
    mention: the text as the user typed it.
    status: "resolved", "ambiguous" or "unknown".
    item: the catalogue index when resolved, else -1.
    candidates: catalogue indices to choose from (ambiguous), best first.
    score: rapidfuzz similarity of the best candidate, 0..100.
  """

  mention: str
  status: str
  item: int = -1
  candidates: tuple[int, ...] = ()
  score: float = 0.0


class Catalog:
  """Title search over the items of an export, in CF-table row order."""

  def __init__(
    self,
    titles: Sequence[str],
    item_ids: Sequence[str] | None = None,
    attributes: dict[str, Sequence[str]] | None = None,
    popularity: Sequence[float] | None = None,
    typo_cutoff: float = 85.0,
  ):
    """Args:
    titles: item titles (index = catalogue row).
    item_ids: raw item ids (default: the row numbers as strings).
    attributes: field -> per-item values ("" where unknown), e.g. "genres"
      (comma-separated), "year", "director", "cast".
    popularity: per-item interaction counts; orders ambiguous candidates.
    typo_cutoff: least `fuzz.ratio` (0..100) for a whole-title typo match.
    """
    self.titles = list(titles)
    if item_ids is None:
      item_ids = range(len(self.titles))
    self.item_ids = [str(i) for i in item_ids]
    self.attributes = {k: list(v) for k, v in (attributes or {}).items()}
    if popularity is None:
      popularity = [0.0] * len(self.titles)
    self.popularity = [float(p) for p in popularity]
    self.typo_cutoff = typo_cutoff
    self._id_to_index = {raw: n for n, raw in enumerate(self.item_ids)}
    self.years = [
      self.attributes.get("year", [""] * len(titles))[n] or split_year(title)[1]
      for n, title in enumerate(self.titles)
    ]
    # One key per title plus any alternative title in parentheses.
    self._keys, self._owners = [], []
    for n, title in enumerate(self.titles):
      base, _ = split_year(title)
      variants = {key(_ALT_TITLE.sub("", base)) or key(base)}
      variants |= {key(alt) for alt in _ALT_TITLE.findall(base)}
      for variant in sorted(v for v in variants if v):
        self._keys.append(variant)
        self._owners.append(n)
    self._words = [set(k.split()) for k in self._keys]

  def __len__(self) -> int:
    return len(self.titles)

  @functools.cached_property
  def genre_vocabulary(self) -> dict[str, str]:
    """Lower-case genre -> catalogue genre, over every item."""
    return {g.lower(): g for i in range(len(self)) for g in self.genres(i)}

  def genres(self, item: int) -> list[str]:
    """The item's genres (possibly empty)."""
    value = self.attributes.get("genres", [""] * len(self))[item]
    return [g.strip() for g in value.split(",") if g.strip()]

  def attribute(self, item: int, field: str) -> str:
    return self.attributes.get(field, [""] * len(self))[item]

  def index_of(self, item_id: str) -> int | None:
    """The catalogue row of a raw item id, or None."""
    return self._id_to_index.get(str(item_id))

  def _ranked(self, items) -> tuple[int, ...]:
    unique = sorted(set(items), key=lambda i: (-self.popularity[i], i))
    return tuple(unique)

  def _decide(self, mention, items, score) -> Match:
    items = self._ranked(items)
    if len(items) == 1:
      return Match(mention, "resolved", items[0], items, score)
    return Match(mention, "ambiguous", -1, items, score)

  def resolve(self, mention: str) -> Match:
    """Resolves one mention (a title as a person would type it)."""
    text = mention.strip().strip("\"'“”‘’").strip()
    if text.isdigit() and self.index_of(text) is not None:
      return Match(mention, "resolved", self.index_of(text), (), 100.0)
    exact = [n for n, t in enumerate(self.titles) if t == text]
    if exact:
      return self._decide(mention, exact, 100.0)
    base, year = split_year(text)
    query = key(base)
    if len(query) < 2:
      return Match(mention, "unknown")

    def with_year(items):
      if not year:
        return items
      return [i for i in items if self.years[i] == year]

    exact = with_year(
      [self._owners[k] for k, v in enumerate(self._keys) if v == query]
    )
    if exact:
      return self._decide(mention, exact, 100.0)
    scored = process.extract(
      query,
      self._keys,
      scorer=fuzz.ratio,
      score_cutoff=self.typo_cutoff,
      limit=4 * MAX_CANDIDATES,
    )
    typo = with_year([self._owners[k] for _, _, k in scored])
    if typo:
      best = scored[0][1]
      # A clear winner (5 points ahead) resolves; near-ties are ambiguous.
      close = with_year(
        [self._owners[k] for _, s, k in scored if s >= best - 5]
      )
      return self._decide(mention, close, best)
    words = set(query.split())
    partial = with_year(
      [self._owners[k] for k, w in enumerate(self._words) if words <= w]
    )
    if partial:
      return self._decide(mention, partial, 90.0)
    return Match(mention, "unknown")

  def search(self, query: str, limit: int = 10) -> list[tuple[int, float]]:
    """Items whose titles best match `query`: [(index, score 0..100)].

    For a search box: every word-subset match first (most popular first),
    then the closest titles by `fuzz.WRatio`, no item twice.
    """
    base, year = split_year(query)
    text = key(base)
    if not text:
      return []
    words = set(text.split())
    found: dict[int, float] = {}
    for k in self._ranked(
      self._owners[k] for k, w in enumerate(self._words) if words <= w
    ):
      if not year or self.years[k] == year:
        found.setdefault(k, 100.0)
    for _, score, k in process.extract(
      text, self._keys, scorer=fuzz.WRatio, limit=4 * limit, score_cutoff=60
    ):
      item = self._owners[k]
      if not year or self.years[item] == year:
        found.setdefault(item, float(score))
    ranked = sorted(found.items(), key=lambda kv: -kv[1])
    return ranked[:limit]
