"""Test helpers over processed datasets and example sets.

The leave-one-out targets written out by hand from a user's full sequence,
independent of `ProcessedDataset.leave_one_out`, so tests can check that
split against them; and one example of an `Examples` as a dict.
"""

import numpy as np


def train_sequence(ds, user: int) -> np.ndarray:
  """items[:-2]: what training may see of this user."""
  return ds.sequence(user)[:-2]


def valid_target(ds, user: int) -> int:
  """items[-2]."""
  return int(ds.sequence(user)[-2])


def test_target(ds, user: int) -> int:
  """items[-1]."""
  return int(ds.sequence(user)[-1])


test_target.__test__ = False  # not a pytest test


def element(examples, index: int) -> dict:
  """Example `index` of a pipeline.Examples, without the batch axis."""
  return {k: v[0] for k, v in examples.gather([index]).items()}
