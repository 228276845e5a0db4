"""Item titles and item text: one way to write them for every source.

MovieLens writes titles library-style ("Shawshank Redemption, The (1994)").
Phase 2 decodes titles with a language model, so we keep a readable form
("The Shawshank Redemption (1994)") as the item title and build the longer
item text from labelled fields in a fixed order:

  "The Shawshank Redemption (1994). Genres: Crime, Drama. Director: ..."

The same normalisation (accents, articles, punctuation folded) serves the
title+year matching against the movie metadata database.
"""

import html
import re
import unicodedata
from collections.abc import Mapping

# Trailing articles MovieLens moves behind the title, in the languages that
# occur in its catalogue. "I" (Italian plural) is left out: "Robot, I" style
# English titles would be mangled.
_ARTICLES = (
    "The", "A", "An", "Les", "La", "Le", "L'", "Il", "Das", "Der", "Die",
    "Den", "Det", "El", "Lo", "Los", "Las", "Gli", "Un", "Une", "Des",
)  # fmt: skip
_TRAILING_ARTICLE = re.compile(
  r"^(?P<main>.+?), (?P<article>"
  + "|".join(re.escape(a) for a in _ARTICLES)
  + r")(?P<rest> \(.*\))?$"
)
_TRAILING_YEAR = re.compile(r"^(?P<title>.*\S)\s*\((?P<year>\d{4})\)\s*$")
_PARENTHESISED = re.compile(r"^(?P<main>.*?)\s*\((?P<inner>[^()]*)\)\s*$")
_TAGS = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")

# Order and labels of the fields that make up an item's text. Fields not
# listed here (e.g. "year", already in the title) stay attributes only.
TEXT_FIELDS = (
  "genres",
  "director",
  "writer",
  "cast",
  "brand",
  "categories",
  "description",
)

# Descriptions in the Amazon dumps run to thousands of characters; the text
# encoders read a few dozen tokens, and storage is per item.
MAX_FIELD_CHARS = 1000


def readable_title(title: str) -> str:
  """Moves a trailing article to the front: "Heat, The (Le x)" -> "The Heat (Le x)".

  Args:
    title: a title without the year suffix.

  Returns:
    The title as it would be spoken.
  """
  match = _TRAILING_ARTICLE.match(title)
  if not match:
    return title
  article = match.group("article")
  sep = "" if article.endswith("'") else " "
  return f"{article}{sep}{match.group('main')}{match.group('rest') or ''}"


def split_year(title: str) -> tuple[str, str]:
  """Splits "Toy Story (1995)" into ("Toy Story", "1995"); year "" if none."""
  match = _TRAILING_YEAR.match(title)
  if not match:
    return title.strip(), ""
  return match.group("title"), match.group("year")


def with_year(title: str, year: str) -> str:
  """Returns "title (year)", or the title alone when the year is unknown."""
  return f"{title} ({year})" if year else title


def title_variants(title: str) -> list[str]:
  """Returns the title and its parenthesised alternative, if any.

  MovieLens adds original-language or a.k.a. titles in parentheses:
  "City of Lost Children, The (Cité des enfants perdus, La)".

  Args:
    title: a title without the year suffix.

  Returns:
    [title] plus [main part, parenthesised part] when present.
  """
  variants = [title]
  match = _PARENTHESISED.match(title)
  if match and match.group("main"):
    inner = match.group("inner")
    if inner.lower().startswith("a.k.a. "):
      inner = inner[len("a.k.a. ") :]
    variants += [match.group("main"), inner]
  return variants


def normalize_title(title: str) -> str:
  """Folds a title for matching: no accents, article first, lower case, words only.

  Args:
    title: any title form.

  Returns:
    A key such that "Shawshank Redemption, The" and "The Shawshank
    Redemption" compare equal.
  """
  title = readable_title(title.strip())
  title = unicodedata.normalize("NFKD", title)
  title = "".join(ch for ch in title if not unicodedata.combining(ch)).lower()
  title = title.replace("&", " and ")
  return " ".join(re.findall(r"[a-z0-9]+", title))


def clean(value) -> str:
  """Turns a metadata value into one line of plain text.

  Lists (Amazon descriptions, category paths) are joined; HTML entities and
  tags, which the 2018 Amazon metadata keeps, are removed.

  Args:
    value: a string, a number, None, or a (nested) list of those.

  Returns:
    A whitespace-normalised string, possibly empty.
  """
  if value is None:
    return ""
  if isinstance(value, list | tuple):
    parts = [clean(v) for v in value]
    return ", ".join(p for p in parts if p)
  # Tags become spaces so "<p>a</p><p>b</p>" keeps its words apart; a
  # space that lands before punctuation ("<b>hair</b>.") is then removed.
  text = html.unescape(_TAGS.sub(" ", str(value)))
  text = _SPACES.sub(" ", text).strip()
  return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)


def item_text(title: str, attributes: Mapping[str, str]) -> str:
  """Builds an item's description text from its title and fields.

  Args:
    title: the readable title (with year where known).
    attributes: field name -> value; empty values and fields not in
      TEXT_FIELDS are left out.

  Returns:
    "Title. Genres: a, b. Director: c." and so on.
  """
  parts = [title.rstrip(".") + "."]
  for field in TEXT_FIELDS:
    value = attributes.get(field, "")
    if value:
      if len(value) > MAX_FIELD_CHARS:
        value = value[:MAX_FIELD_CHARS].rsplit(" ", 1)[0] + " ..."
      parts.append(f"{field.capitalize()}: {value.rstrip('.')}.")
  return " ".join(parts)
