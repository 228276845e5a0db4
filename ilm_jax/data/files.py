"""Reading user-supplied and packaged data files, with errors that say where.

Every reader in this package goes through `iter_lines`, so every text file
of every format follows the same rules:

- Lines are split on "\\n" only and a trailing "\\r" is removed, so CRLF
  files (RecBole's atomic files) and LF files read alike, while a stray
  carriage return inside a field is kept rather than silently starting a new
  row.
- Encoding (one rule for all readers): a UTF-8 byte-order mark at the start
  is removed; the text is decoded as UTF-8. Only a format whose original
  files are in a legacy encoding (GroupLens ml-1m/ml-100k: latin-1) names it
  as `legacy_encoding`, and then a file that is not valid UTF-8 as a whole
  is decoded in that encoding instead. So the original GroupLens files and
  copies re-saved as UTF-8 both read right, never as mojibake. A UTF-8 file
  with an invalid byte, in any other format, is a FormatError naming the
  line; UTF-16/32 files (their byte-order marks) are a DataError asking for
  UTF-8.
- Compression is detected from the magic bytes, not the suffix: gzip, bzip2
  and xz are decompressed on the fly; a truncated or corrupt stream is a
  CorruptFileError naming the file and the last line read; zip and zstd
  archives are a DataError asking to extract them.

Field helpers (`parse_id`, `parse_timestamp`, `parse_rating`) give the
same rules to every id and number: ids lose surrounding whitespace and must
not be empty; timestamps are whole Unix seconds in [0, 2**63); ratings are
finite and fit a float32. Values that break them are FormatErrors naming
file, line and field, raised while reading.
"""

import bz2
import codecs
import gzip
import lzma
import math
import os
import pathlib
import zlib
from collections.abc import Iterator, Sequence

from ilm_jax import progress

# How much of a bad line an error message quotes; whole lines of review text
# would drown the message.
_MAX_QUOTED = 300
# Bytes of whole lines decoded at once by iter_lines.
_CHUNK_BYTES = 1 << 22

# Timestamps are stored as int64 Unix seconds.
TIMESTAMP_MAX = 2**63 - 1
# Ratings are stored as float32; larger magnitudes would become inf.
RATING_MAX = 3.4028234663852886e38

_UTF8_BOM = codecs.BOM_UTF8
# Longest first: the UTF-32-LE mark starts with the UTF-16-LE one.
_OTHER_BOMS = (
  (codecs.BOM_UTF32_LE, "UTF-32"),
  (codecs.BOM_UTF32_BE, "UTF-32"),
  (codecs.BOM_UTF16_LE, "UTF-16"),
  (codecs.BOM_UTF16_BE, "UTF-16"),
)
# Magic bytes -> how to open the stream (None: not supported here).
_COMPRESSED = (
  (b"\x1f\x8b", "gzip", gzip.open),
  (b"BZh", "bzip2", bz2.open),
  (b"\xfd7zXZ\x00", "xz", lzma.open),
  (b"PK\x03\x04", "zip", None),
  (b"\x28\xb5\x2f\xfd", "zstd", None),
)
# What a truncated or damaged compressed stream raises while being read.
# bz2 reports bad data as a plain OSError; only caught for compressed input.
_DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


class DataError(ValueError):
  """Input data that cannot be turned into a dataset."""


class FormatError(DataError):
  """A row that does not follow its file's format."""

  def __init__(self, path: os.PathLike, line_number: int, content, reason: str):
    self.path = pathlib.Path(path)
    self.line_number = line_number
    self.content = content
    self.reason = reason
    shown = (
      content if len(content) <= _MAX_QUOTED else content[:_MAX_QUOTED] + "..."
    )
    super().__init__(f"{path}:{line_number}: {reason}. Line content: {shown!r}")


class CorruptFileError(DataError):
  """A compressed file that is truncated or damaged."""


class EmptyDatasetError(DataError):
  """No interactions remain (after reading or after k-core filtering)."""


class MissingFileError(FileNotFoundError):
  """An expected input file is absent; the message says what and where."""


# Errors caused by the user's input files, whose message already names the
# file (and line and field): entry points print them in one line and exit
# with status 1 instead of showing a traceback.
USER_INPUT_ERRORS = (DataError, MissingFileError)


def require_file(path: os.PathLike, what: str) -> pathlib.Path:
  """Returns `path` as a Path if it is an existing file.

  Args:
    path: where the file should be.
    what: a description of the expected content, used in the error.

  Returns:
    The path.

  Raises:
    MissingFileError: the file does not exist.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(
      f"Expected {what} at {path}, but no such file exists."
    )
  return path


def require_dir(path: os.PathLike | None, what: str) -> pathlib.Path:
  """Returns `path` as a Path if it names an existing directory.

  Args:
    path: the directory given by the user (`--path`); may be empty.
    what: what the directory should contain, used in the error.

  Returns:
    The path.

  Raises:
    MissingFileError: no path was given or it is not a directory.
  """
  if not path:
    raise MissingFileError(
      "This dataset reads user files: set --path (config.data.path) to a "
      f"directory with {what}."
    )
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise MissingFileError(
      f"Expected a directory with {what} at {path}, but it does not exist."
    )
  return path


def find_one(
  directory: pathlib.Path,
  patterns: Sequence[str],
  what: str,
  required: bool = True,
) -> pathlib.Path | None:
  """Finds exactly one file in `directory` matching any of `patterns`.

  Args:
    directory: where to look (not recursive).
    patterns: glob patterns, tried together.
    what: description used in errors.
    required: whether no match is an error (otherwise returns None).

  Returns:
    The single matching path, or None if nothing matches and not required.

  Raises:
    MissingFileError: nothing matches and the file is required.
    DataError: more than one file matches, so the choice would be a guess.
  """
  found = sorted(
    {p for pattern in patterns for p in directory.glob(pattern) if p.is_file()}
  )
  if not found:
    if required:
      raise MissingFileError(
        f"Expected {what} in {directory} (a file matching "
        f"{' or '.join(patterns)}), found none."
      )
    return None
  if len(found) > 1:
    raise DataError(
      f"Found several candidates for {what} in {directory}: "
      f"{[p.name for p in found]}; keep exactly one."
    )
  return found[0]


def _open_binary(path: pathlib.Path):
  """Opens `path` for reading bytes, decompressing by its magic bytes.

  Returns:
    (binary file object, compression name or None for plain files).

  Raises:
    DataError: a zip or zstd archive, which this reader does not open.
  """
  with open(path, "rb") as f:
    magic = f.read(8)
  for prefix, kind, opener in _COMPRESSED:
    if magic.startswith(prefix):
      if opener is None:
        raise DataError(
          f"{path}: a {kind} archive; extract it and point --path at the "
          "extracted files (gzip, bzip2 and xz files are read directly)."
        )
      return opener(path, "rb"), kind
  return open(path, "rb"), None


def _corrupt(
  path: pathlib.Path, kind: str, error: Exception
) -> CorruptFileError:
  # Decompression fails a whole chunk at once, so no line number is given.
  return CorruptFileError(
    f"{path}: truncated or corrupt {kind} file "
    f"({error or type(error).__name__}); download or copy it again."
  )


def _read_lines(f, kind, path: pathlib.Path) -> list[bytes]:
  """Up to _CHUNK_BYTES of whole lines; decompression errors named."""
  try:
    return f.readlines(_CHUNK_BYTES)
  except _DECOMPRESSION_ERRORS as e:
    if kind is None:
      raise
    raise _corrupt(path, kind, e) from None


def text_encoding(path: os.PathLike, legacy_encoding: str | None = None) -> str:
  """The encoding `iter_lines` decodes `path` with (see the module docstring).

  Args:
    path: the file (compressed or not).
    legacy_encoding: the encoding of the format's original files when it is
      not UTF-8 ("latin-1" for GroupLens), else None.

  Returns:
    "utf-8", or `legacy_encoding` when given, the file has no UTF-8
    byte-order mark and is not valid UTF-8 as a whole.

  Raises:
    DataError: the file starts with a UTF-16 or UTF-32 byte-order mark.
    CorruptFileError: a compressed file is truncated or damaged.
  """
  path = pathlib.Path(path)
  f, kind = _open_binary(path)
  with f:
    try:
      head = f.read(4)
    except _DECOMPRESSION_ERRORS as e:
      if kind is None:
        raise
      raise _corrupt(path, kind, e) from None
    for bom, name in _OTHER_BOMS:
      if head.startswith(bom):
        raise DataError(
          f"{path}: {name} text (it starts with a {name} byte-order mark); "
          "re-save it as UTF-8."
        )
    if legacy_encoding is None or head.startswith(_UTF8_BOM):
      return "utf-8"
    # One pass over the whole file decides, so a file is never decoded
    # half in one encoding and half in the other.
    decoder = codecs.getincrementaldecoder("utf-8")()
    block = head
    try:
      while True:
        decoder.decode(block)
        block = f.read(_CHUNK_BYTES)
        if not block:
          decoder.decode(b"", final=True)
          return "utf-8"
    except UnicodeDecodeError:
      return legacy_encoding
    except _DECOMPRESSION_ERRORS as e:
      if kind is None:
        raise
      raise _corrupt(path, kind, e) from None


def _decode_lines(
  path: pathlib.Path, first: int, chunk: list[bytes], encoding: str
) -> list[str]:
  """Decodes whole lines at once; on failure, finds the offending line."""
  try:
    text = b"".join(chunk).decode(encoding)
  except UnicodeDecodeError:
    for offset, raw in enumerate(chunk):
      try:
        raw.decode(encoding)
      except UnicodeDecodeError as e:
        raise FormatError(
          path,
          first + offset,
          raw.rstrip(b"\r\n").decode(encoding, "replace"),
          f"not valid {encoding} ({e.reason} at byte {e.start})",
        ) from None
    raise  # unreachable: some line failed above
  # Only a CR right before LF is a line end; other CRs stay in the field.
  lines = text.replace("\r\n", "\n").split("\n")
  if chunk[-1].endswith(b"\n"):
    lines.pop()  # the empty string after the chunk's last newline
  elif lines[-1].endswith("\r"):
    lines[-1] = lines[-1][:-1]
  return lines


def iter_lines(
  path: os.PathLike, legacy_encoding: str | None = None
) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line without its line end).

  Compressed files (gzip, bzip2, xz) are decompressed transparently. Lines
  are decoded a few MB at a time (per-line decoding costs seconds on ML-1M);
  an undecodable byte is still reported with its line number. A UTF-8
  byte-order mark at the start is removed, so it never sticks to the first
  field.

  Args:
    path: the file.
    legacy_encoding: the encoding of the format's original files if not
      UTF-8 ("latin-1" for GroupLens); used only for a file that is not valid
      UTF-8 (see `text_encoding`).

  Yields:
    (line_number, text) pairs, blank lines included.

  Raises:
    FormatError: a line is not valid UTF-8 (and no legacy encoding applies).
    CorruptFileError: a compressed file is truncated or damaged.
    DataError: a UTF-16/32 file, or a zip or zstd archive.
  """
  path = pathlib.Path(path)
  encoding = text_encoding(path, legacy_encoding)
  line_number = 1
  f, kind = _open_binary(path)
  # Large dumps (a 1.5M-line metadata file) take minutes: log progress, in
  # bytes of the file on disk for plain files (decompressed bytes, with no
  # total, for compressed ones). Nothing is logged for reads under 15 s.
  bar = progress.Progress(
    f"reading {path.name} (bytes)",
    total=path.stat().st_size if kind is None else None,
  )
  with f:
    while chunk := _read_lines(f, kind, path):
      if line_number == 1 and chunk[0].startswith(_UTF8_BOM):
        chunk[0] = chunk[0][len(_UTF8_BOM) :]
      lines = _decode_lines(path, line_number, chunk, encoding)
      yield from enumerate(lines, start=line_number)
      line_number += len(lines)
      bar.update(sum(map(len, chunk)))


def parse_id(
  text: str, path: pathlib.Path, line_number: int, line: str, field: str
) -> str:
  """An id field without surrounding whitespace; empty ids are errors.

  "6 " and "6" are the same user: a stray space must never make a second
  user or item.

  Raises:
    FormatError: the id is empty or only whitespace.
  """
  value = text.strip()
  if not value:
    raise FormatError(path, line_number, line, f"field {field!r} is empty")
  return value


def parse_number(
  text: str, path: pathlib.Path, line_number: int, line: str, field: str
) -> float:
  """Parses a finite number, raising a FormatError that names the field."""
  try:
    value = float(text)
  except ValueError:
    raise FormatError(
      path, line_number, line, f"field {field!r} is not a number: {text!r}"
    ) from None
  if not math.isfinite(value):
    raise FormatError(
      path, line_number, line, f"field {field!r} is not finite: {text!r}"
    )
  return value


def parse_rating(
  text: str, path: pathlib.Path, line_number: int, line: str, field: str
) -> float:
  """Parses a rating: a finite number within float32 range (|x| <= 3.4e38).

  Raises:
    FormatError: not a number, not finite (`1e400`, `nan`), or too large for
      the float32 the ratings are stored in.
  """
  value = parse_number(text, path, line_number, line, field)
  if abs(value) > RATING_MAX:
    raise FormatError(
      path,
      line_number,
      line,
      f"field {field!r} is out of range: {text!r} (ratings are stored as "
      f"float32, |rating| <= {RATING_MAX:.4g})",
    )
  return value


def parse_timestamp(
  text: str, path: pathlib.Path, line_number: int, line: str, field: str
) -> int:
  """Parses Unix seconds: an integer, or an integral float as RecBole writes.

  Raises:
    FormatError: not a whole number, negative (the formats read here store
      Unix seconds, which are >= 0), or beyond the int64 the timestamps are
      stored in (a 27-digit value).
  """
  try:
    value = int(text)
  except ValueError:
    number = parse_number(text, path, line_number, line, field)
    if number != int(number):
      raise FormatError(
        path,
        line_number,
        line,
        f"field {field!r} is not a whole number: {text!r}",
      ) from None
    value = int(number)
  if value < 0:
    raise FormatError(
      path,
      line_number,
      line,
      f"field {field!r} is negative: {text!r} (Unix seconds are >= 0)",
    )
  if value > TIMESTAMP_MAX:
    raise FormatError(
      path,
      line_number,
      line,
      f"field {field!r} is out of range: {text!r} (Unix seconds stored as "
      f"int64, at most {TIMESTAMP_MAX})",
    )
  return value


def numbers_in_range(timestamp: int, rating: float) -> bool:
  """Whether an already parsed timestamp and rating pass the checks above.

  The readers' fast path parses with int()/float() inline and calls the
  parse_* helpers (which word the error) only when this is False. NaN fails.
  """
  return 0 <= timestamp <= TIMESTAMP_MAX and -RATING_MAX <= rating <= RATING_MAX
