r"""Phase-2 throughput, before and after: training prompts/s, evaluated users/s.

  python -m benchmarks.ilm_throughput --config=configs/ml1m.py:cpu \
    --workdir=/tmp/ilm_ml1m

Needs a workdir where the cf and qformer phases already ran (the README's
main command, or `--config.phases=cf,qformer`). Builds the real phase-2 task
(ilm_jax/phases/ilm_training.py: frozen SmolLM2, CF tables, Q-Former, prompts) twice,
with the settings of commit `BASELINE` ("before") and with the config as
given ("after"), and times, back to back in this one process:

  train  the trainer's own jitted step (train.make_train_step: gradients
         for the adapter only, AdamW, the config's freeze rules), for each
         adapter of --adapters. Before: mixed-task batches, every prompt
         padded to 160 tokens, titles written beside the soft tokens, the
         first 64 answer positions scored, f32 matmuls. After: the config
         (one-task batches, each task padded to its own length, soft tokens
         only, `ilm.llm.frozen_matmul`); with bf16 matmuls there, also
         "after_f32", the same with f32 matmuls (what bf16 adds alone).
         Every distinct batch shape is compiled first (untimed), then each
         is timed over --steps steps; prompts/s is the batch size over the mean step
         time weighted by the task mix (`ilm.data.task_weights`).
  eval   users/s of the generative ranking evaluator (trie-constrained
         beam search over all titles, one seen and one unseen prompt per
         user) on --eval_users users, after an untimed first batch that
         compiles. Before: the beam search of commit BASELINE (read with
         `git show`: finished titles keep their beam slots, K copies of
         each prompt's cache, reordered every step) on 160-token prompts;
         after: the current one (a pool of finished titles, exact early
         stop, one cache row per prompt), prompts trimmed to their length.
  check  on --check_users users, the top-10 lists of both beam searches on
         the same (after) prompts: overlap and whether the new best score
         is at least the old one; with bf16 matmuls, also the lists of the
         current beam search with f32 against bf16 matmuls (overlap,
         identical lists, HR@10 of each on those users), with the
         workdir's trained adapter where it has one.

The last line printed is one JSON object with the headline figures (ILM =
the Q-Former adapter). Params are the run's initialisation (speed does not
depend on their values). The load average is printed: other processes slow
every figure down, so compare figures of one run only.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import subprocess
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import llm_throughput
from ilm_jax import checkpoint, layout, optim, sharding, train
from ilm_jax.data import ilm_tasks
from ilm_jax.evaluators import generative
from ilm_jax.models import llm
from ilm_jax.phases import ilm_training as ilm_phase

BASELINE = "d18ed58"  # the last commit before the phase-2 speed work

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/ml1m.py:cpu", "Experiment config."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "A workdir with the cf and qformer phase outputs."
)
_ADAPTERS = flags.DEFINE_list(
  "adapters",
  ["qformer", "mlp", "prompt"],
  "Adapters whose training step is timed (qformer = the ILM, mlp = "
  "CoLLM-style, prompt = text-only with 20 learned tokens).",
)
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per batch shape.")
_EVAL_USERS = flags.DEFINE_integer(
  "eval_users", 32, "Users evaluated per setting (0: skip)."
)
_CHECK_USERS = flags.DEFINE_integer(
  "check_users", 8, "Users whose top-10 lists are compared (0: skip)."
)


def before_settings(config):
  """The phase-2 data settings of commit BASELINE."""
  config = config.copy_and_resolve_references()
  config.ilm.data.update(
    titles_with_soft=True, max_len=160, one_task_batches=False
  )
  config.ilm.llm.frozen_matmul = ""  # f32 matmuls
  return config


def with_adapter(config, adapter):
  config = config.copy_and_resolve_references()
  config.ilm.model.adapter = adapter
  if adapter == "prompt":  # the README's text-only row
    config.ilm.model.tokens_per_entity = 20
  return config


def legacy_decoding():
  """ilm_jax/decoding.py as of commit BASELINE, imported from git."""
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    source = subprocess.run(
      ["git", "show", f"{BASELINE}:ilm_jax/decoding.py"],
      cwd=root,
      check=True,
      capture_output=True,
      text=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise SystemExit(
      f"The 'before' beam search is read from git commit {BASELINE} of "
      f"{root}; run the benchmark from a git checkout ({e})."
    ) from e
  path = pathlib.Path(tempfile.mkdtemp()) / "decoding_before.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("decoding_before", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _mean_step_seconds(step_fn, state, batch, rng, repeats):
  """The mean of `repeats` timed steps (compiled beforehand)."""
  start = time.perf_counter()
  for _ in range(repeats):
    state, _ = step_fn(state, batch, rng)
  jax.block_until_ready(state)
  return state, (time.perf_counter() - start) / repeats


def time_training(config, workdir, mesh, repeats) -> dict:
  """Prompts/s of the trainer's step under the config's task mix."""
  phase2 = ilm_phase.make_task(config, workdir)
  task, data = phase2.task, config.ilm.data
  params = train.init_on_mesh(task, jax.random.key(0), mesh, config.mesh)
  tx, frozen_mask, schedule = optim.make(
    config.ilm.optim, params, 100, task.optional_param_groups
  )
  state, frozen = train.initial_state(params, tx, frozen_mask)
  jitted = jax.jit(train.make_train_step(task, tx, frozen_mask, schedule))

  def step_fn(state, batch, rng):
    return jitted(state, frozen, batch, rng)

  rng = jax.random.key(1)
  # One batch per distinct shape (per task with one-task batches).
  batches = {}
  shapes = len(phase2.sampler.tasks) if data.one_task_batches else 1
  while len(batches) < shapes:
    batch = next(task.train_iterator)
    key = "mixed"
    if data.one_task_batches:
      key = ilm_tasks.TASKS[int(batch["task"][0])]
    batches.setdefault(key, batch)
  batches = {k: sharding.put_global_batch(b, mesh) for k, b in batches.items()}
  # Compile every shape first, so that the timed steps share the cores with
  # nothing else (the iterator's prefetch threads fill their buffer now),
  # then run every shape once more: the first step after the compilations
  # takes several times its steady time, whatever its shape, and was
  # charged to the first timed shape (docs/results/ilm.md).
  for _ in range(2):
    for batch in batches.values():
      state, _ = step_fn(state, batch, rng)
    jax.block_until_ready(state)
  seconds, tokens = {}, {}
  for key, batch in batches.items():
    state, seconds[key] = _mean_step_seconds(
      step_fn, state, batch, rng, repeats
    )
    tokens[key] = batch["input_ids"].shape[1]
  weights = data.task_weights.to_dict()
  if data.one_task_batches:
    total = sum(weights[k] for k in seconds)
    step = sum(weights[k] / total * seconds[k] for k in seconds)
    length = sum(weights[k] / total * tokens[k] for k in tokens)
  else:
    step, length = seconds["mixed"], tokens["mixed"]
  batch_size = config.ilm.train.batch_size
  return dict(
    prompts_per_s=batch_size / step,
    step_s=step,
    tokens_per_prompt=length,
    per_shape={k: dict(tokens=tokens[k], step_s=seconds[k]) for k in seconds},
  )


def ranking_evaluator(config, workdir, mesh, users):
  phase2 = ilm_phase.make_task(config, workdir)
  ranking = next(
    e
    for e in phase2.task.evaluators
    if e.config["type"] == "generative_ranking"
  )
  ranking.users = ranking.users[:users]
  params = train.init_on_mesh(phase2.task, jax.random.key(0), mesh, config.mesh)
  return ranking, params


@contextlib.contextmanager
def evaluator_patched(decoding_module, trim):
  """Runs the ranking evaluator with another beam search / no trimming."""
  saved = generative.decoding, generative._PROMPT_LENGTH_STEP
  generative.decoding = decoding_module
  if not trim:
    generative._PROMPT_LENGTH_STEP = 1 << 30  # keeps every column
  try:
    yield
  finally:
    generative.decoding, generative._PROMPT_LENGTH_STEP = saved


def time_eval(ranking, params) -> dict:
  users = ranking.users
  ranking.users = users[: ranking.batch_size]
  list(ranking.run(params))  # compiles
  ranking.users = users
  start = time.perf_counter()
  results = dict(ranking.run(params))
  elapsed = time.perf_counter() - start
  return dict(
    users_per_s=len(users) / elapsed,
    seconds=elapsed,
    users=int(results["users"]),
    hr10_seen=results["sequential/seen/hr@10"],
  )


def trained_adapter(config, workdir, params):
  """`params` with the workdir's trained phase-2 adapter, if it has one
  (the f32 / bf16 check compares recommendations, not random init)."""
  path = layout.ilm_adapter(config, workdir)
  if not path.exists():
    print(f"no trained adapter at {path}: the check uses the init params")
    return params
  return dict(params, **checkpoint.load_params(path))


def compare_lists(ranking, params, users, first, second) -> dict:
  """Top-10 lists of two (beam search module, LLM) pairs on the same prompts.

  `new_best_at_least_old`: the share of users whose best score under
  `second` is at least the one under `first`; hr@10_first / _second: the
  share of users whose test item is in the list.
  """
  requests = [
    ranking.sampler.evaluation_request("sequential", int(u), "test", False, i)
    for i, u in enumerate(ranking.users[:users])
  ]
  targets = np.array([r.target_item for r in requests])
  lists = []
  for module, model in (first, second):
    out = []
    for real, batch in ranking._batches(requests):
      result = module.constrained_beam_search(
        model,
        params["llm"],
        ranking.trie,
        prompt_embeds=ranking._embed(params, batch),
        prompt_mask=batch["attention_mask"],
        num_beams=ranking.num_beams,
        pad_id=ranking.tokenizer.pad_id,
      )
      out.append(
        (
          np.asarray(result.sequence_ids)[:real],
          np.asarray(result.scores)[:real],
        )
      )
    lists.append([np.concatenate(x) for x in zip(*out, strict=True)])
  (old_ids, old_scores), (new_ids, new_scores) = lists
  overlap = [
    len(set(a) & set(b)) / len(a) for a, b in zip(old_ids, new_ids, strict=True)
  ]
  hits = [
    float(np.mean([t in ids for t, ids in zip(targets, x, strict=True)]))
    for x in (old_ids, new_ids)
  ]
  return dict(
    users=len(requests),
    hr10_first=hits[0],
    hr10_second=hits[1],
    top10_overlap=float(np.mean(overlap)),
    identical_lists=float(
      np.mean(
        [list(a) == list(b) for a, b in zip(old_ids, new_ids, strict=True)]
      )
    ),
    new_best_at_least_old=float(
      np.mean(new_scores[:, 0] >= old_scores[:, 0] - 1e-4)
    ),
  )


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  after = _CONFIG.value
  before = before_settings(after)
  workdir = _WORKDIR.value
  mesh = sharding.make_mesh(after.mesh)
  print(
    f"LLM {after.ilm.llm.checkpoint} ({after.ilm.llm.dtype}); "
    f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
    f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
    f"allocator: {llm_throughput.allocator()}; before = commit {BASELINE}",
    flush=True,
  )
  summary = {}
  train_figures = {}
  settings = [("before", before), ("after", after)]
  if after.ilm.llm.frozen_matmul:  # what the bf16 matmuls add on their own
    after_f32 = after.copy_and_resolve_references()
    after_f32.ilm.llm.frozen_matmul = ""
    settings.insert(1, ("after_f32", after_f32))
  for adapter in _ADAPTERS.value:
    figures = {}
    for name, config in settings:
      figures[name] = time_training(
        with_adapter(config, adapter), workdir, mesh, _STEPS.value
      )
      shapes = ", ".join(
        f"{k} {v['tokens']} tok {v['step_s']:.2f} s"
        for k, v in figures[name]["per_shape"].items()
      )
      print(
        f"train {adapter} {name}: {figures[name]['prompts_per_s']:.2f} "
        f"prompts/s ({figures[name]['tokens_per_prompt']:.0f} padded tokens "
        f"per prompt; {shapes}; load {os.getloadavg()[0]:.1f})",
        flush=True,
      )
    speedup = (
      figures["after"]["prompts_per_s"] / figures["before"]["prompts_per_s"]
    )
    print(f"train {adapter} speedup: {speedup:.2f}x", flush=True)
    train_figures[adapter] = figures
    summary[f"train_speedup_{adapter}"] = round(speedup, 3)
    if "after_f32" in figures:
      bf16_gain = (
        figures["after"]["prompts_per_s"]
        / figures["after_f32"]["prompts_per_s"]
      )
      print(f"train {adapter} bf16 over f32 matmuls: {bf16_gain:.2f}x")
      summary[f"train_bf16_gain_{adapter}"] = round(bf16_gain, 3)
  if "qformer" in train_figures:
    ilm = train_figures["qformer"]
    summary.update(
      train_prompts_per_s_before=round(ilm["before"]["prompts_per_s"], 4),
      train_prompts_per_s_after=round(ilm["after"]["prompts_per_s"], 4),
      train_speedup=summary["train_speedup_qformer"],
    )

  if _EVAL_USERS.value:
    decoding_before = legacy_decoding()
    eval_figures = {}
    for name, config, module, trim in (
      ("before", before, decoding_before, False),
      ("after", after, generative.decoding, True),
    ):
      ranking, params = ranking_evaluator(
        config, workdir, mesh, _EVAL_USERS.value
      )
      with evaluator_patched(module, trim):
        eval_figures[name] = time_eval(ranking, params)
      print(
        f"eval {name}: {eval_figures[name]['users_per_s']:.3f} users/s "
        f"({eval_figures[name]['users']} users, {ranking.num_beams} beams, "
        f"batch {ranking.batch_size}, {eval_figures[name]['seconds']:.0f} s; "
        f"load {os.getloadavg()[0]:.1f})",
        flush=True,
      )
      if name == "after" and _CHECK_USERS.value:
        after_llm = ranking.model.llm
        check = compare_lists(
          ranking,
          params,
          _CHECK_USERS.value,
          (decoding_before, after_llm),
          (generative.decoding, after_llm),
        )
        print(f"check (same prompts, both beam searches): {check}", flush=True)
        summary["top10_overlap"] = round(check["top10_overlap"], 4)
        if after_llm.config.frozen_matmul is not None:
          f32_llm = llm.Llama(after_llm.config.replace(frozen_matmul=None))
          trained = trained_adapter(after, workdir, params)
          check = compare_lists(
            ranking,
            trained,
            _CHECK_USERS.value,
            (generative.decoding, f32_llm),
            (generative.decoding, after_llm),
          )
          print(f"check (same prompts, f32 vs bf16 matmuls): {check}")
          summary.update(
            bf16_top10_overlap=round(check["top10_overlap"], 4),
            bf16_identical_lists=round(check["identical_lists"], 4),
            hr10_f32=check["hr10_first"],
            hr10_bf16=check["hr10_second"],
          )
    summary.update(
      eval_users_per_s_before=round(eval_figures["before"]["users_per_s"], 4),
      eval_users_per_s_after=round(eval_figures["after"]["users_per_s"], 4),
      eval_speedup=round(
        eval_figures["after"]["users_per_s"]
        / eval_figures["before"]["users_per_s"],
        3,
      ),
    )
  summary["load_average"] = round(os.getloadavg()[0], 2)
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
