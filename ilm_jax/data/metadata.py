"""Director, writer and cast for MovieLens items from a CC0 movie database.

The database is `movies.db` from `bokeh-sampledata==2026.1` (Wikidata-derived,
CC0; fetched with ilm_jax.resources.MOVIE_METADATA). Its `omdb` table has one
row per film: ID, imdbID, Title, Year, Genre, Director, Writer, Cast, ... The
`tomatoes` table (critics' figures, no text) is not used.

MovieLens and the database spell titles differently ("Shawshank Redemption,
The" vs "The Shawshank Redemption"), so both sides go through
text.normalize_title and are matched on (title, year). MovieLens years are
sometimes one off (release vs premiere year), so an item with no match in its
own year may take a unique match from the adjacent years. A key that names
several films is ambiguous and left unmatched. Every outcome is counted.
"""

import collections
import os
import sqlite3

from ilm_jax.data import files, raw, text

# The cast column lists every credited actor alphabetically (not by billing);
# the first few keep item text short without pretending to rank them.
MAX_CAST = 6

_QUERY = 'SELECT imdbID, Title, Year, Director, Writer, "Cast" FROM omdb'


def load_index(db_path: os.PathLike) -> dict[tuple[str, int], list[tuple]]:
  """Reads the omdb table into (normalized title, year) -> rows.

  Args:
    db_path: the sqlite file.

  Returns:
    A dict from the match key to the rows (imdbID, Director, Writer, Cast)
    with that key.

  Raises:
    MissingFileError: the file is absent.
    DataError: the file is not a database with the expected table.
  """
  db_path = files.require_file(
    db_path, "the movie metadata database movies.db (sqlite, table omdb)"
  )
  index = collections.defaultdict(list)
  # Read-only URI: never create or modify a file in the resource cache.
  connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
  try:
    rows = connection.execute(_QUERY).fetchall()
  except sqlite3.DatabaseError as e:
    raise files.DataError(
      f"{db_path}: cannot read table omdb ({e}); expected columns imdbID, "
      "Title, Year, Director, Writer, Cast."
    ) from None
  finally:
    connection.close()
  for imdb_id, title, year, director, writer, cast in rows:
    if not title or year is None:
      continue
    index[(text.normalize_title(title), int(year))].append(
      (imdb_id, director, writer, cast)
    )
  return dict(index)


def _lookup(index, titles, year: int) -> tuple[str, tuple | None]:
  """Returns (outcome, row) for one item; outcome names the match kind."""
  keys = {text.normalize_title(t) for t in titles}
  for kind, years in (
    ("exact_year", (year,)),
    ("adjacent_year", (year - 1, year + 1)),
  ):
    candidates = {
      row for key in keys for y in years for row in index.get((key, y), ())
    }
    if len(candidates) == 1:
      return kind, candidates.pop()
    if len(candidates) > 1:
      return "ambiguous", None
  return "unmatched", None


def enrich(
  item_info: dict[str, raw.ItemInfo], db_path: os.PathLike
) -> dict[str, int]:
  """Adds director, writer, cast and imdb_id attributes to matching movies.

  Args:
    item_info: raw item id -> ItemInfo (MovieLens), updated in place. Items
      need `match_titles` and a four-digit "year" attribute to be matched.
    db_path: the movies.db file.

  Returns:
    Counts: catalogue size and items matched on the exact year, on an
    adjacent year, ambiguous, unmatched, or without a year.
  """
  index = load_index(db_path)
  counts = collections.Counter({"catalog": len(item_info)})
  for info in item_info.values():
    year = info.attributes.get("year", "")
    if not year.isdigit() or not info.match_titles:
      counts["no_year"] += 1
      continue
    outcome, row = _lookup(index, info.match_titles, int(year))
    counts[outcome] += 1
    if row is None:
      continue
    imdb_id, director, writer, cast = row
    names = [n.strip() for n in (cast or "").split(",") if n.strip()]
    info.attributes.update(
      imdb_id=imdb_id or "",
      director=text.clean(director),
      writer=text.clean(writer),
      cast=", ".join(names[:MAX_CAST]),
    )
  matched = counts["exact_year"] + counts["adjacent_year"]
  result = {
    "catalog": counts["catalog"],
    "matched": matched,
    "matched_exact_year": counts["exact_year"],
    "matched_adjacent_year": counts["adjacent_year"],
    "ambiguous": counts["ambiguous"],
    "unmatched": counts["unmatched"],
    "no_year": counts["no_year"],
  }
  return result
