"""Line reading: line ends, gzip, chunk boundaries and located decode errors."""

import gzip

import pytest

from ilm_jax.data import files

CONTENT = b"a\r\nb\rc\r\n\r\nd\n" + "é".encode() + b"\nlast"
EXPECTED = [(1, "a"), (2, "b\rc"), (3, ""), (4, "d"), (5, "é"), (6, "last")]


@pytest.mark.parametrize("chunk_bytes", [1, 5, 1 << 22])
def test_line_ends_and_chunks(tmp_path, monkeypatch, chunk_bytes):
  # chunk_bytes=1 decodes every line on its own; 5 splits mid-file.
  monkeypatch.setattr(files, "_CHUNK_BYTES", chunk_bytes)
  (tmp_path / "plain.txt").write_bytes(CONTENT)
  assert list(files.iter_lines(tmp_path / "plain.txt")) == EXPECTED
  with gzip.open(tmp_path / "packed.bin", "wb") as f:  # found by magic bytes
    f.write(CONTENT)
  assert list(files.iter_lines(tmp_path / "packed.bin")) == EXPECTED


@pytest.mark.parametrize("chunk_bytes", [5, 1 << 22])
def test_decode_error_names_the_line(tmp_path, monkeypatch, chunk_bytes):
  monkeypatch.setattr(files, "_CHUNK_BYTES", chunk_bytes)
  (tmp_path / "mixed.txt").write_bytes(b"ok\nfine\nMis\xe9rables\nok\n")
  with pytest.raises(files.FormatError) as info:
    list(files.iter_lines(tmp_path / "mixed.txt"))
  assert info.value.line_number == 3
  assert "mixed.txt:3: not valid utf-8" in str(info.value)
  assert "Mis\ufffdrables" in str(info.value)
  lines = list(files.iter_lines(tmp_path / "mixed.txt", "latin-1"))
  assert lines[2] == (3, "Misérables")


def test_long_lines_are_quoted_in_part():
  error = files.FormatError("f.json", 7, "x" * 1000, "bad")
  assert str(error) == "f.json:7: bad. Line content: '" + "x" * 300 + "...'"


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 22])
def test_bom_is_removed_once_plain_or_gzipped(
  tmp_path, monkeypatch, chunk_bytes
):
  monkeypatch.setattr(files, "_CHUNK_BYTES", chunk_bytes)
  # Only the mark at the very start goes; a second one is text (U+FEFF).
  content = b"\xef\xbb\xbf1::2\n\xef\xbb\xbfx\n"
  expected = [(1, "1::2"), (2, "\ufeffx")]
  (tmp_path / "plain.dat").write_bytes(content)
  assert list(files.iter_lines(tmp_path / "plain.dat")) == expected
  assert list(files.iter_lines(tmp_path / "plain.dat", "latin-1")) == expected
  with gzip.open(tmp_path / "packed.dat", "wb") as f:
    f.write(content)
  assert list(files.iter_lines(tmp_path / "packed.dat")) == expected


def test_parse_helpers_by_hand(tmp_path):
  path = tmp_path / "f"
  assert files.parse_id("  6 \t", path, 1, "", "user") == "6"
  assert files.parse_timestamp("978300760.0", path, 1, "", "t") == 978300760
  assert files.parse_timestamp(str(2**63 - 1), path, 1, "", "t") == 2**63 - 1
  with pytest.raises(files.FormatError, match="'t' is out of range"):
    files.parse_timestamp(str(2**63), path, 1, "", "t")
  with pytest.raises(files.FormatError, match="'t' is not a whole number"):
    files.parse_timestamp("1.5", path, 1, "", "t")
  assert files.parse_rating("-3.4e38", path, 1, "", "r") == -3.4e38
  assert files.numbers_in_range(0, 5.0)
  assert not files.numbers_in_range(-1, 5.0)
  assert not files.numbers_in_range(0, float("nan"))
