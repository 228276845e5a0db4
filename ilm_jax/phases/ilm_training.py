"""Phase 2: the ILM — Q-Former adapter + frozen LLM on multi-task prompts.

Inputs: the CF tables (`WORKDIR/cf/export`), the phase-1 Q-Former
(`WORKDIR/qformer[_<qformer.variant>]/export`, unless
`ilm.model.qformer_init="random"`), the frozen LLM (`ilm.llm.checkpoint`).
Only the adapter trains (Q-Former and projector; the learned prompt for the
text-only baseline); `ilm.optim.frozen` keeps `llm/` and `cf/` out of the
optimizer.

Baselines are config switches of this same code path, each writing to its
own `WORKDIR/ilm_<variant>/` and `metrics/ilm_<variant>_<split>.json`:
  mlp        adapter="mlp" (CoLLM-style MLP over the raw CF vector)
  rand       qformer_init="random" (ILM-rand: no phase 1)
  textonly   adapter="prompt" (titles as plain text, learned prompt tokens)
  zeroshot   adapter="none", train.steps=0 (the frozen LLM as is)
Phase-1 loss ablations pair a `qformer.variant` with an `ilm.variant` (see
the README). Outputs: the trained adapter in `WORKDIR/<name>/adapter`, which
the `export` phase bundles with the config and item index.
"""

import dataclasses
import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ilm_jax import checkpoint, data, layout, train, tree_utils
from ilm_jax.data import ilm_tasks, pipeline, prompts
from ilm_jax.evaluators import registry
from ilm_jax.models import ilm, llm, llm_loading, qformer


def load_qformer(config, workdir: pathlib.Path, rng):
  """The Q-Former params: phase-1 export, or a fresh (MiniLM) init."""
  qformer_config = config.qformer.model
  init = config.ilm.model.qformer_init
  if init == "phase1":
    path = layout.qformer_export(config, workdir)
    logging.info("Q-Former from phase 1: %s.", path)
    trained_on = layout.read_cf_tables_record(path)
    if trained_on not in (None, config.cf.tables):
      raise ValueError(
        f"The phase-1 Q-Former at {path} was trained on the {trained_on!r} "
        f"CF tables but cf.tables={config.cf.tables!r}: run phase 1 with "
        f"these tables (e.g. --config.qformer.variant={config.cf.tables} "
        "keeps both) or set cf.tables to match."
      )
    return checkpoint.load_params(path / "params")
  if init == "random":
    return qformer.load(
      qformer.init_params(qformer_config, rng), qformer_config
    )
  raise ValueError(
    f"ilm.model.qformer_init={init!r}; expected 'phase1' or 'random'."
  )


def warm_start_adapter(run_name: str, workdir, expected) -> dict:
  """`ilm.model.adapter_init`: the adapter another phase-2 run exported.

  A curriculum in two runs (ours, not the paper's): e.g. train the adapter
  on one task, then start the multi-task run from it with a fresh
  optimizer and schedule.

  Args:
    run_name: the earlier run's directory under WORKDIR, "ilm" or
      "ilm_<variant>" (its `adapter/` export).
    workdir: the experiment's WORKDIR.
    expected: this run's adapter as it would start otherwise, as shapes
      ({part: tree of jax.ShapeDtypeStruct}): what the export must match.

  Returns:
    {part: params} for every adapter part (`qformer`, `proj`, `prompt`,
    `lora`).

  Raises:
    CheckpointError: no export there, or one whose parts or shapes differ
      from this run's adapter (another adapter type, projector or size).
  """
  path = layout.phase_dir(workdir, run_name) / "adapter"
  logging.info("Adapter warm-started from %s.", path)
  try:
    return checkpoint.load_params(path, expected)
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(
      f"ilm.model.adapter_init={run_name!r}: {e} The export must come from "
      "a run with this adapter, projector and sizes."
    ) from e


@dataclasses.dataclass
class Phase2:
  """Everything a phase-2 run (or a benchmark of it) needs."""

  task: train.Task
  model: ilm.IlmModel
  sampler: ilm_tasks.TaskSampler
  encoder: prompts.PromptEncoder
  examples: pipeline.Examples


def make_task(config: ml_collections.ConfigDict, workdir) -> Phase2:
  """The phase-2 training task of `config` (data, model, evaluators)."""
  workdir = pathlib.Path(workdir).absolute()
  ilm_config = config.ilm
  dataset = data.load_dataset(config.data)
  # Architecture and tokenizer now; the weights are read onto the mesh by
  # `load_params` (shard by shard from an HF directory).
  llm_config = llm_loading.config_from(ilm_config.llm)
  tokenizer = llm_loading.load_tokenizer(ilm_config.llm.checkpoint)
  logging.info(
    "Frozen LLM %s: %d layers, d=%d, vocab %d.",
    ilm_config.llm.checkpoint,
    llm_config.num_layers,
    llm_config.hidden_size,
    llm_config.vocab_size,
  )
  model = ilm.build(ilm_config.model, llm_config, config.qformer.model)
  item_table, user_table = layout.read_cf_export(
    workdir,
    dataset,
    config.qformer.model.cf_dim
    if ilm_config.model.adapter == "qformer"
    else None,
    config.cf.tables,
  )
  sampler, encoder = ilm_tasks.build_prompting(config, dataset, tokenizer)
  if sampler.user_state == "sequence":
    # {user} rows num_users + p: the state before interaction p.
    user_table = np.concatenate(
      [
        user_table,
        layout.read_sequence_states(workdir, dataset, config.cf.tables),
      ]
    )
  phase1_qformer = (
    model.adapter == "qformer" and ilm_config.model.qformer_init == "phase1"
  )
  warm_start = ilm_config.model.get("adapter_init", "")

  def fresh_params(rng):
    # Random parts only (traced under jit); files are read in load_params.
    qformer_rng, proj_rng = jax.random.split(rng)
    params = {}
    if model.adapter == "qformer" and not phase1_qformer:
      params["qformer"] = load_qformer(config, workdir, qformer_rng)
    adapter = ilm.init_adapter(
      model, proj_rng, item_table.shape[1], config.qformer.model.hidden_size
    )
    if adapter:
      params["prompt" if model.adapter == "prompt" else "proj"] = adapter
    if llm_config.lora_rank:  # ilm.llm.lora: the LLM adapts (not the paper)
      # A key of its own, so the other parts start as they do without LoRA.
      params["lora"] = llm.init_lora(llm_config, jax.random.fold_in(rng, 1))
    return params

  def init_params(rng):
    return {} if warm_start else fresh_params(rng)

  def load_params(mesh, mesh_config):
    params = dict(cf=dict(items=item_table, users=user_table))
    if warm_start:
      expected = tree_utils.unbox(
        jax.eval_shape(fresh_params, jax.random.key(0))
      )
      if phase1_qformer:
        expected["qformer"] = checkpoint.abstract_like(
          load_qformer(config, workdir, None)
        )
      params.update(warm_start_adapter(warm_start, workdir, expected))
    elif phase1_qformer:
      params["qformer"] = load_qformer(config, workdir, None)
    _, params["llm"], _ = llm_loading.load_from_config(
      ilm_config.llm, mesh, mesh_config.logical_axis_rules
    )
    return params

  one_task = ilm_config.data.one_task_batches
  examples = ilm_tasks.training_prompts(
    sampler,
    encoder,
    ilm_config.data.examples_per_epoch,
    group_size=ilm_config.train.batch_size if one_task else 0,
  )
  iterator = pipeline.process_training_iterator(
    examples,
    ilm_config.train.batch_size,
    config.seed,
    # Examples are independent draws already; one-task batches need
    # consecutive examples to stay together.
    shuffle=not one_task,
  )
  evaluators = registry.from_config(
    ilm_config.evals,
    model=model,
    sampler=sampler,
    encoder=encoder,
    tokenizer=tokenizer,
    dataset=dataset,
    seed=config.seed,
  )
  task = train.Task(
    name=layout.phase_name(config, "ilm"),
    init_params=init_params,
    load_params=load_params,
    loss_fn=model.loss,
    train_iterator=iterator,
    evaluators=evaluators,
    optional_param_groups=ilm.ADAPTER_PARTS,
    dataset_record=dataset.record(),
  )
  return Phase2(
    task=task, model=model, sampler=sampler, encoder=encoder, examples=examples
  )


def run(config: ml_collections.ConfigDict, workdir, mesh: Mesh) -> dict:
  """Trains and evaluates one ILM variant; returns its summary."""
  workdir = pathlib.Path(workdir).absolute()
  phase2 = make_task(config, workdir)
  result = train.train(
    phase2.task,
    config.ilm,
    mesh=mesh,
    mesh_config=config.mesh,
    workdir=workdir,
    seed=config.seed,
  )
  adapter = {k: v for k, v in result.params.items() if k in ilm.ADAPTER_PARTS}
  if adapter:
    checkpoint.save_params(layout.ilm_adapter(config, workdir), adapter)
  summary = dict(result.metrics)
  summary.update(
    steps=result.step,
    steps_this_run=result.steps_this_run,
    history_items_truncated=phase2.encoder.stats.history_items_truncated,
    target_tokens_truncated=phase2.encoder.stats.target_tokens_truncated,
    empty_histories=phase2.encoder.stats.empty_histories,
  )
  for evaluator in phase2.task.evaluators:
    summary.update(
      {f"trie/{k}": v for k, v in getattr(evaluator, "trie_report", {}).items()}
    )
  return summary
