"""OpenP5's `user_sequence.txt`, with an optional item text file.

Layout of a directory passed as `--path` (or `--path` naming the sequence
file itself):

  user_sequence.txt   one user per line: `user item item ...`, items in time
                      order, separated by single spaces (as OpenP5 ships it).
  item_texts.tsv      optional, UTF-8, no header, one item per line:
                      `item<TAB>title` or `item<TAB>title<TAB>description`.

There are no timestamps or ratings: an item's position on its line is its
time, and every interaction counts as positive. Items without a line in
item_texts.tsv get their raw id as title (counted in the stats).
"""

import collections
import os
import pathlib

from ilm_jax.data import files, raw, text

SEQUENCE_FILE = "user_sequence.txt"
ITEM_TEXT_FILE = "item_texts.tsv"


def find(path: os.PathLike | None) -> dict[str, pathlib.Path]:
  """Locates the sequence file and, if present, the item text file.

  Args:
    path: a directory holding user_sequence.txt, or the file itself.

  Returns:
    {"sequences": path} plus {"item_texts": path} when that file exists.

  Raises:
    MissingFileError: there is no sequence file.
  """
  what = (
    f"OpenP5 data ({SEQUENCE_FILE}: `user item item ...` per line; "
    f"optional {ITEM_TEXT_FILE})"
  )
  if path and pathlib.Path(path).is_file():
    sequence_path = pathlib.Path(path)
  else:
    directory = files.require_dir(path, what)
    sequence_path = files.require_file(directory / SEQUENCE_FILE, what)
  found = {"sequences": sequence_path}
  item_texts = sequence_path.parent / ITEM_TEXT_FILE
  if item_texts.is_file():
    found["item_texts"] = item_texts
  return found


def read_item_texts(path: os.PathLike) -> dict[str, raw.ItemInfo]:
  """Reads `item<TAB>title[<TAB>description]` lines.

  Args:
    path: the TSV file.

  Returns:
    raw item id -> ItemInfo.

  Raises:
    FormatError: a line without a title, with extra columns, or a repeated id.
  """
  path = pathlib.Path(path)
  infos = {}
  for line_number, line in files.iter_lines(path):
    if not line:
      continue
    fields = line.split("\t")
    if len(fields) not in (2, 3) or not fields[1].strip():
      raise files.FormatError(
        path,
        line_number,
        line,
        "expected `item<TAB>title` or `item<TAB>title<TAB>description`",
      )
    item = files.parse_id(fields[0], path, line_number, line, "item")
    if item in infos:
      raise files.FormatError(
        path, line_number, line, f"item {item!r} appears twice"
      )
    description = text.clean(fields[2]) if len(fields) == 3 else ""
    infos[item] = raw.ItemInfo(
      title=text.clean(fields[1]), attributes={"description": description}
    )
  return infos


def read(found: dict[str, pathlib.Path]) -> raw.RawInteractions:
  """Reads the files `find` located.

  Args:
    found: the output of `find`.

  Returns:
    One row per (user, item) occurrence; timestamps are positions on the line.

  Raises:
    FormatError: a user appears on two lines.
  """
  path = found["sequences"]
  dropped = collections.Counter()
  builder = raw.InteractionBuilder(with_ratings=False)
  seen_users = {}
  for line_number, line in files.iter_lines(path):
    tokens = line.split()
    if not tokens:
      dropped["blank_lines"] += 1
      continue
    user, items = tokens[0], tokens[1:]
    if user in seen_users:
      raise files.FormatError(
        path,
        line_number,
        line,
        f"user {user!r} already has a line ({seen_users[user]})",
      )
    seen_users[user] = line_number
    if not items:
      # A user line with no items holds no interaction; count it so the
      # report accounts for every line.
      dropped["users_without_items"] += 1
      continue
    for position, item in enumerate(items):
      builder.add(user, item, position)
  item_info = (
    read_item_texts(found["item_texts"]) if "item_texts" in found else {}
  )
  return builder.build(
    "openp5", item_info, str(path), dropped=dropped, has_time=False
  )
