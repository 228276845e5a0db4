"""Interactions as read from a source, before any filtering or indexing.

Every source reader (MovieLens, OpenP5, Amazon, synthetic) returns a
`RawInteractions`; `processing.process` turns it into the OpenP5 protocol's
`ProcessedDataset`. Rows stay in file order here: that order breaks ties
between equal timestamps later.
"""

import dataclasses
import math

import numpy as np

from ilm_jax.data import files, text


@dataclasses.dataclass
class ItemInfo:
  """What a source knows about one item.

  Attributes:
    title: the readable title ("The Shawshank Redemption (1994)").
    attributes: field name -> plain-text value (year, genres, brand, ...).
      Fields listed in `text.TEXT_FIELDS` also go into the item text.
    match_titles: source-form titles without the year, used to match the item
      against the movie metadata database (MovieLens only).
  """

  title: str
  attributes: dict[str, str] = dataclasses.field(default_factory=dict)
  match_titles: tuple[str, ...] = ()

  @property
  def text(self) -> str:
    return text.item_text(self.title, self.attributes)


@dataclasses.dataclass
class RawInteractions:
  """All interaction rows of a source, in file order, with ids factorised.

  Attributes:
    name: dataset name used in stats and cache keys ("ml1m", ...).
    users: int64 [N], codes into `user_vocab`.
    items: int64 [N], codes into `item_vocab`.
    timestamps: int64 [N], Unix seconds (>= 0, checked by the readers).
      Sources without time (OpenP5) store the position in the user's line,
      which is their order, and set `has_time` False.
    ratings: float32 [N], or None if the source has no ratings.
    user_vocab: code -> raw user id, in order of first appearance. This order
      never becomes an index (processing numbers ids by their natural sort),
      but ids that a source already numbered in order of appearance keep
      that order; processing reports how closely item indices follow it.
    item_vocab: code -> raw item id.
    item_info: raw item id -> ItemInfo for every item the source describes,
      including catalogue items nobody interacted with.
    dropped: reader-level rows skipped, by reason (e.g. blank lines).
    notes: extra figures for the stats (e.g. metadata match rates).
    has_time: whether `timestamps` are Unix seconds (False: positions).
  """

  name: str
  users: np.ndarray
  items: np.ndarray
  timestamps: np.ndarray
  ratings: np.ndarray | None
  user_vocab: list[str]
  item_vocab: list[str]
  item_info: dict[str, ItemInfo]
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)
  notes: dict = dataclasses.field(default_factory=dict)
  has_time: bool = True

  def __len__(self) -> int:
    return len(self.users)


class InteractionBuilder:
  """Accumulates rows one at a time and factorises ids on the fly.

  Factorising while reading keeps a million-row file at a few hundred MB of
  Python objects less than collecting the strings first.
  """

  def __init__(self, with_ratings: bool):
    self._with_ratings = with_ratings
    self._user_codes: dict[str, int] = {}
    self._item_codes: dict[str, int] = {}
    self._users: list[int] = []
    self._items: list[int] = []
    self._timestamps: list[int] = []
    self._ratings: list[float] = []

  def add(
    self, user: str, item: str, timestamp: int, rating: float = math.nan
  ) -> None:
    """Appends one interaction row.

    Readers pass ids already stripped (files.parse_id) and numbers already
    range-checked (files.parse_timestamp / parse_rating), so that a bad
    value is reported with its file and line.
    """
    users = self._user_codes
    items = self._item_codes
    self._users.append(users.setdefault(user, len(users)))
    self._items.append(items.setdefault(item, len(items)))
    self._timestamps.append(timestamp)
    if self._with_ratings:
      self._ratings.append(rating)

  def __len__(self) -> int:
    return len(self._users)

  @property
  def item_ids(self) -> set[str]:
    """Raw ids of the items seen so far."""
    return set(self._item_codes)

  def build(
    self,
    name: str,
    item_info: dict[str, ItemInfo],
    source_files: str,
    dropped: dict[str, int] | None = None,
    notes: dict | None = None,
    has_time: bool = True,
  ) -> RawInteractions:
    """Returns the collected rows as arrays.

    Args:
      name: the dataset name.
      item_info: raw item id -> ItemInfo.
      source_files: a description of what was read, for the empty-data error.
      dropped: reader-level drop counts.
      notes: extra stats.
      has_time: False when timestamps are positions, not Unix seconds.

    Returns:
      The RawInteractions.

    Raises:
      EmptyDatasetError: no rows were read.
    """
    if not self._users:
      raise files.EmptyDatasetError(
        f"{name}: no interactions found in {source_files}."
      )
    return RawInteractions(
      name=name,
      users=np.asarray(self._users, dtype=np.int64),
      items=np.asarray(self._items, dtype=np.int64),
      timestamps=np.asarray(self._timestamps, dtype=np.int64),
      ratings=(
        np.asarray(self._ratings, dtype=np.float32)
        if self._with_ratings
        else None
      ),
      user_vocab=list(self._user_codes),
      item_vocab=list(self._item_codes),
      item_info=item_info,
      dropped=dict(dropped or {}),
      notes=dict(notes or {}),
      has_time=has_time,
    )
