r"""MovieLens-100K: the ML-1M experiment with ML-100K data and sizes.

  python -m ilm_jax.main --config=configs/ml100k.py:cpu --workdir=/tmp/ilm_ml100k

Same modes as configs/ml1m.py (full, cpu, tiny); `tiny` is unchanged
(synthetic data). ML-100K after 5-core: 943 users, 1,349 items, 99,287
interactions, so a CF epoch is a few batches and budgets are in epochs.
"""

import ml_collections

from configs import common, ml1m


def _ml100k(config: ml_collections.ConfigDict) -> None:
  """ML-100K data and budgets, for the full and cpu sizes alike."""
  config.data.dataset = "ml100k"
  # MF: 943 users in batches of 128 (7 steps an epoch), 150 epochs.
  config.cf.train.update(batch_size=128, steps=1000, eval_every=100)
  # SASRec: the SASRec paper's window of 200 fits ML-100K's budget on CPU
  # (44% of its positions are real, hence the smaller logits budget).
  # 7 steps of 128 users an epoch; 50 epochs.
  config.cf.sasrec.model.update(
    max_length=200, target_fraction=0.55, dropout_rate=0.2
  )
  config.cf.sasrec.optim.warmup_steps = 30
  config.cf.sasrec.train.update(steps=350, eval_every=35, log_every=35)
  # 99,287 states of d=64 (25 MB, 21 s): ilm.data.user_state="sequence".
  config.cf.sasrec.export_sequence_states = True
  # Phase 2: every one of the 943 test users is ranked (seen and unseen
  # templates), a second benchmark beside ML-1M's user subsets.
  config.ilm.evals.rank.num_users = 0
  config.ilm.evals.rank_masked.num_users = 0
  config.ilm.evals.rank_prior.num_users = 0
  config.ilm.evals.shuffle.num_users = 0
  config.ilm.evals.naming.num_users = 0
  config.ilm.evals.cf_signal.num_users = 0


# ml1m.py's sizes, then this block; `tiny` stays ml1m's (synthetic data).
SIZES = {"full": _ml100k, "cpu": _ml100k, "tiny": lambda config: None}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ML-1M's config at the size named by `arg`, with ML-100K's block."""
  size = common.parse_mode(arg)
  config = ml1m.get_config(size)
  with common.locked(config):
    SIZES[size](config)
  return config
