"""MovieLens readers on hand-written fixtures, against hand-computed splits.

All three fixtures (tests/fixtures/data) hold the same 34 ratings, written in
the RecBole copy's layout (CRLF, UTF-8, titles as ids), GroupLens ml-1m
(`::`, latin-1) and GroupLens ml-100k (tabs and `|`, latin-1). Items are named
by letter here:

  T Toy Story (1995)          J Jumanji (1995)      rated by users 1-4 and 6
  M Misérables, Les (1995)    X Obscure Film (1990) rated by user 6 only
  S Shawshank Redemption...   N Never Rated (1980)  in the catalogue only
  H Heat (1995)
  A Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)

Users 1-5 rate T M S H A; users 1-4 also J; user 6 rates J T M S X.
5-core by hand: round 1 drops X (1 row, item rule), then user 6 is left with
4 ratings (4 rows, user rule); round 2: J is left with 4 ratings (4 rows,
item rule); round 3 changes nothing. 25 rows remain, 5 per user.

Time order, ties kept in file order:
  user 1: T100 M200 (J250) S300 H300 A400 -> S before H (file order)
  user 2: A50 H60 M70 (J75) S80 T90
  user 3: all at 500, file order J S T A M H
  user 4: T10 (J20) H30 A40 S50 M60
  user 5: file order M5 T4 S3 H2 A1 -> A H S T M
"""

import pathlib
import shutil

import pytest

from ilm_jax.data import files, movielens, processing
from tests import data_helpers

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"

EXPECTED_SEQUENCES = ["TMSHA", "AHMST", "STAMH", "THASM", "AHSTM"]
# Ratings of the training parts (items[:-2]) decide the positives (>= 4):
# user 1 T5 M4 S3; user 2 A4 H3 M5; user 3 S3 T3 A4; user 4 T1 H4 A4;
# user 5 A5 H5 S5.
EXPECTED_POSITIVES = ["TM", "AM", "A", "HA", "AHS"]

TITLES = {
  "T": "Toy Story (1995)",
  "M": "Misérables, Les (1995)",
  "S": "Shawshank Redemption, The (1994)",
  "H": "Heat (1995)",
  "A": "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)",
}


def letters(ds, letter_of_id, seq):
  return "".join(letter_of_id[ds.item_ids[i]] for i in seq)


def check_protocol(ds, letter_of_id):
  """Checks everything the fixture determines, whatever the id layout."""
  assert ds.num_users == 5 and ds.num_items == 5
  got = [letters(ds, letter_of_id, ds.sequence(u)) for u in range(5)]
  assert got == EXPECTED_SEQUENCES
  for u, seq in enumerate(EXPECTED_SEQUENCES):
    assert (
      letters(ds, letter_of_id, data_helpers.train_sequence(ds, u)) == seq[:-2]
    )
    assert (
      letter_of_id[ds.item_ids[data_helpers.valid_target(ds, u)]] == seq[-2]
    )
    assert letter_of_id[ds.item_ids[data_helpers.test_target(ds, u)]] == seq[-1]
  stats = ds.stats
  assert stats["raw_interactions"] == 34
  assert stats["interactions"] == 25
  assert stats["dropped"] == {
    "duplicate_rows": 0,
    "kcore_item": 5,
    "kcore_user": 4,
  }
  assert stats["kcore_rounds"] == 3
  assert (stats["train_examples"], stats["valid"], stats["test"]) == (10, 5, 5)
  # User 1: S and H at 300; user 3: six rows at 500, J dropped -> 4 ties.
  assert stats["tied_timestamps"] == 1 + 4
  # Catalogue: the 5 kept items, J, X and N; only N was never rated.
  assert stats["catalog_items"] == 8
  assert stats["catalog_items_never_interacted"] == 1

  item_pairs = [
    (letter_of_id[ds.item_ids[a]], letter_of_id[ds.item_ids[b]])
    for a, b in ds.item_item_pairs
  ]
  expected_pairs = [
    (s[i], s[i + 1]) for s in EXPECTED_SEQUENCES for i in range(2)
  ]
  assert item_pairs == expected_pairs
  positives = [
    (int(u), letter_of_id[ds.item_ids[i]]) for u, i in ds.user_item_pairs
  ]
  assert positives == [
    (u, x) for u, items in enumerate(EXPECTED_POSITIVES) for x in items
  ]


def test_recbole_copy_crlf_utf8_titles_as_ids():
  path = FIXTURES / "recbole_ml1m"
  assert b"\r\n" in (path / "ml-1m.inter").read_bytes()  # the fixture is CRLF
  ds = processing.process(
    movielens.read_recbole("ml1m", path / "ml-1m.inter", path / "ml-1m.item")
  )
  letter_of_id = {title: letter for letter, title in TITLES.items()}
  check_protocol(ds, letter_of_id)
  # Indices follow the sorted raw ids (here titles), not first appearance.
  assert ds.item_ids == sorted(TITLES.values())
  assert ds.user_ids == ["1m_1", "1m_2", "1m_3", "1m_4", "1m_5"]
  m = ds.item_ids.index(TITLES["M"])
  assert ds.item_titles[m] == "Les Misérables (1995)"
  assert ds.item_texts[m] == "Les Misérables (1995). Genres: Drama, Musical."
  assert ds.item_attributes["year"][m] == "1995"
  s = ds.item_ids.index(TITLES["S"])
  assert ds.item_titles[s] == "The Shawshank Redemption (1994)"
  # The article sits inside the parenthesised title here: left alone.
  assert ds.item_titles[ds.item_ids.index(TITLES["A"])] == TITLES["A"]


def test_grouplens_ml1m_latin1_double_colon():
  found = movielens.find_grouplens(
    FIXTURES / "grouplens_ml1m"
  )  # parent dir works
  ds = processing.process(movielens.read_grouplens(found))
  letter_of_id = {"1": "T", "73": "M", "318": "S", "6": "H", "4973": "A"}
  check_protocol(ds, letter_of_id)
  assert ds.item_ids == ["1", "6", "73", "318", "4973"]  # numeric order
  assert ds.item_titles[ds.item_ids.index("73")] == "Les Misérables (1995)"
  assert ds.stats["layout"] == "ml-1m"


def test_grouplens_ml100k_tabs_and_pipes():
  found = movielens.find_grouplens(FIXTURES / "grouplens_ml100k" / "ml-100k")
  ds = processing.process(movielens.read_grouplens(found))
  letter_of_id = {"1": "T", "7": "M", "64": "S", "20": "H", "300": "A"}
  check_protocol(ds, letter_of_id)
  h = ds.item_ids.index("20")
  # u.item writes "Heat" without a year; it comes from the release date.
  assert ds.item_titles[h] == "Heat (1995)"
  assert ds.item_texts[h] == "Heat (1995). Genres: Action, Crime, Thriller."
  assert ds.item_titles[ds.item_ids.index("7")] == "Les Misérables (1995)"


def copy_recbole(tmp_path):
  target = tmp_path / "recbole"
  shutil.copytree(FIXTURES / "recbole_ml1m", target)
  return target


def test_malformed_row_names_file_line_and_content(tmp_path):
  path = copy_recbole(tmp_path)
  inter = path / "ml-1m.inter"
  lines = inter.read_bytes().split(b"\r\n")
  lines[3] = b"1m_1\tMy Fair Lady (1964)\t3"  # a field short
  inter.write_bytes(b"\r\n".join(lines))
  with pytest.raises(files.FormatError) as info:
    movielens.read_recbole("ml1m", inter, path / "ml-1m.item")
  message = str(info.value)
  assert str(inter) in message
  assert ":4:" in message
  assert "expected 4 tab-separated fields, got 3" in message
  assert "My Fair Lady (1964)" in message
  assert info.value.line_number == 4


def test_bad_number_names_the_field(tmp_path):
  path = copy_recbole(tmp_path)
  inter = path / "ml-1m.inter"
  inter.write_bytes(
    inter.read_bytes().replace(b"\t5\t100\r\n", b"\tfive\t100\r\n", 1)
  )
  with pytest.raises(
    files.FormatError, match=r":2: field 'rating' is not a number: 'five'"
  ):
    movielens.read_recbole("ml1m", inter, path / "ml-1m.item")


def test_latin1_bytes_in_a_utf8_file_are_located(tmp_path):
  path = copy_recbole(tmp_path)
  item = path / "ml-1m.item"
  item.write_bytes(
    item.read_bytes().replace("é".encode(), "é".encode("latin-1"))
  )
  with pytest.raises(files.FormatError, match=r"ml-1m.item:3: not valid utf-8"):
    movielens.read_recbole("ml1m", path / "ml-1m.inter", item)


def test_missing_files_say_what_is_expected_where(tmp_path):
  with pytest.raises(files.MissingFileError, match="ratings.dat") as info:
    movielens.find_grouplens(tmp_path)
  assert str(tmp_path) in str(info.value)
  (tmp_path / "ratings.dat").write_text("1::1::5::1\n")
  with pytest.raises(
    files.MissingFileError,
    match=r"ml-1m movies \(MovieID::Title::Genres\) at .*movies.dat",
  ):
    movielens.find_grouplens(tmp_path)
  with pytest.raises(files.MissingFileError, match="set --path"):
    movielens.find_grouplens("")
  with pytest.raises(
    files.MissingFileError, match=r"RecBole .inter file at .*nowhere.inter"
  ):
    movielens.read_recbole(
      "ml1m", tmp_path / "nowhere.inter", tmp_path / "nowhere.item"
    )
