"""The OpenP5 protocol: k-core filtering, chronological sequences, leave-one-out.

`process` turns a source's RawInteractions into a ProcessedDataset:

0. Exact duplicate rows (same user, item, timestamp and rating: a review
   line repeated by a crawl or a concatenation) are dropped, keeping the
   first, and counted as `dropped["duplicate_rows"]`. A user who interacts
   with an item again at another time (or with another rating) is a repeat
   interaction: kept, and counted in `duplicate_user_item`.
1. k-core (default 5): drop items, then users, with fewer than k
   interactions, and repeat until nothing changes. The surviving set is the
   unique maximal k-core whatever the order; the order only decides which
   reason a dropped row is counted under.
2. Indices: users and items get 0-based indices by the natural sort of their
   raw ids ("u2" < "u10"; digit runs compare as numbers, the rest as text).
   This never adds information: the project does not number ids in order of
   appearance or time. But it cannot remove information the raw ids already
   carry: ids that a source numbered in order of first appearance (P5's
   sequential indexing, P5 PR #3) keep that order, and then an item's index
   says something about when it first appeared and which item follows it.
   Two figures flag it: `item_index_first_appearance_spearman` (the rank
   correlation of item index with first appearance in the file; near 1 for
   sequentially numbered ids, near 0 for titles or random ids) and
   `next_item_is_index_plus_one` (the share of consecutive pairs in the
   sequences whose second item has the next index); a warning is logged
   above SEQUENTIAL_ID_WARNING. Other leaky numberings (by time, by
   popularity) are not detected.
3. Each user's interactions are sorted by timestamp with a stable sort, so
   equal timestamps keep their file order (sorting ties by item id inflates
   ML-1M NDCG by about 20%).
4. Leave-one-out (`ProcessedDataset.leave_one_out`, the one definition):
   items[-1] is the test target, items[-2] the validation target, items[:-2]
   the training part.
5. Derived sets from the training part only: item-item pairs of consecutive
   items of a user, and user-item positive pairs (rating >= threshold, or
   every interaction for sources without ratings).
"""

import dataclasses
import hashlib
import re
from collections.abc import Iterable

import numpy as np
from absl import logging

from ilm_jax.data import files, raw

# The split needs a training item, a validation target and a test target.
MIN_SEQUENCE_LENGTH = 3

_DIGITS = re.compile(r"(\d+)")

# Unix seconds outside [1990-01-01, 2100-01-01) are implausible for a
# rating or review log (the web services these datasets come from started
# in the mid-1990s); a millisecond timestamp lands beyond 2100. Such rows are
# kept, as only the order within a user matters, but counted in
# `implausible_timestamps` and a warning names the count: mixed seconds and
# milliseconds would mis-order a user's rows.
PLAUSIBLE_TIMESTAMPS = (631_152_000, 4_102_444_800)
# Spearman correlation of item index and first appearance above which the
# ids look sequentially numbered (see the module docstring).
SEQUENTIAL_ID_WARNING = 0.9


def natural_key(raw_id: str) -> tuple:
  """Sort key comparing digit runs as numbers: "1m_2" < "1m_10".

  Split on digits, text chunks sit at even positions and numbers at odd
  ones, so keys of any two ids compare chunk by chunk without mixing types.
  """
  return tuple(
    int(chunk) if i % 2 else chunk
    for i, chunk in enumerate(_DIGITS.split(raw_id))
  )


def natural_order(raw_ids: Iterable[str]) -> list[str]:
  """Returns the ids in natural sort order; ties (e.g. "01" vs "1") by text."""
  return sorted(raw_ids, key=lambda s: (natural_key(s), s))


@dataclasses.dataclass
class ProcessedDataset:
  """A dataset under the OpenP5 protocol, with 0-based user and item indices.

  Per-user sequences are stored CSR-style: user u's items, in time order, are
  `sequence_items[sequence_offsets[u]:sequence_offsets[u + 1]]`; ratings and
  timestamps are aligned with sequence_items.

  Attributes:
    name: dataset name ("ml1m", ...).
    user_ids: index -> raw user id.
    item_ids: index -> raw item id.
    item_titles: index -> readable title (what phase 2 decodes).
    item_texts: index -> full description text.
    item_attributes: field -> per-item values ("" where unknown), e.g. year,
      genres, director, brand.
    sequence_offsets: int64 [num_users + 1].
    sequence_items: int32 [num_interactions].
    ratings: float32 [num_interactions]; NaN for sources without ratings.
    timestamps: int64 [num_interactions]; positions for OpenP5 data.
    item_item_pairs: int32 [P, 2], (item, next item) from training parts.
    user_item_pairs: int32 [Q, 2], (user, positive item) from training parts.
    stats: figures reported by `prepare` (counts, drops and why).
  """

  name: str
  user_ids: list[str]
  item_ids: list[str]
  item_titles: list[str]
  item_texts: list[str]
  item_attributes: dict[str, list[str]]
  sequence_offsets: np.ndarray
  sequence_items: np.ndarray
  ratings: np.ndarray
  timestamps: np.ndarray
  item_item_pairs: np.ndarray
  user_item_pairs: np.ndarray
  stats: dict

  @property
  def num_users(self) -> int:
    return len(self.user_ids)

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @property
  def num_interactions(self) -> int:
    return len(self.sequence_items)

  @property
  def sequence_lengths(self) -> np.ndarray:
    return np.diff(self.sequence_offsets)

  def record(self) -> dict:
    """What a metrics file records of the data it was measured on.

    Returns:
      {"name", "users", "items", "interactions", "interactions_digest"}:
      the digest (16 hex digits, SHA-256) covers every user's item sequence
      in order, so two files with one digest ranked the same users against
      the same held-out items, and their per-user results may be paired by
      user index (`phases/eval.py` refuses to pair files whose digests
      differ). Titles and texts are not covered.
    """
    digest = hashlib.sha256()
    for array in (self.sequence_offsets, self.sequence_items):
      digest.update(np.ascontiguousarray(array, np.int64).tobytes())
    return dict(
      name=self.name,
      users=self.num_users,
      items=self.num_items,
      interactions=self.num_interactions,
      interactions_digest=digest.hexdigest()[:16],
    )

  def sequence(self, user: int) -> np.ndarray:
    """The user's full chronological item sequence (int32)."""
    return self.sequence_items[
      self.sequence_offsets[user] : self.sequence_offsets[user + 1]
    ]

  def leave_one_out(self, split: str) -> "Split":
    """The next-item examples of one split of the OpenP5 leave-one-out.

    train: one example per prefix of the training part items[:-2]: targets
      items[1], ..., items[-3], each with the items before it as history.
    valid: one per user, history items[:-2] (the whole training part),
      target items[-2].
    test: one per user, history items[:-1], target items[-1].

    Args:
      split: "train", "valid" or "test".

    Returns:
      The Split (arrays over its examples; see `Split`).

    Raises:
      ValueError: an unknown split.
    """
    users, starts, ends = _split_bounds(self.sequence_offsets, split)
    return Split(
      name=split,
      users=users,
      starts=starts,
      ends=ends,
      targets=self.sequence_items[ends],
      items=self.sequence_items,
    )


SPLITS = ("train", "valid", "test")
# Items at the end of a sequence that the valid and test histories leave out:
# the valid history (items[:-2]) is the training part, all training may see.
_HELD_OUT = {"valid": 2, "test": 1}


def _split_bounds(
  offsets: np.ndarray, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(users, history starts, history ends) of a split's examples.

  The one definition of the leave-one-out split (`leave_one_out`, and the
  training part in `process`). Example n's history is
  `sequence_items[starts[n]:ends[n]]` and its target `sequence_items[ends[n]]`.

  Args:
    offsets: int64 [num_users + 1] CSR sequence offsets.
    split: "train", "valid" or "test".

  Returns:
    Three int64 [N] arrays.

  Raises:
    ValueError: an unknown split.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  lengths = np.diff(offsets)
  if split != "train":
    users = np.arange(len(lengths))
    return users, offsets[:-1], offsets[1:] - _HELD_OUT[split]
  # Targets items[1 : len - 2]: every training item after the first.
  counts = np.maximum(lengths - _HELD_OUT["valid"] - 1, 0)
  users = np.repeat(np.arange(len(lengths)), counts)
  first = np.repeat(np.cumsum(counts) - counts, counts)
  ends = offsets[users] + 1 + (np.arange(len(users)) - first)
  return users, offsets[users], ends


@dataclasses.dataclass(frozen=True)
class Split:
  """The next-item examples of one leave-one-out split.

  Example n belongs to user `users[n]`; its history is
  `items[starts[n]:ends[n]]` (chronological) and its target
  `targets[n] == items[ends[n]]`.

  Attributes:
    name: "train", "valid" or "test".
    users: int64 [N].
    starts: int64 [N], first history position in `items`.
    ends: int64 [N], one past the last history position (the target's).
    targets: int32 [N].
    items: int32 [num_interactions], the dataset's `sequence_items`.
  """

  name: str
  users: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  targets: np.ndarray
  items: np.ndarray

  def __len__(self) -> int:
    return len(self.users)

  def history(self, n: int) -> np.ndarray:
    """Example n's history (int32, chronological)."""
    return self.items[self.starts[n] : self.ends[n]]

  def histories(self) -> list[np.ndarray]:
    """Every example's history, as views into `items`."""
    return [
      self.items[a:b] for a, b in zip(self.starts, self.ends, strict=True)
    ]

  def padded_histories(
    self, indices: np.ndarray, length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """The `length` most recent history items of examples `indices`.

    Args:
      indices: int [B] example numbers.
      length: columns; shorter histories are left-padded with item 0.

    Returns:
      (items int32 [B, length], mask bool [B, length] True on real items);
      the most recent item sits in the last column.
    """
    positions = self.ends[indices][:, None] + np.arange(-length, 0)[None, :]
    mask = positions >= self.starts[indices][:, None]
    history = np.where(mask, self.items[np.maximum(positions, 0)], 0)
    return history.astype(np.int32), mask


def kcore(
  users: np.ndarray, items: np.ndarray, k: int
) -> tuple[np.ndarray, dict[str, int]]:
  """Repeated k-core filtering until stable.

  Args:
    users: int [N] user codes.
    items: int [N] item codes.
    k: minimum interactions per user and per item.

  Returns:
    (keep mask [N], counts: rows dropped by the item rule, by the user rule,
    and the number of rounds until stable).
  """
  keep = np.ones(len(users), dtype=bool)
  dropped = {"kcore_item": 0, "kcore_user": 0}
  rounds = 0
  while True:
    rounds += 1
    changed = False
    for codes, reason in ((items, "kcore_item"), (users, "kcore_user")):
      counts = np.bincount(codes[keep], minlength=codes.max() + 1)
      drop = keep & (counts[codes] < k)
      if drop.any():
        dropped[reason] += int(drop.sum())
        keep &= ~drop
        changed = True
    if not changed:
      return keep, dropped | {"kcore_rounds": rounds}


def _ranks(codes: np.ndarray, vocab: list[str]) -> tuple[np.ndarray, list[str]]:
  """Maps surviving codes to natural-sort ranks of their raw ids."""
  # bincount instead of np.unique: codes are dense small integers, and
  # numpy 2's hash-based unique is far slower on a million of them.
  present = np.flatnonzero(np.bincount(codes, minlength=len(vocab)))
  ordered = natural_order(vocab[c] for c in present)
  rank_of = {raw_id: rank for rank, raw_id in enumerate(ordered)}
  lookup = np.full(len(vocab), -1, dtype=np.int64)
  lookup[present] = [rank_of[vocab[c]] for c in present]
  return lookup[codes], ordered


def process(
  data: raw.RawInteractions,
  min_interactions: int = 5,
  positive_rating: float = 4.0,
) -> ProcessedDataset:
  """Applies the OpenP5 protocol (see the module docstring).

  Args:
    data: rows from a reader, in file order.
    min_interactions: k of the k-core; at least MIN_SEQUENCE_LENGTH.
    positive_rating: user-item positives need rating >= this (ignored for
      sources without ratings, where every interaction is positive).

  Returns:
    The ProcessedDataset, with `stats` filled in.

  Raises:
    ValueError: min_interactions below MIN_SEQUENCE_LENGTH.
    EmptyDatasetError: nothing survives the k-core.
  """
  if min_interactions < MIN_SEQUENCE_LENGTH:
    raise ValueError(
      f"min_interactions must be >= {MIN_SEQUENCE_LENGTH} (training, "
      f"validation and test need one item each); got {min_interactions}."
    )
  unique = first_occurrences(data)
  duplicate_rows = int((~unique).sum())
  keep, kcore_counts = kcore(
    data.users[unique], data.items[unique], min_interactions
  )
  keep = _expand(keep, unique)
  rounds = kcore_counts.pop("kcore_rounds")
  implausible = 0
  if data.has_time:
    low, high = PLAUSIBLE_TIMESTAMPS
    implausible = int(
      ((data.timestamps < low) | (data.timestamps >= high)).sum()
    )
    if implausible:
      logging.warning(
        "%s: %d of %d timestamps fall outside 1990-2100 (in milliseconds, "
        "or placeholders?); kept as they are, but rows of one user are "
        "ordered by them.",
        data.name,
        implausible,
        len(data),
      )
  if not keep.any():
    raise files.EmptyDatasetError(
      f"{data.name}: no interactions left after {min_interactions}-core "
      f"filtering of {len(data)} rows from {len(data.user_vocab)} users and "
      f"{len(data.item_vocab)} items (dropped: "
      f"{ {'duplicate_rows': duplicate_rows} | kcore_counts }). Lower "
      "min_interactions or use more data."
    )
  rows = np.flatnonzero(keep)
  user_index, user_ids = _ranks(data.users[rows], data.user_vocab)
  item_index, item_ids = _ranks(data.items[rows], data.item_vocab)

  # Two stable sorts: by time, then by user. Rows of one user end up in time
  # order, equal timestamps in file order.
  order = np.argsort(data.timestamps[rows], kind="stable")
  order = order[np.argsort(user_index[order], kind="stable")]
  rows = rows[order]
  user_index = user_index[order]
  item_index = item_index[order]
  timestamps = data.timestamps[rows]
  has_ratings = data.ratings is not None
  if has_ratings:
    ratings = data.ratings[rows]
  else:
    ratings = np.full(len(rows), np.nan, np.float32)

  lengths = np.bincount(user_index, minlength=len(user_ids))
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  # The training part: the valid split's histories.
  _, _, train_ends = _split_bounds(offsets, "valid")
  in_train = np.arange(len(rows)) < train_ends[user_index]
  item_item_pairs, self_pairs = _item_item_pairs(
    user_index, item_index, in_train
  )
  positive = (
    in_train & (ratings >= positive_rating) if has_ratings else in_train
  )
  user_item_pairs = np.stack([user_index[positive], item_index[positive]], 1)

  infos = [data.item_info.get(raw_id) for raw_id in item_ids]
  titles, texts, attributes = _item_columns(infos, item_ids)
  catalog = set(data.item_info)
  pair_keys = np.sort(user_index * len(item_ids) + item_index)
  stats = {
    "dataset": data.name,
    "users": len(user_ids),
    "items": len(item_ids),
    "interactions": len(rows),
    "train_examples": len(_split_bounds(offsets, "train")[0]),
    "valid": len(user_ids),
    "test": len(user_ids),
    "raw_interactions": len(data),
    "raw_users": len(data.user_vocab),
    "raw_items": len(data.item_vocab),
    "dropped": dict(data.dropped)
    | {"duplicate_rows": duplicate_rows}
    | kcore_counts,
    "kcore": min_interactions,
    "kcore_rounds": rounds,
    "catalog_items": len(catalog),
    "catalog_items_never_interacted": len(catalog - set(data.item_vocab)),
    "items_without_metadata": sum(info is None for info in infos),
    "item_item_pairs": len(item_item_pairs),
    "item_item_self_pairs_skipped": self_pairs,
    "user_item_pairs": len(user_item_pairs),
    "positive_rule": (
      f"rating >= {positive_rating}" if has_ratings else "every interaction"
    ),
    "mean_sequence_length": round(float(lengths.mean()), 2),
    "max_sequence_length": int(lengths.max()),
    "tied_timestamps": _count_ties(user_index, timestamps),
    "duplicate_user_item": int((pair_keys[1:] == pair_keys[:-1]).sum()),
    "implausible_timestamps": implausible,
    **_sequential_id_figures(data.items[rows], item_index, offsets),
  }
  if stats["item_index_first_appearance_spearman"] > SEQUENTIAL_ID_WARNING:
    logging.warning(
      "%s: item indices follow the order in which items first appear in the "
      "file (Spearman %.3f): the raw ids look sequentially numbered, which "
      "leaks sequence information into item ids (P5 PR #3). Renumber them "
      "(e.g. randomly) before comparing with other work.",
      data.name,
      stats["item_index_first_appearance_spearman"],
    )
  stats.update({k: v for k, v in data.notes.items() if k not in stats})
  return ProcessedDataset(
    name=data.name,
    user_ids=user_ids,
    item_ids=item_ids,
    item_titles=titles,
    item_texts=texts,
    item_attributes=attributes,
    sequence_offsets=offsets,
    sequence_items=item_index.astype(np.int32),
    ratings=ratings.astype(np.float32),
    timestamps=timestamps.astype(np.int64),
    item_item_pairs=item_item_pairs.astype(np.int32).reshape(-1, 2),
    user_item_pairs=user_item_pairs.astype(np.int32).reshape(-1, 2),
    stats=stats,
  )


def first_occurrences(data: raw.RawInteractions) -> np.ndarray:
  """bool [N]: False on rows that repeat an earlier row exactly.

  Exact: same user, item, timestamp and rating (ratings compared as stored,
  float32). Only pairs seen more than once are sorted, so data without
  repeats (ML-1M) costs one sort of the pair keys.
  """
  unique = np.ones(len(data), dtype=bool)
  if not len(data):
    return unique
  pairs = data.users * (int(data.items.max()) + 1) + data.items
  # np.sort rather than np.unique: numpy 2's hash-based unique is slow here.
  ordered = np.sort(pairs)
  repeated_pairs = ordered[1:][ordered[1:] == ordered[:-1]]
  if not len(repeated_pairs):
    return unique
  rows = np.flatnonzero(np.isin(pairs, repeated_pairs))
  keys = [rows, data.timestamps[rows], pairs[rows]]
  if data.ratings is not None:
    keys.insert(1, data.ratings[rows])
  # lexsort's primary key is the last one; the row number (file order)
  # breaks the remaining ties, so each group of equal rows starts with its
  # earliest line, the one kept.
  order = rows[np.lexsort(keys)]
  same = (pairs[order][1:] == pairs[order][:-1]) & (
    data.timestamps[order][1:] == data.timestamps[order][:-1]
  )
  if data.ratings is not None:
    same &= data.ratings[order][1:] == data.ratings[order][:-1]
  unique[order[1:][same]] = False
  return unique


def _expand(keep: np.ndarray, where: np.ndarray) -> np.ndarray:
  """A mask over all rows from a mask over the rows `where` selects."""
  full = np.zeros(len(where), dtype=bool)
  full[where] = keep
  return full


def _sequential_id_figures(
  codes: np.ndarray, item_index: np.ndarray, offsets: np.ndarray
) -> dict[str, float]:
  """How far item indices follow first appearance (the P5 leak's footprint).

  Args:
    codes: int [R] item codes of the kept rows; codes number items in order
      of first appearance in the file (raw.InteractionBuilder).
    item_index: int [R] the same rows' item indices, in sequence order.
    offsets: int64 [U + 1] sequence offsets into those rows.

  Returns:
    item_index_first_appearance_spearman: Spearman's rho of index against
      first-appearance rank among kept items (1 = numbered in that order).
    next_item_is_index_plus_one: share of consecutive pairs of a user's
      sequence whose second item has the first item's index + 1.
  """
  index_of_code = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
  index_of_code[codes] = item_index
  # In code order = first-appearance order; both rankings are permutations
  # of 0..n-1, so rho = 1 - 6 sum d^2 / (n (n^2 - 1)).
  ranked = index_of_code[index_of_code >= 0].astype(np.float64)
  n = len(ranked)
  rho = 0.0
  if n > 1:
    d = ranked - np.arange(n)
    rho = 1.0 - 6.0 * float(d @ d) / (n * (n * n - 1.0))
  same_user = np.ones(max(len(item_index) - 1, 0), dtype=bool)
  same_user[offsets[1:-1] - 1] = False  # a user's last -> the next's first
  steps = (item_index[1:] == item_index[:-1] + 1)[same_user]
  return {
    "item_index_first_appearance_spearman": round(rho, 4),
    "next_item_is_index_plus_one": round(
      float(steps.mean()) if len(steps) else 0.0, 4
    ),
  }


def _item_item_pairs(
  user_index: np.ndarray, item_index: np.ndarray, in_train: np.ndarray
) -> tuple[np.ndarray, int]:
  """(item, next item) of the same user within training parts.

  Returns the pairs and how many self-pairs (a repeated item, possible in
  review data) were left out: they carry no item-item signal.
  """
  consecutive = in_train[:-1] & in_train[1:]
  consecutive &= user_index[:-1] == user_index[1:]
  pairs = np.stack([item_index[:-1], item_index[1:]], axis=1)[consecutive]
  self_pairs = pairs[:, 0] == pairs[:, 1]
  return pairs[~self_pairs], int(self_pairs.sum())


def _item_columns(infos: list[raw.ItemInfo | None], item_ids: list[str]):
  """Titles, texts and attribute columns; items without info show their id."""
  pairs = list(zip(infos, item_ids, strict=True))
  titles = [info.title if info else item_id for info, item_id in pairs]
  texts = [info.text if info else item_id for info, item_id in pairs]
  fields = sorted({f for info in infos if info for f in info.attributes})
  attributes = {
    f: [info.attributes.get(f, "") if info else "" for info in infos]
    for f in fields
  }
  return titles, texts, attributes


def _count_ties(users: np.ndarray, timestamps: np.ndarray) -> int:
  """Rows whose timestamp equals the previous row of the same user."""
  same = (users[1:] == users[:-1]) & (timestamps[1:] == timestamps[:-1])
  return int(same.sum())
