"""OpenP5 user_sequence.txt (+ item_texts.tsv) on a hand-written fixture.

The fixture holds the same interactions as the MovieLens fixtures (see
test_data_movielens.py), already in time order, with item numbers
T=1 H=2 M=3 S=4 A=5 J=6 X=7, plus a blank line and a user "7" with no items.
No ratings: every training interaction is a user-item positive.
"""

import pathlib

import pytest

from ilm_jax.data import files, openp5, processing
from tests import data_helpers

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
LETTER = {"1": "T", "2": "H", "3": "M", "4": "S", "5": "A"}


def test_openp5_fixture():
  found = openp5.find(FIXTURES / "openp5")
  assert set(found) == {"sequences", "item_texts"}
  ds = processing.process(openp5.read(found))
  assert ds.user_ids == ["1", "2", "3", "4", "5"]
  assert ds.item_ids == ["1", "2", "3", "4", "5"]
  sequences = [
    "".join(LETTER[ds.item_ids[i]] for i in ds.sequence(u)) for u in range(5)
  ]
  assert sequences == ["TMSHA", "AHMST", "STAMH", "THASM", "AHSTM"]
  stats = ds.stats
  assert stats["interactions"] == 25
  assert stats["dropped"] == {
    "blank_lines": 1,
    "users_without_items": 1,
    "duplicate_rows": 0,
    "kcore_item": 5,
    "kcore_user": 4,
  }
  assert stats["positive_rule"] == "every interaction"
  assert (
    stats["items_without_metadata"] == 1
  )  # item 5 has no line in item_texts.tsv
  # Without ratings, every item of every training part is a positive.
  assert ds.user_item_pairs.tolist() == [
    [u, i]
    for u in range(5)
    for i in data_helpers.train_sequence(ds, u).tolist()
  ]
  assert ds.item_titles == [
    "Toy Story (1995)",
    "Heat (1995)",
    "Les Misérables (1995)",
    "The Shawshank Redemption (1994)",
    "5",
  ]
  assert (
    ds.item_texts[0]
    == "Toy Story (1995). Description: A cowboy doll is threatened by a new spaceman toy."
  )
  assert ds.item_texts[1] == "Heat (1995)."
  # Positions stand in for timestamps.
  assert ds.timestamps[: ds.sequence_offsets[1]].tolist() == [0, 1, 3, 4, 5]


def test_sequence_file_may_be_named_directly():
  found = openp5.find(FIXTURES / "openp5" / "user_sequence.txt")
  assert found["sequences"].name == "user_sequence.txt"


def test_repeated_user_is_an_error(tmp_path):
  (tmp_path / "user_sequence.txt").write_text("1 10 11\n2 10\n1 12\n")
  with pytest.raises(
    files.FormatError,
    match=r"user_sequence.txt:3: user '1' already has a line \(1\)",
  ):
    openp5.read(openp5.find(tmp_path))


def test_bad_item_text_line(tmp_path):
  (tmp_path / "user_sequence.txt").write_text("1 10 11\n")
  (tmp_path / "item_texts.tsv").write_text("10\tTen\n11 Eleven\n")
  with pytest.raises(
    files.FormatError,
    match=r"item_texts.tsv:2: expected `item<TAB>title`.*'11 Eleven'",
  ):
    openp5.read(openp5.find(tmp_path))


def test_missing_and_empty_inputs(tmp_path):
  with pytest.raises(files.MissingFileError, match=r"user_sequence.txt"):
    openp5.find(tmp_path)
  with pytest.raises(files.MissingFileError, match="set --path"):
    openp5.find("")
  (tmp_path / "user_sequence.txt").write_text("\n7\n")
  with pytest.raises(files.EmptyDatasetError, match="no interactions found"):
    openp5.read(openp5.find(tmp_path))
