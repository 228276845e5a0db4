"""Every reader against the input faults users bring (issue 16).

Each test copies a clean fixture of tests/fixtures/data (all five hold the
same hand-checked 5-user dataset; see test_data_movielens.py), damages it
the way real files are damaged, and checks the outcome:

- byte-order marks, UTF-8 re-saves of latin-1 files, stray spaces around
  ids, gzip/bzip2/xz compression: the SAME processed dataset as the clean
  fixture (whose values the other test files check by hand);
- truncated compressed files, out-of-range numbers, UTF-16 text: an error
  naming the file (and line and field where there is one).

tests/fixtures/data/bad_input/ holds damaged files that are awkward to make
on the fly (a cut gzip stream, a UTF-16 file).
"""

import bz2
import gzip
import lzma
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ilm_jax.data import amazon, files, movielens, openp5, processing

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
BAD = FIXTURES / "bad_input"
REPO = pathlib.Path(__file__).parent.parent


def _pad_columns(sep, columns):
  """A line mutation padding the given `sep`-separated columns with spaces."""

  def mutate(line_number, line):
    fields = line.split(sep)
    for c in columns:
      if c < len(fields) and line_number % 2:
        fields[c] = f" {fields[c]}  "
      elif c < len(fields):
        fields[c] = f"{fields[c]} "
    return sep.join(fields)

  return mutate


def _pad_json(*keys):
  """Pads the string values of `keys` in JSON or Python-literal lines."""
  pattern = re.compile(
    r"""(['"](?:""" + "|".join(keys) + r""")['"]\s*:\s*['"])([^'"]*)"""
  )

  def mutate(line_number, line):
    del line_number
    return pattern.sub(lambda m: f"{m.group(1)} {m.group(2)} ", line)

  return mutate


# reader -> fixture folder, files (relative) with their legacy encoding and
# how to pad their id fields, and how to build the dataset from a folder.
READERS = {
  "recbole": dict(
    fixture="recbole_ml1m",
    files={
      "ml-1m.inter": (None, _pad_columns("\t", (0, 1))),
      "ml-1m.item": (None, _pad_columns("\t", (0,))),
    },
    build=lambda d: movielens.read_recbole(
      "ml1m", d / "ml-1m.inter", d / "ml-1m.item"
    ),
  ),
  "grouplens_ml1m": dict(
    fixture="grouplens_ml1m",
    files={
      "ml-1m/ratings.dat": ("latin-1", _pad_columns("::", (0, 1))),
      "ml-1m/movies.dat": ("latin-1", _pad_columns("::", (0,))),
    },
    build=lambda d: movielens.read_grouplens(movielens.find_grouplens(d)),
  ),
  "grouplens_ml100k": dict(
    fixture="grouplens_ml100k",
    files={
      "ml-100k/u.data": ("latin-1", _pad_columns("\t", (0, 1))),
      "ml-100k/u.item": ("latin-1", _pad_columns("|", (0,))),
    },
    build=lambda d: movielens.read_grouplens(movielens.find_grouplens(d)),
  ),
  "openp5": dict(
    fixture="openp5",
    files={
      "user_sequence.txt": (
        None,
        lambda n, line: f" {line}  ".replace(" ", "  "),
      ),
      "item_texts.tsv": (None, _pad_columns("\t", (0,))),
    },
    build=lambda d: openp5.read(openp5.find(d)),
  ),
  "amazon": dict(
    fixture="amazon",
    files={
      "reviews_Beauty_5.json": (None, _pad_json("reviewerID", "asin")),
      "meta_Beauty.json": (None, _pad_json("asin")),
    },
    build=lambda d: amazon.read(amazon.find(d)),
  ),
}
# Readers with timestamps and ratings: the file, 1-based line, the field's
# name in errors and how to put a value into that line.
NUMERIC = {
  "recbole": ("ml-1m.inter", 2, "timestamp", "rating", "\t", 3, 2),
  "grouplens_ml1m": ("ml-1m/ratings.dat", 1, "Timestamp", "Rating", "::", 3, 2),
  "grouplens_ml100k": ("ml-100k/u.data", 1, "timestamp", "rating", "\t", 3, 2),
}


def copy_fixture(reader, tmp_path) -> pathlib.Path:
  target = tmp_path / reader
  shutil.copytree(FIXTURES / READERS[reader]["fixture"], target)
  return target


def build(reader, directory):
  return processing.process(READERS[reader]["build"](directory))


def signature(ds):
  """Everything a processed dataset holds, except the encoding notes."""
  stats = {k: v for k, v in ds.stats.items() if k != "encodings"}
  ratings = np.nan_to_num(ds.ratings, nan=-1.0)  # NaN != NaN (OpenP5)
  arrays = (ds.sequence_offsets, ds.sequence_items, ratings, ds.timestamps)
  return (
    ds.user_ids,
    ds.item_ids,
    ds.item_titles,
    ds.item_texts,
    [a.tolist() for a in arrays],
    ds.user_item_pairs.tolist(),
    stats,
  )


def rewrite(path: pathlib.Path, legacy, mutate=None, bom=False, encode=None):
  """Decodes `path`, mutates its lines, writes it back (UTF-8 by default)."""
  text = path.read_bytes().decode(legacy or "utf-8")
  lines = text.split("\n")
  if mutate is not None:
    lines = [
      mutate(n, line) if line.strip() else line
      for n, line in enumerate(lines, start=1)
    ]
  data = "\n".join(lines).encode(encode or legacy or "utf-8")
  path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


@pytest.fixture(scope="module")
def clean():
  return {
    reader: signature(build(reader, FIXTURES / READERS[reader]["fixture"]))
    for reader in READERS
  }


def test_clean_fixtures_hold_the_hand_checked_dataset(clean):
  # The baseline every test below compares with: 5 users, 5 items, 25 rows.
  for reader, (users, items, *_, stats) in clean.items():
    assert (len(users), len(items), stats["interactions"]) == (5, 5, 25), reader
    assert stats["dropped"]["duplicate_rows"] == 0
  titles = clean["grouplens_ml100k"][2]
  assert "Les Misérables (1995)" in titles


@pytest.mark.parametrize("reader", READERS)
def test_byte_order_marks_are_removed(reader, tmp_path, clean):
  directory = copy_fixture(reader, tmp_path)
  for name, (legacy, _) in READERS[reader]["files"].items():
    # A BOM says UTF-8: GroupLens files get re-saved as UTF-8 with one.
    rewrite(directory / name, legacy, bom=True, encode="utf-8")
  assert signature(build(reader, directory)) == clean[reader]


@pytest.mark.parametrize("reader", ["grouplens_ml1m", "grouplens_ml100k"])
def test_latin1_originals_resaved_as_utf8_read_the_same(
  reader, tmp_path, clean
):
  directory = copy_fixture(reader, tmp_path)
  for name, (legacy, _) in READERS[reader]["files"].items():
    rewrite(directory / name, legacy, encode="utf-8")
  ds = build(reader, directory)
  assert signature(ds) == clean[reader]
  assert (
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)" in ds.item_titles
  )
  names = {pathlib.Path(n).name for n in READERS[reader]["files"]}
  assert ds.stats["encodings"] == dict.fromkeys(names, "utf-8")
  # The untouched originals are not valid UTF-8 (é is one latin-1 byte).
  original = build(reader, FIXTURES / READERS[reader]["fixture"])
  assert "latin-1" in original.stats["encodings"].values()


@pytest.mark.parametrize(
  "reader,name",
  [
    ("recbole", "ml-1m.inter"),
    ("openp5", "item_texts.tsv"),
    ("amazon", "meta_Beauty.json"),
  ],
)
def test_utf8_formats_reject_latin1_bytes_with_the_line(reader, name, tmp_path):
  # Only GroupLens originals are latin-1; elsewhere a non-UTF-8 byte is a
  # located error, never a silent guess.
  directory = copy_fixture(reader, tmp_path)
  path = directory / name
  data = path.read_bytes()
  line_number = data[: data.index("é".encode())].count(b"\n") + 1
  path.write_bytes(data.replace("é".encode(), b"\xe9"))
  with pytest.raises(files.FormatError, match="not valid utf-8") as info:
    build(reader, directory)
  assert (info.value.path, info.value.line_number) == (path, line_number)


@pytest.mark.parametrize("reader", READERS)
def test_stray_whitespace_around_ids_is_removed(reader, tmp_path, clean):
  directory = copy_fixture(reader, tmp_path)
  for name, (legacy, mutate) in READERS[reader]["files"].items():
    rewrite(directory / name, legacy, mutate)
  assert signature(build(reader, directory)) == clean[reader]


@pytest.mark.parametrize(
  "reader,name,line_number,field",
  [
    ("recbole", "ml-1m.inter", 3, "user_id"),
    ("grouplens_ml1m", "ml-1m/ratings.dat", 2, "MovieID"),
    ("grouplens_ml100k", "ml-100k/u.item", 2, "movie id"),
    ("openp5", "item_texts.tsv", 2, "item"),
    ("amazon", "reviews_Beauty_5.json", 2, "reviewerID"),
  ],
)
def test_blank_ids_are_errors_naming_the_line(
  reader, name, line_number, field, tmp_path
):
  directory = copy_fixture(reader, tmp_path)
  path = directory / name
  legacy = READERS[reader]["files"][name][0]
  lines = path.read_bytes().decode(legacy or "utf-8").split("\n")
  line = lines[line_number - 1]
  if reader == "amazon":
    line = re.sub(r'"reviewerID": "[^"]*"', '"reviewerID": "  "', line)
  else:
    sep = {"grouplens_ml1m": "::", "grouplens_ml100k": "|"}.get(reader, "\t")
    parts = line.split(sep)
    column = 1 if field == "MovieID" else 0
    parts[column] = "  "
    line = sep.join(parts)
  lines[line_number - 1] = line
  path.write_bytes("\n".join(lines).encode(legacy or "utf-8"))
  with pytest.raises(files.FormatError) as info:
    build(reader, directory)
  assert info.value.line_number == line_number
  assert f"field {field!r} is empty" in str(info.value)
  assert str(info.value).startswith(f"{path}:{line_number}:")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
  "compress",
  [gzip.compress, bz2.compress, lzma.compress],
  ids=["gzip", "bzip2", "xz"],
)
def test_compressed_files_read_the_same(reader, compress, tmp_path, clean):
  directory = copy_fixture(reader, tmp_path)
  for name in READERS[reader]["files"]:
    path = directory / name
    path.write_bytes(compress(path.read_bytes()))  # same name: magic decides
  assert signature(build(reader, directory)) == clean[reader]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize(
  "compress,kind",
  [(gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")],
)
def test_truncated_compressed_files_name_the_file(
  reader, which, compress, kind, tmp_path
):
  directory = copy_fixture(reader, tmp_path)
  path = directory / list(READERS[reader]["files"])[which]
  packed = compress(path.read_bytes())
  path.write_bytes(packed[: len(packed) * 2 // 3])  # an interrupted download
  with pytest.raises(files.CorruptFileError) as info:
    build(reader, directory)
  message = str(info.value)
  assert message.startswith(f"{path}: truncated or corrupt {kind} file (")
  assert "\n" not in message


def test_corrupt_gzip_data_and_checksum_name_the_file(tmp_path):
  packed = bytearray(gzip.compress(b"1\t1\t5\t100\n" * 50))
  (tmp_path / "flipped.gz").write_bytes(bytes(packed[:12]) + b"\xff" * 20)
  packed[-8] ^= 0xFF  # CRC32 of the trailer
  (tmp_path / "crc.gz").write_bytes(bytes(packed))
  for name in ("flipped.gz", "crc.gz"):
    with pytest.raises(files.CorruptFileError, match="corrupt gzip file"):
      list(files.iter_lines(tmp_path / name))


def test_committed_truncated_gzip_fixture(tmp_path):
  # bad_input/reviews_Beauty_5.json.gz: the reviews fixture, gzipped and cut
  # at 200 bytes.
  shutil.copy(BAD / "reviews_Beauty_5.json.gz", tmp_path)
  with pytest.raises(files.CorruptFileError) as info:
    amazon.read(amazon.find(tmp_path))
  assert str(info.value) == (
    f"{tmp_path / 'reviews_Beauty_5.json.gz'}: truncated or corrupt gzip file "
    "(Compressed file ended before the end-of-stream marker was reached); "
    "download or copy it again."
  )


def test_utf16_files_and_archives_are_refused_by_name(tmp_path):
  # bad_input/u16.txt: "1::1::5::100" saved by an editor as UTF-16 LE.
  with pytest.raises(files.DataError, match=r"u16.txt: UTF-16 text .* UTF-8"):
    list(files.iter_lines(BAD / "u16.txt", "latin-1"))
  (tmp_path / "ml-1m.zip").write_bytes(b"PK\x03\x04rest")
  with pytest.raises(files.DataError, match=r"ml-1m.zip: a zip archive"):
    list(files.iter_lines(tmp_path / "ml-1m.zip"))


def test_legacy_encoding_is_decided_for_the_whole_file(tmp_path, monkeypatch):
  # The first chunks are plain ASCII; a latin-1 byte only on the last line.
  # Chunks of 8 bytes would decode the start as UTF-8 and the end as
  # latin-1 if the decision were per chunk; it is per file.
  monkeypatch.setattr(files, "_CHUNK_BYTES", 8)
  path = tmp_path / "mixed.dat"
  path.write_bytes(b"ab\xc3\xa9\n" * 3 + b"Mis\xe9rables\n")
  assert files.text_encoding(path, "latin-1") == "latin-1"
  lines = [line for _, line in files.iter_lines(path, "latin-1")]
  assert lines == ["abÃ©"] * 3 + ["Misérables"]
  path.write_bytes(b"ab\xc3\xa9\n" * 3)  # valid UTF-8 throughout
  assert [line for _, line in files.iter_lines(path, "latin-1")] == ["abé"] * 3
  # A BOM means UTF-8 even for a legacy format; a bad byte is then an error.
  path.write_bytes(b"\xef\xbb\xbfok\nMis\xe9rables\n")
  with pytest.raises(files.FormatError, match=":2: not valid utf-8"):
    list(files.iter_lines(path, "latin-1"))


@pytest.mark.parametrize("reader", NUMERIC)
@pytest.mark.parametrize(
  "column,value,reason",
  [
    ("time", "880000700880000700880000700", "is out of range"),
    ("time", "-5", "is negative"),
    ("time", "inf", "is not finite"),
    ("time", "1e30", "is out of range"),
    ("rating", "1e400", "is not finite"),
    ("rating", "nan", "is not finite"),
    ("rating", "1e39", "is out of range"),
  ],
)
def test_numbers_out_of_range_name_file_line_and_field(
  reader, column, value, reason, tmp_path
):
  name, line_number, time_field, rating_field, sep, t, r = NUMERIC[reader]
  directory = copy_fixture(reader, tmp_path)
  path = directory / name
  lines = path.read_bytes().split(b"\n")
  fields = lines[line_number - 1].split(sep.encode())
  fields[t if column == "time" else r] = value.encode()
  lines[line_number - 1] = sep.encode().join(fields)
  path.write_bytes(b"\n".join(lines))
  field = time_field if column == "time" else rating_field
  with pytest.raises(files.FormatError) as info:
    build(reader, directory)
  assert info.value.line_number == line_number
  assert str(info.value).startswith(
    f"{path}:{line_number}: field {field!r} {reason}"
  )


@pytest.mark.parametrize(
  "key,value,reason",
  [
    ("unixReviewTime", "880000700880000700880000700", "is out of range"),
    ("unixReviewTime", "-100", "is negative"),
    ("overall", "1e400", "is not finite"),  # JSON reads it as inf
    ("overall", "NaN", "is not finite"),
  ],
)
def test_amazon_numbers_out_of_range(key, value, reason, tmp_path):
  directory = copy_fixture("amazon", tmp_path)
  path = directory / "reviews_Beauty_5.json"
  lines = path.read_text().split("\n")
  lines[2] = re.sub(rf'"{key}": [^,}}]+', f'"{key}": {value}', lines[2])
  path.write_text("\n".join(lines))
  with pytest.raises(files.FormatError) as info:
    build("amazon", directory)
  assert str(info.value).startswith(f"{path}:3: field {key!r} {reason}")


def test_implausible_timestamps_are_kept_and_counted(tmp_path):
  # Two rows in milliseconds (year > 2100 as seconds), one at 0: kept, as
  # only order matters, and counted. The fixture's own times (100..500 s,
  # 1970) are implausible too: 25 of the 34 rows survive, all counted.
  directory = copy_fixture("grouplens_ml100k", tmp_path)
  path = directory / "ml-100k/u.data"
  lines = path.read_text().split("\n")
  rows = [line.split("\t") for line in lines if line]
  for row in rows:
    row[3] = str(int(row[3]) + 900_000_000)  # 1998-07: plausible
  rows[0][3] = "900000100000"  # milliseconds
  rows[1][3] = "900000300000"
  rows[2][3] = "0"
  path.write_text("".join("\t".join(row) + "\n" for row in rows))
  ds = build("grouplens_ml100k", directory)
  assert ds.stats["implausible_timestamps"] == 3
  assert ds.stats["interactions"] == 25
  assert 900_000_100_000 in ds.timestamps.tolist()


def test_openp5_positions_are_not_timestamps():
  ds = build("openp5", FIXTURES / "openp5")
  assert ds.stats["implausible_timestamps"] == 0


def test_exact_duplicate_review_line_is_dropped_and_reported(tmp_path, clean):
  directory = copy_fixture("amazon", tmp_path)
  path = directory / "reviews_Beauty_5.json"
  lines = path.read_text().split("\n")
  lines.insert(5, lines[4])  # a crawl that wrote one review twice
  path.write_text("\n".join(lines))
  ds = build("amazon", directory)
  assert ds.stats["dropped"]["duplicate_rows"] == 1
  assert (
    ds.stats["raw_interactions"] == clean["amazon"][-1]["raw_interactions"] + 1
  )
  expected = clean["amazon"][-1] | {
    "raw_interactions": ds.stats["raw_interactions"],
    "dropped": clean["amazon"][-1]["dropped"] | {"duplicate_rows": 1},
    # Counted over the rows read (the fixture's 1970 times), copy included.
    "implausible_timestamps": 35,
  }
  assert signature(ds)[:-1] == clean["amazon"][:-1]
  assert signature(ds)[-1] == expected


def test_sequential_id_figures_by_hand():
  # Items numbered in order of first appearance, each user walking them in
  # order: rho = 1 and every consecutive pair steps to index + 1.
  from ilm_jax.data import raw

  builder = raw.InteractionBuilder(with_ratings=False)
  for user in ("u1", "u2", "u3"):
    for t, item in enumerate(("1", "2", "3")):
      builder.add(user, item, t)
  ds = processing.process(builder.build("toy", {}, "toy"), 3)
  assert ds.stats["item_index_first_appearance_spearman"] == 1.0
  assert ds.stats["next_item_is_index_plus_one"] == 1.0
  # Titles as ids, met in the reverse of their sort order: rho = -1; u1
  # walks c b a (indices 2 1 0): no +1 steps; u2 and u3 walk a b c: 4 of
  # the 6 consecutive pairs step by +1.
  builder = raw.InteractionBuilder(with_ratings=False)
  for user, items in (("u1", "cba"), ("u2", "abc"), ("u3", "abc")):
    for t, item in enumerate(items):
      builder.add(user, item, t)
  ds = processing.process(builder.build("toy", {}, "toy"), 3)
  assert ds.stats["item_index_first_appearance_spearman"] == -1.0
  assert ds.stats["next_item_is_index_plus_one"] == round(4 / 6, 4)


def test_prepare_cli_reports_bad_input_in_one_line(tmp_path):
  shutil.copy(BAD / "reviews_Beauty_5.json.gz", tmp_path)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ilm_jax.data.prepare",
      "--dataset=amazon",
      f"--path={tmp_path}",
      f"--out={tmp_path / 'out'}",
      "--write_cache=false",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    check=False,
    timeout=120,
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (
    f"prepare: CorruptFileError: {tmp_path / 'reviews_Beauty_5.json.gz'}: "
    "truncated or corrupt gzip file (Compressed file ended before the "
    "end-of-stream marker was reached); download or copy it again."
  )
  assert np.all(
    [not line.startswith("  File") for line in proc.stderr.splitlines()]
  )


def test_main_reports_bad_input_in_one_line(tmp_path):
  shutil.copy(BAD / "reviews_Beauty_5.json.gz", tmp_path)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ilm_jax.main",
      "--config=configs/ml1m.py:tiny",
      f"--workdir={tmp_path / 'work'}",
      "--config.data.dataset=amazon",
      f"--config.data.path={tmp_path}",
      f"--config.data.cache_dir={tmp_path / 'cache'}",
      "--config.phases=cf",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    check=False,
    timeout=300,
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    f"FATAL: CorruptFileError: {tmp_path / 'reviews_Beauty_5.json.gz'}: "
    "truncated or corrupt gzip file (Compressed file ended before the "
    "end-of-stream marker was reached); download or copy it again."
  )
