"""Amazon 5-core reviews + metadata (2014 Python literals, 2018 JSON, gzip).

The reviews fixture holds the interactions of the MovieLens fixtures (see
test_data_movielens.py) as reviews. Reviewer ids are chosen so that sorted
order differs from file order: file users 1..5 are A3ALPHA, A1BRAVO,
A2CHARLIE, A9DELTA, A0ECHO (user 6, A5FOXTROT, is dropped by the k-core),
so indices 0..4 are A0ECHO(5), A1BRAVO(2), A2CHARLIE(3), A3ALPHA(1),
A9DELTA(4). Asins B00<NAME><n> sort as A H M S T.
"""

import gzip
import json
import pathlib
import shutil

import pytest

from ilm_jax.data import amazon, files, processing

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
LETTER = {
  "B00AME0005": "A",
  "B00HEA0004": "H",
  "B00MIS0002": "M",
  "B00SHA0003": "S",
  "B00TOY0001": "T",
}


def letter_sequences(ds):
  return [
    "".join(LETTER[ds.item_ids[i]] for i in ds.sequence(u))
    for u in range(ds.num_users)
  ]


def test_amazon_2014_fixture():
  ds = processing.process(amazon.read(amazon.find(FIXTURES / "amazon")))
  assert ds.user_ids == ["A0ECHO", "A1BRAVO", "A2CHARLIE", "A3ALPHA", "A9DELTA"]
  assert ds.item_ids == sorted(LETTER)
  assert letter_sequences(ds) == ["AHSTM", "AHMST", "STAMH", "TMSHA", "THASM"]
  stats = ds.stats
  assert stats["interactions"] == 25
  assert stats["dropped"] == {
    "duplicate_rows": 0,
    "kcore_item": 5,
    "kcore_user": 4,
  }
  assert stats["metadata_unused"] == 1  # B00UNUSED9 has metadata but no review
  assert stats["metadata_without_title"] == 1  # B00HEA0004
  texts = dict(zip(ds.item_ids, ds.item_texts, strict=True))
  assert texts["B00TOY0001"] == (
    "Toy's Story Lotion. Brand: Acme. "
    "Categories: Beauty > Skin Care > Body; Beauty > Bath. "
    "Description: Soft & smooth."
  )
  assert texts["B00SHA0003"] == (
    "Shawshank Shampoo. Categories: Beauty > Hair Care > Shampoo. Description: Cleans hair."
  )
  assert texts["B00HEA0004"] == "B00HEA0004. Categories: Beauty > Tools."
  assert ds.item_titles[ds.item_ids.index("B00MIS0002")] == "Misérables Perfume"
  # Positives (overall >= 4) from training parts: A0ECHO A5 H5 S5;
  # A1BRAVO A4 H3 M5; A2CHARLIE S3 T3 A4; A3ALPHA T5 M4 S3; A9DELTA T1 H4 A4.
  positives = [
    "".join(LETTER[ds.item_ids[i]] for u2, i in ds.user_item_pairs if u2 == u)
    for u in range(5)
  ]
  assert positives == ["AHS", "AM", "A", "TM", "HA"]


def test_gzipped_dumps_read_the_same(tmp_path):
  for name in ("reviews_Beauty_5.json", "meta_Beauty.json"):
    with (
      open(FIXTURES / "amazon" / name, "rb") as src,
      gzip.open(tmp_path / f"{name}.gz", "wb") as dst,
    ):
      shutil.copyfileobj(src, dst)
  found = amazon.find(tmp_path)
  assert found["reviews"].name == "reviews_Beauty_5.json.gz"
  plain = processing.process(amazon.read(amazon.find(FIXTURES / "amazon")))
  zipped = processing.process(amazon.read(found))
  assert zipped.item_texts == plain.item_texts
  assert zipped.sequence_items.tolist() == plain.sequence_items.tolist()


def test_2018_strict_json_metadata(tmp_path):
  shutil.copy(
    FIXTURES / "amazon" / "reviews_Beauty_5.json", tmp_path / "Beauty_5.json"
  )
  record = {
    "asin": "B00TOY0001",
    "title": "Toy &amp; Story",
    "brand": "Acme",
    "category": ["Beauty", "Skin Care"],
    "description": ["<p>Line one.</p>", "Line two."],
  }
  (tmp_path / "meta_Beauty.json").write_text(json.dumps(record) + "\n")
  ds = processing.process(amazon.read(amazon.find(tmp_path)))
  t = ds.item_ids.index("B00TOY0001")
  assert ds.item_texts[t] == (
    "Toy & Story. Brand: Acme. Categories: Beauty > Skin Care. Description: Line one., Line two."
  )
  assert ds.stats["items_without_metadata"] == 4


def test_review_errors_name_line_and_content(tmp_path):
  lines = (
    (FIXTURES / "amazon" / "reviews_Beauty_5.json").read_text().splitlines()
  )
  bad = json.loads(lines[1])
  del bad["overall"]
  (tmp_path / "reviews_X_5.json").write_text(
    "\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n"
  )
  with pytest.raises(
    files.FormatError,
    match=r"reviews_X_5.json:2: review lacks field\(s\) \['overall'\].*A3ALPHA",
  ):
    amazon.read(amazon.find(tmp_path))
  (tmp_path / "reviews_X_5.json").write_text(lines[0] + "\n{not json\n")
  with pytest.raises(
    files.FormatError,
    match=r":2: neither JSON nor a Python literal. Line content: '\{not json'",
  ):
    amazon.read(amazon.find(tmp_path))


def test_file_discovery_errors(tmp_path):
  with pytest.raises(
    files.MissingFileError, match=r"5-core reviews file.*reviews_\*\.json"
  ):
    amazon.find(tmp_path)
  (tmp_path / "reviews_A_5.json").write_text("")
  (tmp_path / "reviews_B_5.json").write_text("")
  with pytest.raises(
    files.DataError, match=r"several candidates.*reviews_A_5.json"
  ):
    amazon.find(tmp_path)
