"""Reasons that never state a fact the catalogue metadata contradicts.

A generated reason is kept only when every checkable claim in it holds:
  - every year named is the item's year;
  - every catalogue genre named is a genre of the item (and of the liked
    item it is compared with, "..., like <title>");
  - "directed by X" names one of the item's directors (and the liked
    item's, when compared); "starring X" names a cast member;
  - "like <title>" names one of the items the user liked.
Otherwise `check_reason` returns None and the caller falls back to the
metadata template reason (`ilm_tasks.reason`) or `metadata_summary`.
"""

import re
from collections.abc import Sequence

from ilm_jax.serving import catalog as catalog_lib

MAX_REASON_CHARS = 160
_SHAPE = re.compile(r"^(?:It (?:is|was|has|stars)|Viewers who liked) .*[.!]$")
_YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")
_DIRECTED = re.compile(r"directed by ([^,.;]+?)(?:,|\.|;| like |$)", re.I)
_STARRING = re.compile(r"starring ([^,.;]+?)(?:,|\.|;| like |$)", re.I)
_LIKE = re.compile(r"\blike (.+?)\s*[.!]?$", re.I)


def _names(value: str) -> set[str]:
  return {n.strip().lower() for n in value.split(",") if n.strip()}


def first_sentences(text: str, count: int = 2) -> str:
  """The first `count` sentences of generated text, whitespace collapsed."""
  text = " ".join(text.split())
  parts = re.split(r"(?<=[.!?])\s+", text)
  return " ".join(parts[:count]).strip()


def check_reason(
  text: str,
  item: int,
  liked: Sequence[int],
  catalog: catalog_lib.Catalog,
) -> str | None:
  """The reason if metadata backs every claim in it, else None.

  Args:
    text: generated reason (what follows "Title." in the answer).
    item: the recommended catalogue row.
    liked: catalogue rows the user liked (what "like <title>" may name).
    catalog: titles and attributes.

  Returns:
    The cleaned reason (at most two sentences) or None.
  """
  reason = first_sentences(text, count=1)
  # Only the trained answer shapes ("It is ...", "Viewers who liked ...")
  # carry claims this check can verify; free text is not trusted.
  if not _SHAPE.match(reason) or len(reason) > MAX_REASON_CHARS:
    return None
  if reason.lower().startswith(catalog.titles[item].lower()):
    return None  # the title repeated is not a reason
  # "like <title>": the compared item must be one the user liked.
  compared = None
  like = _LIKE.search(reason)
  body = reason
  if like:
    named = like.group(1).strip().rstrip(".")
    titles = {catalog.titles[i].lower(): i for i in liked}
    compared = titles.get(named.lower())
    if compared is None:
      return None
    body = reason[: like.start()]
  if re.search(r"\d", _YEAR.sub("", body)):
    return None  # a number other than a year: nothing to check it against
  for year in _YEAR.findall(body):
    if year != catalog.years[item]:
      return None
  genres = catalog.genre_vocabulary
  lowered = body.lower()
  for word, genre in genres.items():
    if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", lowered):
      if genre not in catalog.genres(item):
        return None
      if compared is not None and genre not in catalog.genres(compared):
        return None
  for pattern, fields in (
    (_DIRECTED, ("director",)),
    (_STARRING, ("cast",)),
  ):
    for name in pattern.findall(body):
      known = set().union(*(_names(catalog.attribute(item, f)) for f in fields))
      if name.strip().lower() not in known:
        return None
      if compared is not None and fields == ("director",):
        if name.strip().lower() not in _names(
          catalog.attribute(compared, "director")
        ):
          return None
  return reason


def fix_articles(text: str) -> str:
  """ "a action movie" -> "an action movie" (template reasons)."""
  return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def metadata_summary(item: int, catalog: catalog_lib.Catalog) -> str:
  """A reason from the item's own metadata (no liked item to compare).

  E.g. "A 1999 action and sci-fi movie directed by Andy Wachowski."
  """
  genres = catalog.genres(item)
  kind = " and ".join(g.lower() for g in genres[:2]) or "popular"
  year = catalog.years[item]
  words = f"{year + ' ' if year else ''}{kind} movie"
  text = ("An " if words[0] in "aeiou8" else "A ") + words
  director = catalog.attribute(item, "director").split(",")[0].strip()
  if director:
    text += f" directed by {director}"
  return text + "."
