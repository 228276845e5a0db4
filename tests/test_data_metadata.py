"""Title handling and movie-metadata enrichment against a hand-written database."""

import pathlib
import sqlite3

import pytest

from ilm_jax.data import files, metadata, movielens, text

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize(
  "title, readable",
  [
    ("Shawshank Redemption, The", "The Shawshank Redemption"),
    (
      "Eighth Day, The (Le Huitième jour )",
      "The Eighth Day (Le Huitième jour )",
    ),
    ("Argent, L'", "L'Argent"),
    ("Misérables, Les", "Les Misérables"),
    ("Toy Story", "Toy Story"),
    ("Sense and Sensibility, Part A", "Sense and Sensibility, Part A"),
  ],
)
def test_readable_title(title, readable):
  assert text.readable_title(title) == readable


def test_title_helpers():
  assert text.normalize_title(
    "Shawshank Redemption, The"
  ) == text.normalize_title("The Shawshank Redemption")
  assert text.normalize_title("Amélie & Co.") == "amelie and co"
  assert text.split_year("Toy Story (1995)") == ("Toy Story", "1995")
  assert text.split_year("Heat") == ("Heat", "")
  assert text.title_variants(
    "City of Lost Children, The (Cité des enfants perdus, La)"
  ) == [
    "City of Lost Children, The (Cité des enfants perdus, La)",
    "City of Lost Children, The",
    "Cité des enfants perdus, La",
  ]
  assert (
    text.title_variants("Shall We Dance? (a.k.a. Shall We Dansu?)")[-1]
    == "Shall We Dansu?"
  )
  assert text.clean([["A", "B"], None, "x &amp; <i>y</i>"]) == "A, B, x & y"
  assert (
    text.item_text("T (1999)", {"genres": "Drama", "year": "1999", "brand": ""})
    == "T (1999). Genres: Drama."
  )


def make_db(path):
  connection = sqlite3.connect(path)
  connection.execute(
    "CREATE TABLE omdb (ID INTEGER, imdbID TEXT, Title TEXT, Year INTEGER,"
    ' Director TEXT, Writer TEXT, "Cast" TEXT)'
  )
  cast = "Bob Gunton, Clancy Brown, Gil Bellows, James Whitmore, Morgan Freeman"
  cast += ", Tim Robbins, William Sadler"  # 7 names; text keeps the first 6
  rows = [
    (1, "tt1", "The Shawshank Redemption", 1994, "Frank Darabont", "Frank Darabont", cast),
    (2, "tt2", "Heat", 1996, "Michael Mann", "Michael Mann", "Al Pacino, Robert De Niro"),
    (3, "tt3", "Les Misérables", 1995, "Claude Lelouch", "Claude Lelouch", ""),
    (4, "tt4", "Les Miserables", 1995, "Someone Else", "", ""),
    (5, "tt5", "Amélie", 2001, "Jean-Pierre Jeunet", "Guillaume Laurant", "Audrey Tautou"),
    (6, "tt6", "Toy Story", 1975, "Nobody", "", ""),
  ]  # fmt: skip
  connection.executemany("INSERT INTO omdb VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
  connection.commit()
  connection.close()


def test_enrich_counts_every_outcome(tmp_path):
  make_db(tmp_path / "movies.db")
  path = FIXTURES / "recbole_ml1m"
  raw = movielens.read_recbole(
    "ml1m", path / "ml-1m.inter", path / "ml-1m.item"
  )
  counts = metadata.enrich(raw.item_info, tmp_path / "movies.db")
  # Catalogue of 8: Shawshank (exact) and Amélie (exact, via the title before
  # its parenthesised original title); Heat 1995 -> 1996 (adjacent year); two
  # films normalise to "les miserables" 1995 (ambiguous); Toy Story's only
  # row is 20 years off; Jumanji, Obscure Film and Never Rated are absent.
  assert counts == {
    "catalog": 8,
    "matched": 3,
    "matched_exact_year": 2,
    "matched_adjacent_year": 1,
    "ambiguous": 1,
    "unmatched": 4,
    "no_year": 0,
  }
  shawshank = raw.item_info["Shawshank Redemption, The (1994)"]
  assert shawshank.attributes["imdb_id"] == "tt1"
  assert shawshank.text == (
    "The Shawshank Redemption (1994). Genres: Drama. "
    "Director: Frank Darabont. Writer: Frank Darabont. "
    "Cast: Bob Gunton, Clancy Brown, Gil Bellows, James Whitmore, "
    "Morgan Freeman, Tim Robbins."
  )
  assert (
    shawshank.title == "The Shawshank Redemption (1994)"
  )  # the title is kept apart
  assert raw.item_info["Heat (1995)"].attributes["director"] == "Michael Mann"
  assert "director" not in raw.item_info["Misérables, Les (1995)"].attributes


def test_bad_database(tmp_path):
  with pytest.raises(files.MissingFileError, match="movies.db"):
    metadata.load_index(tmp_path / "movies.db")
  sqlite3.connect(tmp_path / "empty.db").close()
  with pytest.raises(files.DataError, match="cannot read table omdb"):
    metadata.load_index(tmp_path / "empty.db")
