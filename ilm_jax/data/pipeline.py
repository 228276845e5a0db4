"""From a ProcessedDataset to batches: every phase's examples and iterators.

An `Examples` is a numbered set of examples with a vectorised
`gather(indices) -> batch`: a batch of 1,024 rows is a few numpy gathers,
not 1,024 element calls. Every phase's training data is one:

  mf_examples          users with their training item counts (CF/MF)
  sasrec_windows       one left-padded window per user (SASRec)
  qformer_examples     item-item pair + user-item pair + item text (phase 1)
  ilm_tasks.training_prompts  encoded multi-task prompts (phase 2; one
                       task per global batch, padded to that task's length)
  sequential_examples  user, left-padded history, target (any split; the
                       ranking evaluator's users)

`training_iterator` runs an `Examples` through stock grain: the example
numbers `MapDataset.range(n)`, sliced by process, shuffled with a seed that
changes every epoch, batched within an epoch (the remainder dropped, so a
batch never straddles an epoch) by the vectorised gather, and repeated
forever. Its state is grain's `{"next_index": batches_produced}`, which
checkpoints save with the train state. `eval_batches` is the one evaluation
batcher: an ordered pass in fixed-shape batches padded by repetition, with
a validity mask.

Every split follows `ProcessedDataset.leave_one_out`.
"""

from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from ilm_jax.data import processing
from ilm_jax.models import bert

Batch = dict[str, np.ndarray]


class Examples:
  """A numbered example set whose batches come from a vectorised gather.

  Args:
    length: number of examples (> 0).
    gather_fn: int64 [B] example numbers in [0, length) -> dict of arrays
      with a leading axis B.
    name: shown in errors and logs.

  Raises:
    ValueError: no examples.
  """

  def __init__(
    self, length: int, gather_fn: Callable[[np.ndarray], Batch], name: str
  ):
    if length <= 0:
      raise ValueError(f"{name}: no examples.")
    self._length = length
    self._gather_fn = gather_fn
    self.name = name

  def __len__(self) -> int:
    return self._length

  def __repr__(self) -> str:
    return f"Examples({self.name}, {self._length} examples)"

  def gather(self, indices: Sequence[int] | np.ndarray) -> Batch:
    """The examples at `indices` (taken modulo the length), stacked."""
    return self._gather_fn(np.asarray(indices, dtype=np.int64) % self._length)


def stacked(
  length: int, element_fn: Callable[[int], Batch], name: str
) -> Examples:
  """Examples from a per-example function, stacked along a leading axis."""

  def gather(indices: np.ndarray) -> Batch:
    elements = [element_fn(int(i)) for i in indices]
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}

  return Examples(length, gather, name)


def training_iterator(
  examples: Examples,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  read_options: grain.ReadOptions | None = None,
  shuffle: bool = True,
) -> grain.DatasetIterator:
  """An endless, deterministic, checkpointable iterator of training batches.

  Args:
    examples: the training examples.
    batch_size: per-process batch size; each epoch drops its remainder.
    seed: shuffling seed (grain reseeds every epoch from it).
    process_index: this process (jax.process_index()); it reads examples
      process_index, process_index + process_count, ...
    process_count: number of processes (jax.process_count()).
    read_options: grain prefetch settings; default 2 threads, 8 batches.
    shuffle: False keeps the examples in order (for examples that are
      independent random draws already, and whose consecutive examples must
      stay in one batch: the one-task phase-2 batches).

  Returns:
    A grain DatasetIterator of dict batches. `get_state()` returns
    {"next_index": int} (JSON-serialisable); `set_state` on a fresh iterator
    over the same examples and arguments resumes with the same batches.

  Raises:
    ValueError: process_index outside [0, process_count), or a batch larger
      than this process's shard.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} not in [0, {process_count})."
    )
  numbers = grain.MapDataset.range(len(examples))[process_index::process_count]
  if len(numbers) < batch_size:
    raise ValueError(
      f"batch_size {batch_size} exceeds the {len(numbers)} examples of "
      f"this shard of {examples.name}."
    )
  if shuffle:
    numbers = numbers.shuffle(seed=seed)
  batches = numbers.batch(
    batch_size, drop_remainder=True, batch_fn=examples.gather
  ).repeat()
  read_options = read_options or grain.ReadOptions(
    num_threads=2, prefetch_buffer_size=8
  )
  return iter(batches.to_iter_dataset(read_options))


def process_training_iterator(
  examples: Examples, global_batch_size: int, seed: int, shuffle: bool = True
) -> grain.DatasetIterator:
  """`training_iterator` over this process's share of each global batch."""
  return training_iterator(
    examples,
    global_batch_size // jax.process_count(),
    seed,
    jax.process_index(),
    jax.process_count(),
    shuffle=shuffle,
  )


def eval_batches(
  examples: Examples,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """One ordered pass over this process's examples in fixed-shape batches.

  Short batches are padded by repeating an example; "mask" marks real rows,
  so jitted eval steps see one shape and metrics skip padding. Every process
  yields the same number of batches (enough for the largest shard), as
  collective steps over a multi-host mesh need all processes to take part.

  Args:
    examples: the examples.
    batch_size: rows per batch (this process's).
    process_index: this process; it takes examples process_index,
      process_index + process_count, ...
    process_count: number of processes.

  Yields:
    Dict batches with an extra bool "mask" [batch_size].

  Raises:
    ValueError: the examples have a "mask" of their own.
  """
  shard = np.arange(process_index, len(examples), process_count)
  largest_shard = -(-len(examples) // process_count)
  for start in range(0, largest_shard, batch_size):
    chunk = shard[start : start + batch_size]
    real = len(chunk)
    filler = chunk[0] if real else 0
    chunk = np.concatenate([chunk, np.full(batch_size - real, filler)])
    batch = examples.gather(chunk)
    if "mask" in batch:
      raise ValueError(f"{examples.name}: examples must not have a 'mask'.")
    batch["mask"] = np.arange(batch_size) < real
    yield batch


def shard_size(num_examples: int, process_index: int, process_count: int):
  """How many of `num_examples` the process reads (training and eval)."""
  return len(range(process_index, num_examples, process_count))


def sequential_examples(
  ds: processing.ProcessedDataset, split: str, max_history: int
) -> Examples:
  """Next-item examples of one leave-one-out split.

  Args:
    ds: the processed dataset.
    split: "train", "valid" or "test" (see `ProcessedDataset.leave_one_out`).
    max_history: history length; histories keep their most recent items and
      shorter ones are left-padded with 0.

  Returns:
    Examples of {"user": int32, "history": int32 [max_history],
    "history_mask": bool [max_history] (True on real items), "target": int32}.

  Raises:
    ValueError: an unknown split.
  """
  examples = ds.leave_one_out(split)

  def gather(indices: np.ndarray) -> Batch:
    history, mask = examples.padded_histories(indices, max_history)
    return {
      "user": examples.users[indices].astype(np.int32),
      "history": history,
      "history_mask": mask,
      "target": examples.targets[indices].astype(np.int32),
    }

  return Examples(len(examples), gather, f"{ds.name}/sequential/{split}")


def training_item_lists(
  ds: processing.ProcessedDataset, interactions: str = "all"
) -> list[np.ndarray]:
  """Per user, the items MF trains on (never validation or test targets).

  Args:
    ds: the processed dataset.
    interactions: "all" (every item of the training part items[:-2]) or
      "positive" (the user-item positives, rating >= data.positive_rating).

  Returns:
    One int array per user.

  Raises:
    ValueError: another `interactions`.
  """
  if interactions == "all":
    return ds.leave_one_out("valid").histories()
  if interactions == "positive":
    pairs = ds.user_item_pairs
    order = np.argsort(pairs[:, 0], kind="stable")
    bounds = np.searchsorted(pairs[order, 0], np.arange(ds.num_users + 1))
    items = pairs[order, 1]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
  raise ValueError(
    f"cf.model.interactions={interactions!r}: expected 'all' or 'positive'."
  )


def mf_examples(
  ds: processing.ProcessedDataset, interactions: str = "all"
) -> Examples:
  """One example per user with training items: {"user", "item_counts"}.

  `item_counts` is a dense float32 [num_items] row (multiplicities of the
  user's `training_item_lists`), built per batch; a few MB per batch of
  users even for ML-1M.
  """
  item_lists = training_item_lists(ds, interactions)
  users = np.array([u for u, i in enumerate(item_lists) if len(i)], np.int64)
  num_items = ds.num_items

  def gather(indices: np.ndarray) -> Batch:
    batch_users = users[indices]
    lists = [item_lists[u] for u in batch_users]
    rows = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
    flat = rows * num_items + np.concatenate(lists)
    counts = np.bincount(flat, minlength=len(lists) * num_items)
    counts = counts.reshape(len(lists), num_items).astype(np.float32)
    return {"user": batch_users.astype(np.int32), "item_counts": counts}

  return Examples(len(users), gather, f"{ds.name}/mf_item_counts")


def sasrec_windows(
  ds: processing.ProcessedDataset, max_length: int
) -> Examples:
  """One left-padded window per user over the training part items[:-2].

  Window t's target is training item t + 1 and its input item t; a user
  needs two training items. Windows keep the last `max_length` targets.

  Returns:
    Examples of {"inputs": int32 [L], "targets": int32 [L],
    "target_mask": bool [L]}, where targets[t] is the item after inputs[t].
  """
  train = ds.leave_one_out("valid")  # histories = the training parts
  keep = np.flatnonzero(train.ends - train.starts >= 2)
  starts, ends = train.starts[keep], train.ends[keep]
  columns = np.arange(-max_length, 0)

  def gather(indices: np.ndarray) -> Batch:
    positions = ends[indices][:, None] + columns[None, :]
    # The first training item is never a target (it has no input).
    real = positions > starts[indices][:, None]
    targets = np.where(real, train.items[np.maximum(positions, 0)], 0)
    inputs = np.where(real, train.items[np.maximum(positions - 1, 0)], 0)
    return {
      "inputs": inputs.astype(np.int32),
      "targets": targets.astype(np.int32),
      "target_mask": real,
    }

  return Examples(len(keep), gather, f"{ds.name}/sasrec_windows/{max_length}")


def tokenize_item_texts(
  ds: processing.ProcessedDataset, max_text_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """Every item's text as MiniLM WordPiece tokens, for phase 1.

  Args:
    ds: the processed dataset.
    max_text_len: tokens per text, [CLS] and [SEP] included.

  Returns:
    (ids int32 [num_items, max_text_len], mask [num_items, max_text_len],
    how many texts were truncated).

  Raises:
    ValueError: naming the item whose text is empty.
  """
  tokenizer = bert.WordPieceTokenizer.from_pretrained(max_length=max_text_len)
  for index, text in enumerate(ds.item_texts):
    if not text.strip():
      raise ValueError(
        f"Item {ds.item_ids[index]!r} (index {index}) has an empty "
        "text; every item needs a title or description for phase 1."
      )
  encoded = tokenizer.encode(ds.item_texts)
  return encoded.ids, encoded.mask, encoded.num_truncated


def qformer_examples(
  ds: processing.ProcessedDataset,
  item_table: np.ndarray,
  user_table: np.ndarray,
  text_ids: np.ndarray,
  text_mask: np.ndarray,
) -> Examples:
  """Phase-1 examples: one per item-item pair, each with a user-item pair.

  Example k is the k-th (item a, next item b) pair of the training parts
  (ITC/ITM/ITG use a and its text; II contrasts a with b) and a user-item
  positive pair (UI) at a fixed stride, which spreads the smaller set over
  the examples.

  Args:
    ds: the processed dataset.
    item_table: float [num_items, d] CF item vectors.
    user_table: float [num_users, d] CF user vectors.
    text_ids: int [num_items, T] item text tokens (`tokenize_item_texts`).
    text_mask: [num_items, T].

  Returns:
    Examples of {"item_cf", "pair_cf", "user_cf", "user_item_cf": [d];
    "text_ids", "text_mask": [T]}.

  Raises:
    ValueError: no item-item or no user-item pairs.
  """
  ii_pairs, ui_pairs = ds.item_item_pairs, ds.user_item_pairs
  if not len(ii_pairs) or not len(ui_pairs):
    raise ValueError(
      f"{ds.name}: phase 1 needs item-item and user-item "
      "pairs; the training split has none."
    )

  def gather(indices: np.ndarray) -> Batch:
    a, b = ii_pairs[indices, 0], ii_pairs[indices, 1]
    ui = ui_pairs[(indices * 7919) % len(ui_pairs)]
    return dict(
      item_cf=item_table[a],
      pair_cf=item_table[b],
      text_ids=text_ids[a],
      text_mask=text_mask[a],
      user_cf=user_table[ui[:, 0]],
      user_item_cf=item_table[ui[:, 1]],
    )

  return Examples(len(ii_pairs), gather, f"{ds.name}/qformer")
