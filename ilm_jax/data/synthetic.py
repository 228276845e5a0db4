"""A small synthetic dataset with planted structure, for tests of every phase.

Items fall into `num_clusters` contiguous blocks, each with its own genre
word; user u belongs to cluster u % num_clusters. A user's sequence walks its
cluster's items in cyclic order from a random start (occasionally skipping
one), with a few items from other clusters mixed in. So:

- the next item is mostly the cluster successor of the current one
  (sequential signal for SASRec-style models);
- users of a cluster share items (collaborative signal for MF);
- item text names the cluster's genre (item-text signal for the Q-Former);
- in-cluster ratings are 4-5 and off-cluster ratings 1-2, so user-item
  positives (rating >= 4) are the in-cluster items.

No user repeats an item. The output is deterministic given the arguments and
goes through the same processing as real data.
"""

import numpy as np

from ilm_jax.data import raw

GENRES = (
  "Action",
  "Comedy",
  "Drama",
  "Horror",
  "Romance",
  "Western",
  "Musical",
  "Mystery",
)
_MOODS = ("bright", "dark", "quiet", "loud", "strange")


def item_cluster(item: int, num_items: int, num_clusters: int) -> int:
  """The planted cluster of raw item number `item` (contiguous blocks)."""
  return item * num_clusters // num_items


def generate(
  num_users: int = 60,
  num_items: int = 40,
  num_clusters: int = 4,
  min_length: int = 6,
  max_length: int = 10,
  off_cluster_rate: float = 0.1,
  skip_rate: float = 0.2,
  seed: int = 0,
) -> raw.RawInteractions:
  """Generates the rows of a planted-structure dataset.

  Raw ids are "user_<u>" and "item_<i>", so after processing (which sorts ids
  naturally) user index u is raw user u, and item index i is raw item i
  when every item survives the k-core (it does with the defaults).

  Args:
    num_users: number of users.
    num_items: number of items; at most len(GENRES) clusters.
    num_clusters: number of user/item clusters.
    min_length: shortest sequence.
    max_length: longest sequence; at most the cluster size plus room for
      off-cluster items.
    off_cluster_rate: probability that a step takes an item of another
      cluster.
    skip_rate: probability that a step skips one item of the cycle.
    seed: random seed.

  Returns:
    RawInteractions with ratings and item info (genre, mood).
  """
  if not 1 <= num_clusters <= len(GENRES) or num_items < num_clusters:
    raise ValueError(
      f"need 1 <= num_clusters <= {len(GENRES)} and num_items >= num_clusters"
    )
  rng = np.random.default_rng(seed)
  blocks = [
    [
      i
      for i in range(num_items)
      if item_cluster(i, num_items, num_clusters) == c
    ]
    for c in range(num_clusters)
  ]
  builder = raw.InteractionBuilder(with_ratings=True)
  for user in range(num_users):
    cluster = user % num_clusters
    block = blocks[cluster]
    length = int(rng.integers(min_length, max_length + 1))
    used: list[int] = []
    position = int(rng.integers(len(block)))
    while len(used) < min(length, num_items):
      in_cluster_left = [i for i in block if i not in used]
      if rng.random() < off_cluster_rate or not in_cluster_left:
        others = [
          i for i in range(num_items) if i not in used and i not in block
        ]
        if others:
          used.append(int(rng.choice(others)))
          continue
      if rng.random() < skip_rate:
        position += 1
      while block[position % len(block)] in used:
        position += 1
      used.append(block[position % len(block)])
      position += 1
    for step, item in enumerate(used):
      in_cluster = item in block
      rating = float(rng.integers(4, 6) if in_cluster else rng.integers(1, 3))
      # Distinct, increasing timestamps per user.
      builder.add(
        f"user_{user}", f"item_{item}", 1_000_000 + 1_000 * user + step, rating
      )

  item_info = {}
  for item in range(num_items):
    genre = GENRES[item_cluster(item, num_items, num_clusters)]
    mood = _MOODS[item % len(_MOODS)]
    item_info[f"item_{item}"] = raw.ItemInfo(
      title=f"{genre} Story {item}",
      attributes={
        "genres": genre,
        "description": f"A {mood} {genre.lower()} film.",
      },
    )
  notes = {
    "planted": (
      f"{num_clusters} clusters; user u in cluster u % {num_clusters}; "
      "items in contiguous blocks"
    )
  }
  # The timestamps above order each user's rows; they are not real dates.
  return builder.build(
    "synthetic",
    item_info,
    "the synthetic generator",
    notes=notes,
    has_time=False,
  )
