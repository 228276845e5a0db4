"""Runs the selected phases of an experiment, in order, with timings.

CF encoder -> Q-Former pretraining -> ILM (frozen LLM) -> evaluation ->
adapter export. Every phase resumes from its own checkpoints in the workdir,
so rerunning the same command after an interruption continues the work.
"""

import importlib
import os
import pathlib
import time

import jax
import ml_collections
from absl import logging

from ilm_jax import config_validation, layout, metric_writer, sharding, train

# The module of each phase (`config.phases` names) under ilm_jax/phases/.
PHASE_MODULES = {
  "cf": "cf",
  "qformer": "qformer_pretraining",
  "ilm": "ilm_training",
  "eval": "eval",
  "export": "export",
}


def log_allocator_hint():
  """On CPU without a preloaded malloc, says how to avoid page-fault stalls.

  glibc maps every buffer above 32 MiB (vocabulary logits, the stacked
  per-layer residuals of the LLM's backward pass) afresh, so each step pays
  page faults on them; docs/results/llm.md measures the difference.
  """
  if jax.devices()[0].platform == "cpu" and not os.environ.get("LD_PRELOAD"):
    logging.info(
      "CPU run with glibc malloc: large buffers page-fault at every step. "
      "Preloading tcmalloc is faster, e.g. LD_PRELOAD="
      "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (Debian/Ubuntu "
      "package libtcmalloc-minimal4); see README."
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config, then runs each selected phase.

  Args:
    config: an experiment config (configs/<name>.py:get_config()).
    workdir: output directory (checkpoints, logs, metrics, exports).

  Returns:
    phase name -> that phase's summary dict (with `wall_time_s`).
  """
  config_validation.validate(config)
  workdir = pathlib.Path(workdir).absolute()
  train.check_writable(workdir)
  if jax.process_index() == 0:
    layout.config_file(workdir).write_text(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config.mesh)
  logging.info(
    "Mesh %s over %d devices (%s).",
    dict(mesh.shape),
    mesh.devices.size,
    jax.devices()[0].platform,
  )
  log_allocator_hint()
  # Summaries of earlier invocations stay; this run's phases replace theirs.
  summaries = layout.read_phases(workdir)
  for phase in config_validation.selected_phases(config.phases):
    module = importlib.import_module(f"ilm_jax.phases.{PHASE_MODULES[phase]}")
    logging.info("=== Phase %s ===", phase)
    start = time.perf_counter()
    summary = dict(module.run(config, workdir, mesh) or {})
    summary["wall_time_s"] = time.perf_counter() - start
    # Variants (baselines, ablations) keep their own entry.
    name = layout.phase_name(config, phase)
    summaries[name] = _keep_training_time(summaries.get(name), summary)
    logging.info("Phase %s done in %.1f s.", phase, summary["wall_time_s"])
    metric_writer.write_json(layout.phases_file(workdir), summaries)
  return summaries


def _keep_training_time(previous: dict | None, summary: dict) -> dict:
  """`summary`, keeping the earlier wall time when this call only evaluated.

  A finished run evaluated again (e.g. with one more evaluator) trains no
  step; its `wall_time_s` stays the training run's and this call's time
  goes to `reevaluation_wall_time_s`.
  """
  if (
    previous
    and summary.get("steps_this_run") == 0
    and previous.get("steps") == summary.get("steps")
    and "wall_time_s" in previous
  ):
    return dict(
      summary,
      wall_time_s=previous["wall_time_s"],
      reevaluation_wall_time_s=summary["wall_time_s"],
    )
  return summary
