"""Amazon review dumps (Beauty, Clothing, ...): 5-core reviews plus metadata.

A directory passed as `--path` holds, gzipped or not:

  reviews   `reviews_<Category>_5.json` (2014 release) or `<Category>_5.json`
            (2018 release): one JSON object per line with at least
            reviewerID, asin, overall (rating) and unixReviewTime.
  metadata  optional `meta_<Category>.json`: one object per line. The 2014
            release writes Python literals (single quotes), read with
            ast.literal_eval; the 2018 release writes strict JSON.

Item text takes title, brand, categories and description. 2014 stores
`categories` as a list of category paths and `description` as a string; 2018
stores `category` as one path and `description` as a list of paragraphs.
Items without metadata keep their asin as title (counted in the stats).
"""

import ast
import collections
import json
import os
import pathlib
import re

from ilm_jax.data import files, raw, text

REVIEW_PATTERNS = (
  "reviews_*.json",
  "reviews_*.json.gz",
  "*_5.json",
  "*_5.json.gz",
)
METADATA_PATTERNS = ("meta_*.json", "meta_*.json.gz")
_REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")

# Metadata dumps cover the whole category (the 2014 Clothing file has ~1.5M
# products against ~23k in the 5-core reviews). Pulling the asin out with a
# regex first skips the slow literal parse for every product we do not need.
_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def find(path: os.PathLike | None) -> dict[str, pathlib.Path]:
  """Locates the reviews file and, if present, the metadata file.

  Args:
    path: the directory with the dump files.

  Returns:
    {"reviews": path} plus {"metadata": path} when a meta_ file exists.

  Raises:
    MissingFileError: no reviews file.
    DataError: several files of one kind, so the choice would be a guess.
  """
  what = (
    "Amazon 5-core reviews (reviews_<Category>_5.json[.gz] or "
    "<Category>_5.json[.gz]) and optionally meta_<Category>.json[.gz]"
  )
  directory = files.require_dir(path, what)
  found = {
    "reviews": files.find_one(
      directory, REVIEW_PATTERNS, "the 5-core reviews file"
    )
  }
  metadata = files.find_one(
    directory, METADATA_PATTERNS, "the metadata file", required=False
  )
  if metadata is not None:
    found["metadata"] = metadata
  return found


def parse_record(line: str, path: pathlib.Path, line_number: int) -> dict:
  """Parses one line as strict JSON, else as a Python literal (2014 layout).

  Args:
    line: the text.
    path: file, for errors.
    line_number: 1-based line number, for errors.

  Returns:
    The record as a dict.

  Raises:
    FormatError: neither parser accepts the line, or it is not an object.
  """
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    try:
      record = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      raise files.FormatError(
        path, line_number, line, "neither JSON nor a Python literal"
      ) from None
  if not isinstance(record, dict):
    raise files.FormatError(
      path,
      line_number,
      line,
      f"expected an object, got {type(record).__name__}",
    )
  return record


def _category_text(record: dict) -> str:
  """Category paths as "A > B > C", several paths separated by "; "."""
  if "categories" in record:  # 2014: a list of paths
    paths = record["categories"] or []
  else:  # 2018: one path
    paths = [record.get("category") or []]
  rendered = []
  for path in paths:
    steps = [
      text.clean(step) for step in (path if isinstance(path, list) else [path])
    ]
    joined = " > ".join(s for s in steps if s)
    if joined and joined not in rendered:
      rendered.append(joined)
  return "; ".join(rendered)


def read_metadata(
  path: pathlib.Path, wanted: set[str]
) -> tuple[dict[str, raw.ItemInfo], collections.Counter]:
  """Reads metadata records for the asins in `wanted`.

  Args:
    path: the metadata file.
    wanted: asins that occur in the reviews.

  Returns:
    (asin -> ItemInfo, counts of records skipped by reason).

  Raises:
    FormatError: a wanted record cannot be parsed.
  """
  infos = {}
  skipped = collections.Counter()
  for line_number, line in files.iter_lines(path):
    if not line.strip():
      skipped["metadata_blank_lines"] += 1
      continue
    match = _ASIN.search(line)
    if match is not None and match.group(1).strip() not in wanted:
      skipped["metadata_unused"] += 1
      continue
    record = parse_record(line, path, line_number)
    if "asin" not in record:
      raise files.FormatError(
        path, line_number, line, "metadata record without 'asin'"
      )
    asin = files.parse_id(str(record["asin"]), path, line_number, line, "asin")
    if asin not in wanted:
      skipped["metadata_unused"] += 1
      continue
    if asin in infos:
      skipped["metadata_duplicates"] += 1
      continue
    title = text.clean(record.get("title"))
    infos[asin] = raw.ItemInfo(
      title=title,
      attributes={
        "brand": text.clean(record.get("brand")),
        "categories": _category_text(record),
        "description": text.clean(record.get("description")),
      },
    )
  return infos, skipped


def read(found: dict[str, pathlib.Path]) -> raw.RawInteractions:
  """Reads the reviews (and metadata) `find` located.

  Args:
    found: the output of `find`.

  Returns:
    One row per review, in file order, with ratings from `overall`.

  Raises:
    FormatError: a review line that does not parse or lacks a field.
  """
  path = found["reviews"]
  dropped = collections.Counter()
  builder = raw.InteractionBuilder(with_ratings=True)
  for line_number, line in files.iter_lines(path):
    if not line.strip():
      dropped["blank_lines"] += 1
      continue
    record = parse_record(line, path, line_number)
    missing = [f for f in _REVIEW_FIELDS if f not in record]
    if missing:
      raise files.FormatError(
        path, line_number, line, f"review lacks field(s) {missing}"
      )
    timestamp = files.parse_timestamp(
      str(record["unixReviewTime"]), path, line_number, line, "unixReviewTime"
    )
    rating = files.parse_rating(
      str(record["overall"]), path, line_number, line, "overall"
    )
    user = files.parse_id(
      str(record["reviewerID"]), path, line_number, line, "reviewerID"
    )
    item = files.parse_id(str(record["asin"]), path, line_number, line, "asin")
    builder.add(user, item, timestamp, rating)

  notes = {}
  item_info = {}
  if "metadata" in found:
    item_info, skipped = read_metadata(found["metadata"], builder.item_ids)
    notes.update(skipped)
  untitled = [asin for asin, info in item_info.items() if not info.title]
  for asin in untitled:
    # Many 2014 records have no title; the asin at least identifies the item.
    item_info[asin].title = asin
  notes["metadata_without_title"] = len(untitled)
  return builder.build(
    "amazon", item_info, str(path), dropped=dropped, notes=notes
  )
