"""Reading user-supplied and packaged data files, with errors that say where.

Every reader in this package goes through `iter_lines`, so a malformed row is
reported the same way everywhere: file, 1-based line number, the reason and
the offending content. Lines are split on "\\n" only and a trailing "\\r" is
removed, so CRLF files (RecBole's atomic files) and LF files read alike while
a stray carriage return inside a field is kept rather than silently starting
a new row.
"""

import gzip
import os
import pathlib
from collections.abc import Iterator, Sequence

# How much of a bad line an error message quotes; whole lines of review text
# would drown the message.
_MAX_QUOTED = 300
# Bytes of whole lines decoded at once by iter_lines.
_CHUNK_BYTES = 1 << 22


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


class EmptyDatasetError(DataError):
  """No interactions remain (after reading or after k-core filtering)."""


class MissingFileError(FileNotFoundError):
  """An expected input file is absent; the message says what and where."""


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
  # Amazon dumps usually arrive gzipped; sniff the magic bytes rather than
  # trusting the suffix.
  with open(path, "rb") as f:
    magic = f.read(2)
  if magic == b"\x1f\x8b":
    return gzip.open(path, "rb")
  return open(path, "rb")


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
  path: os.PathLike, encoding: str = "utf-8"
) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line without its line end).

  Gzipped files are decompressed transparently. Lines are decoded a few MB
  at a time (per-line decoding costs seconds on ML-1M); an undecodable byte
  is still reported with its line number.

  Args:
    path: the file.
    encoding: text encoding ("utf-8" for RecBole/OpenP5/Amazon, "latin-1"
      for the original GroupLens files).

  Yields:
    (line_number, text) pairs, blank lines included.

  Raises:
    FormatError: a line is not valid in `encoding`.
  """
  path = pathlib.Path(path)
  line_number = 1
  with _open_binary(path) as f:
    while chunk := f.readlines(_CHUNK_BYTES):
      lines = _decode_lines(path, line_number, chunk, encoding)
      yield from enumerate(lines, start=line_number)
      line_number += len(lines)


def parse_number(
  text: str, path: pathlib.Path, line_number: int, line: str, field: str
) -> float:
  """Parses a numeric field, raising a FormatError that names the field."""
  try:
    return float(text)
  except ValueError:
    raise FormatError(
      path, line_number, line, f"field {field!r} is not a number: {text!r}"
    ) from None


def parse_timestamp(
  text: str, path: pathlib.Path, line_number: int, line: str, field: str
) -> int:
  """Parses an integer (or integral float, as RecBole writes them) timestamp."""
  try:
    return int(text)
  except ValueError:
    value = parse_number(text, path, line_number, line, field)
    if value != int(value):
      raise FormatError(
        path,
        line_number,
        line,
        f"field {field!r} is not a whole number: {text!r}",
      ) from None
    return int(value)
