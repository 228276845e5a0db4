r"""MovieLens-100K: the ML-1M experiment with ML-100K data and sizes.

  python -m ilm_jax.main --config=configs/ml100k.py:cpu --workdir=/tmp/ilm_ml100k

Same modes as configs/ml1m.py (full, cpu, tiny); `tiny` is unchanged
(synthetic data). ML-100K after 5-core: 943 users, 1,349 items, 99,287
interactions, so a CF epoch is a few batches and budgets are in epochs.
"""

import ml_collections

from configs import ml1m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml1m.get_config(arg)
  if config.mode == "tiny":
    return config
  config.data.dataset = "ml100k"

  # MF: 943 users in batches of 128 (7 steps an epoch), 150 epochs.
  config.cf.train.batch_size = 128
  config.cf.train.steps = config.cf.optim.steps = 1000
  config.cf.train.eval_every = 100

  # SASRec: the SASRec paper's window of 200 fits ML-100K's budget on CPU
  # (44% of its positions are real, hence the smaller logits budget).
  # 7 steps of 128 users an epoch; 50 epochs.
  sasrec = config.cf.sasrec
  sasrec.model.max_length = 200
  sasrec.model.target_fraction = 0.55
  sasrec.model.dropout_rate = 0.2
  sasrec.train.steps = sasrec.optim.steps = 350
  sasrec.optim.warmup_steps = 30
  sasrec.train.eval_every = 35
  sasrec.train.log_every = 35
  return config
