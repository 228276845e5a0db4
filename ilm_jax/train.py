"""The trainer core that every phase uses (CF encoder, Q-Former, ILM).

A phase describes itself as a `Task` (how to initialise params, the loss, the
training iterator, its evaluators); `train` does the rest: mesh shardings,
optimizer with freezing, jit-compiled step with donated state, restore,
logging, checkpoints and evaluation.

Frozen parameters (`optim.frozen` regexes) are split off once
(`optim.Partition`): the train state holds only the trainable half (what is
differentiated, updated and checkpointed); the frozen half is a constant
input of every step.

Step metrics stay on the device and are fetched (and checked for a NaN/inf
loss) only at log and checkpoint steps, so several steps are in flight.

Restore order (first that applies wins):
  1. the latest checkpoint in `WORKDIR/<phase>/checkpoints` (a preempted or
     killed run continues where it stopped, data iterator included);
  2. an explicit `train.resume_from` path (a checkpoints dir or a step dir);
  3. the pretrained init inside `Task.init_params` (e.g. MiniLM weights, the
     phase-1 Q-Former) and `Task.load_params` (the frozen LLM);
  4. scratch (the rest of `Task.init_params`).

A SIGTERM during the training loop (a scheduler's preemption notice, a
`timeout`, `kill`) ends it after the step in flight with a checkpoint of
that step and `TrainingStopped`; the same command then continues from it.
Over several processes JAX's preemption sync point picks one step for all
of them. SIGKILL still loses the steps since the last checkpoint.

Params are created on the mesh (`init_on_mesh`): `Task.init_params` runs
once under `jax.jit` with the output shardings its abstract shapes
(`jax.eval_shape`) call for, and `Task.load_params` reads large pretrained
parts shard by shard onto their devices, so no host holds a whole sharded
model.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ilm_jax import (
  checkpoint,
  layout,
  metric_writer,
  optim,
  sharding,
  tree_utils,
)

Params = Any
Batch = dict[str, Any]


@dataclasses.dataclass
class Task:
  """What a phase hands to the trainer.

  Attributes:
    name: phase name; outputs go to `WORKDIR/<name>/`.
    init_params: rng -> params (arrays or flax logically-partitioned boxes).
      Traced under jit (`init_on_mesh`), so it must be traceable: weights
      it reads with numpy become constants of that program (keep them
      small); checkpoints (orbax) belong in `load_params`.
    load_params: optional (mesh, config.mesh) -> params read from files:
      arrays laid out on the mesh already (a large frozen LLM read shard by
      shard) or host arrays, which the trainer places. Joined with
      init_params' tree at the top level.
    loss_fn: (params, batch, rng) -> (scalar loss, dict of scalar metrics).
      Traced under jit with the global batch.
    train_iterator: a grain DatasetIterator (next/get_state/set_state) that
      yields this process's slice of each global batch as numpy arrays.
    evaluators: plugins from `ilm_jax.evaluators.registry`.
    optional_param_groups: top-level parameter groups that only some
      models of the phase have (phase 2's adapter parts); `optim.lr_mults`
      entries for an absent one are skipped (`optim.lr_multipliers`).
    dataset_record: what the metrics files record of the data the
      evaluators ran on (`ProcessedDataset.record()`), their top-level
      "dataset" entry; None writes none.
  """

  name: str
  init_params: Callable[[jax.Array], Params]
  loss_fn: Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict]]
  train_iterator: Any
  evaluators: Sequence[Any] = ()
  load_params: Callable[[Mesh, ml_collections.ConfigDict], Params] | None = None
  optional_param_groups: tuple[str, ...] = ()
  dataset_record: dict | None = None


class TrainingStopped(Exception):
  """A stop signal ended training after a checkpoint of the current step.

  Attributes:
    phase: the task's name.
    step: the step checkpointed; rerunning the same command resumes there.
    checkpoints: the directory holding that checkpoint.
  """

  def __init__(self, phase: str, step: int, checkpoints: pathlib.Path):
    super().__init__(
      f"{phase}: stopped by SIGTERM at step {step}; checkpoint saved in "
      f"{checkpoints}. Run the same command again to continue from it."
    )
    self.phase = phase
    self.step = step
    self.checkpoints = checkpoints


def _preemption_sync_point(step: int) -> bool:
  """JAX's multi-process preemption sync point; False (with one warning)
  where the preemption service is off, as orbax treats it."""
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError as e:
    if not _preemption_sync_point.warned:
      logging.warning("No preemption sync point (%s): SIGTERM not handled.", e)
      _preemption_sync_point.warned = True
    return False


_preemption_sync_point.warned = False


@contextlib.contextmanager
def stop_requests():
  """Yields `stop(step) -> bool`: true once a SIGTERM asks training to stop.

  One process: a SIGTERM handler (installed for the block, the previous one
  restored after) records the signal; training stops after the step in
  flight. Outside the main thread no handler can be installed and stop()
  stays false.

  Several processes: JAX's preemption sync point
  (`multihost_utils.reached_preemption_sync_point`), which every process
  calls at every step and which turns true at the same step on all of them.
  Its contract holds within one training loop: a notice that arrives
  outside one (setup, the first step's compilation, the final evaluation,
  between phases) may be honoured at the wrong step of the next phase or
  not at all, so on a pod run one phase per process when preemptions are
  expected.
  """
  if jax.process_count() > 1:
    yield _preemption_sync_point
    return
  received = []

  def on_sigterm(signum, frame):
    del frame
    received.append(signum)  # logged by the loop: no I/O in a handler

  try:
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    installed = True
  except ValueError:  # not the main thread: no handler, never stops
    installed = False
  if not installed:  # yielded outside the except: no chained context
    yield lambda step: False
    return
  try:
    yield lambda step: bool(received)
  finally:
    # None: a handler not installed from Python; restore the default.
    signal.signal(
      signal.SIGTERM, signal.SIG_DFL if previous is None else previous
    )


@dataclasses.dataclass
class TrainResult:
  params: Params  # the best params if `train.best_metric` is set, else last
  step: int
  metrics: dict[str, float]  # final evaluation, "<split>/<name>" keys
  wall_time_s: float
  steps_this_run: int = 0  # steps trained by this call (0: evaluation only)


def init_on_mesh(
  task: Task, rng: jax.Array, mesh: Mesh, mesh_config: ml_collections.ConfigDict
) -> Params:
  """The task's params, created directly in their shardings on `mesh`.

  `task.init_params` is traced once for its abstract shapes
  (`jax.eval_shape`), which give each leaf its sharding
  (`sharding.param_shardings`), then runs under `jax.jit` with those
  `out_shardings`: every device computes only its own shards. Of what
  `task.load_params` returns, arrays already laid out over the whole mesh
  (e.g. read shard by shard) are kept as they are; the rest (host arrays,
  arrays on one device) are placed by `sharding.param_shardings`.

  Raises:
    ValueError: init_params and load_params return the same top-level key.
  """
  abstract = jax.eval_shape(task.init_params, rng)
  shardings = sharding.param_shardings(abstract, mesh, mesh_config)
  params = jax.jit(
    lambda key: tree_utils.unbox(task.init_params(key)),
    out_shardings=shardings,
  )(rng)
  if task.load_params is None:
    return params
  loaded = task.load_params(mesh, mesh_config)
  both = sorted(set(params) & set(loaded))
  if both:
    raise ValueError(
      f"{task.name}: init_params and load_params both return {both}; each "
      "top-level part comes from one of them."
    )
  devices = set(mesh.devices.flat)

  def place(x, where):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, where)

  loaded = jax.tree.map(
    place,
    tree_utils.unbox(loaded),
    sharding.param_shardings(loaded, mesh, mesh_config),
  )
  return {**params, **loaded}


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite."""


def check_writable(directory: pathlib.Path) -> None:
  """Fails early, naming the directory, if outputs cannot be written there."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    # One probe per process: the processes of a run share the workdir.
    probe = directory / f".write_probe.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(
      f"--workdir: cannot write to {directory} ({e.strerror}). Choose a "
      "writable directory."
    ) from e


def _log_parameter_overview(params: Params, frozen: Any) -> None:
  groups: dict[str, list[int]] = {}
  for (path, leaf), is_frozen in zip(
    jax.tree_util.tree_leaves_with_path(params),
    jax.tree.leaves(frozen),
    strict=True,
  ):
    group = tree_utils.path_str(path[:1]) if path else "<root>"
    counts = groups.setdefault(group, [0, 0])
    counts[int(is_frozen)] += int(np.prod(leaf.shape))
  lines = [f"{'group':<24}{'trainable':>14}{'frozen':>14}"]
  for group, (trainable, frozen_count) in sorted(groups.items()):
    lines.append(f"{group:<24}{trainable:>14,}{frozen_count:>14,}")
  total_t = sum(c[0] for c in groups.values())
  total_f = sum(c[1] for c in groups.values())
  lines.append(f"{'total':<24}{total_t:>14,}{total_f:>14,}")
  logging.info("Parameter overview:\n%s", "\n".join(lines))


def make_train_step(
  task: Task, tx, frozen_mask, schedule, mesh=None, axis_rules=()
):
  """The train step's body (jit it): grads only for trainable leaves.

  Public for the benchmarks, which time exactly this step. With `mesh`, the
  step is traced under `mesh` (as the abstract mesh) and `nn.logical_axis_rules(
  axis_rules)` so that the models' activation sharding constraints apply.

  Returns:
    `train_step(state, frozen, batch, rng) -> (state, metrics)`: `state`
    from `initial_state` (donate it), `frozen` its frozen half, `metrics` a
    dict of device scalars.
  """
  partition = optim.Partition.from_mask(frozen_mask)

  def train_step(state, frozen, batch, base_rng):
    if mesh is None:
      return _train_step(state, frozen, batch, base_rng)
    with (
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
      nn.logical_axis_rules(axis_rules),
    ):
      return _train_step(state, frozen, batch, base_rng)

  def _train_step(state, frozen, batch, base_rng):
    rng = jax.random.fold_in(base_rng, state["step"])
    trainable = state["params"]

    def loss_of_trainable(trainable_params):
      return task.loss_fn(partition.join(trainable_params, frozen), batch, rng)

    (loss, aux), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(
      trainable
    )
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    new_state = dict(
      step=state["step"] + 1, params=new_trainable, opt_state=opt_state
    )
    metrics = dict(aux)
    metrics.update(
      loss=loss,
      learning_rate=schedule(state["step"]),
      grad_norm=tree_utils.global_norm(grads),
      param_norm=tree_utils.global_norm(new_trainable),
      update_norm=tree_utils.global_norm(updates),
    )
    metrics.update(_group_norms(grads, new_trainable, updates))
    return new_state, metrics

  return train_step


def _group_norms(grads, params, updates) -> dict:
  """Per top-level parameter group norms, where more than one group trains.

  Whether gradients reach each part of an adapter at a useful scale (e.g.
  the Q-Former behind the projector) shows in `grad_norm/<group>` and in
  the update-to-parameter ratio `update_norm/<group>` / `param_norm/<group>`.
  The trainable half is a flat {'/'-joined path: leaf} dict; a group is the
  path's first segment.
  """
  groups: dict[str, list[str]] = {}
  for path in grads:
    groups.setdefault(path.split("/")[0], []).append(path)
  if len(groups) < 2:
    return {}
  out = {}
  for group, paths in sorted(groups.items()):
    for name, tree in (("grad", grads), ("param", params), ("update", updates)):
      out[f"{name}_norm/{group}"] = tree_utils.global_norm(
        [tree[path] for path in paths]
      )
  return out


def initial_state(params, tx, frozen_mask) -> tuple[dict, dict]:
  """The train state at step 0 and the frozen half of `params`.

  Args:
    params: the full params tree (arrays).
    tx: the optimizer from `optim.make`.
    frozen_mask: the frozen mask from `optim.make`.

  Returns:
    (state, frozen): `state` = {"step": int32 scalar, "params": trainable
    half, "opt_state": `tx.init` of it}, the halves as `optim.Partition`
    flat dicts.
  """
  trainable, frozen = optim.Partition.from_mask(frozen_mask).split(params)
  state = dict(
    step=jnp.zeros((), jnp.int32),
    params=trainable,
    opt_state=tx.init(trainable),
  )
  return state, frozen


def itstime(step: int, every: int, total_steps: int) -> bool:
  """Whether an action due every `every` steps runs after `step` steps.

  Every `every`-th step and the last one; never when `every` is 0
  (big_vision's `utils.itstime`).
  """
  return every > 0 and (step % every == 0 or step == total_steps)


def fetch_metrics(device_metrics: list[dict], first_step: int, phase: str):
  """Host floats of consecutive steps' metrics; raises on a NaN/inf loss.

  Args:
    device_metrics: the step metrics of steps `first_step`, `first_step + 1`,
      ... (0-based), still on the device.
    first_step: the step of `device_metrics[0]`.
    phase: named in the error.

  Returns:
    A list of {name: float}, one per step.

  Raises:
    NonFiniteLossError: naming the first (1-based) step with a NaN/inf loss.
  """
  fetched = jax.device_get(device_metrics)
  for offset, metrics in enumerate(fetched):
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
        f"[{phase}] loss is {loss} at step {first_step + offset + 1}. Lower "
        "the learning rate or check the inputs; training resumes from the "
        "last checkpoint in the workdir."
      )
  return [{k: float(v) for k, v in m.items()} for m in fetched]


def _restore(ckpt, phase_config, abstract_saved):
  """Steps 1 and 2 of the restore order; None if neither applies."""
  if ckpt.latest_step() is not None:
    logging.info(
      "Resuming from %s (step %d).", ckpt.directory, ckpt.latest_step()
    )
    return ckpt.restore(abstract_saved)
  resume_from = phase_config.train.get("resume_from", "")
  if resume_from:
    logging.info("Resuming from train.resume_from=%s.", resume_from)
    return checkpoint.restore_from_path(resume_from, abstract_saved)
  return None


def _read_best(best_path: pathlib.Path, best_record: pathlib.Path):
  """The best-params record of an earlier run, consistent with what is saved.

  The record saved inside `best_params` wins over `best.json` (a kill
  between the params swap and the JSON write leaves best.json one step
  behind); best.json is rewritten to match, or removed when no params exist.
  """
  record = checkpoint.load_record(best_path)
  has_params = (
    best_path.exists() or best_path.with_name(best_path.name + ".old").exists()
  )
  if record is None and has_params and best_record.exists():
    record = json.loads(best_record.read_text())  # written before records
  if record is None:
    if best_record.exists() and jax.process_index() == 0:
      logging.warning("Removing %s: it names no saved params.", best_record)
      best_record.unlink()
    return None
  on_disk = json.loads(best_record.read_text()) if best_record.exists() else 0
  if on_disk != record:
    metric_writer.write_json(best_record, record)
  return record


def evaluate(
  evaluators, params, splits=None, per_user=None
) -> dict[str, float]:
  """Runs evaluators (those of `splits`, or all) -> {"split/name": value}.

  An evaluator may yield `(metric_writer.PER_USER, block)`, a block of
  per-user values ({"user_ids": int [n], name: float [n], ...}); with a
  `per_user` dict, each split's blocks are merged into `per_user[split]`
  (else they are dropped).
  """
  results, blocks = {}, {}
  for evaluator in evaluators:
    if splits is not None and evaluator.split not in splits:
      continue
    start = time.perf_counter()
    for name, value in evaluator.run(params):
      if name == metric_writer.PER_USER:
        blocks.setdefault(evaluator.split, []).append(value)
      else:
        results[f"{evaluator.split}/{name}"] = float(value)
    logging.info(
      "Evaluator %s (%s) took %.1f s.",
      evaluator.name,
      evaluator.split,
      time.perf_counter() - start,
    )
  if per_user is not None:
    for split, split_blocks in blocks.items():
      per_user[split] = metric_writer.merge_per_user(split_blocks)
  return results


def write_split_metrics(
  workdir: pathlib.Path,
  phase: str,
  results: dict[str, float],
  per_user: dict[str, dict] | None = None,
  extra: dict | None = None,
) -> None:
  """Writes `WORKDIR/metrics/<phase>_<split>.json` for each split present.

  A file already there from the same trained model (an equal `train`
  record: a finished run evaluated again, e.g. with one more evaluator)
  keeps the metrics this call does not measure; any other file is
  replaced.

  Args:
    workdir: the experiment's output directory.
    phase: the file name's prefix.
    results: {"split/name": value}, from `evaluate`.
    per_user: optional {split: per-user block}, from `evaluate`.
    extra: further top-level entries of every split's file.
  """
  by_split: dict[str, dict] = {}
  for key, value in results.items():
    split, name = key.split("/", 1)
    by_split.setdefault(split, {})[name] = value
  for split, values in by_split.items():
    path = layout.metrics_file(workdir, phase, split)
    block = (per_user or {}).get(split)
    if path.exists() and extra and "train" in extra:
      values, block = _keep_unmeasured(path, extra["train"], values, block)
    metric_writer.write_metrics(path, values, block, extra)


def _keep_unmeasured(path, trained, values, block):
  """(scalars, per-user block) with the file's other metrics added, if the
  file is from the same trained model (`trained` equals its record)."""
  old = json.loads(path.read_text())
  recorded = old.get("train")
  if isinstance(recorded, dict) and "seed" not in recorded:
    # Files written before the seed was recorded (1 December 2026).
    trained = {k: v for k, v in trained.items() if k != "seed"}
  if recorded != trained:
    return values, block
  kept = {
    name: value
    for name, value in old.items()
    if name not in values
    and isinstance(value, int | float)
    and not isinstance(value, bool)
  }
  old_block = metric_writer.read_per_user(old)
  if old_block is not None:
    measured = set(block or ()) - {metric_writer.USER_IDS}
    old_block = {k: v for k, v in old_block.items() if k not in measured}
    if len(old_block) > 1:
      block = (
        metric_writer.merge_per_user([old_block, block]) if block else old_block
      )
  if kept:
    logging.info(
      "%s: same trained step as before; kept %d metrics this evaluation "
      "did not measure.",
      path,
      len(kept),
    )
  return {**kept, **values}, block


def train(
  task: Task,
  phase_config: ml_collections.ConfigDict,
  *,
  mesh: Mesh,
  mesh_config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  seed: int = 0,
) -> TrainResult:
  """Trains one phase and returns its (best or final) params and metrics.

  Args:
    task: the phase's params, loss, training iterator and evaluators.
    phase_config: the phase's config section: `train` (steps, batch_size,
      log_every, checkpoint_every, eval_every (0: no validation during
      training), keep_checkpoints, best_metric ("": the last params),
      resume_from) and `optim` (see `optim.make`).
    mesh: the device mesh; params and batches are sharded over it.
    mesh_config: `config.mesh` (logical axis and partition rules).
    workdir: the experiment's output directory; this phase writes
      `WORKDIR/<task.name>/` (logs, checkpoints, best params) and
      `WORKDIR/metrics/<task.name>_<split>.json`.
    seed: seeds the params init and the per-step rng.

  Returns:
    A `TrainResult`: the params (all of them, frozen included), the final
    step, the final evaluation {"<split>/<name>": value} and the wall time.

  Raises:
    PermissionError: the workdir is not writable.
    ValueError: `train.batch_size` does not split over the mesh's data
      shards and the processes.
    NonFiniteLossError: a NaN/inf loss (checked at log and checkpoint steps,
      before any checkpoint is written).
    checkpoint.CheckpointError: a checkpoint to resume from is unreadable or
      was written for another model.
    KeyError: `train.best_metric` is not a validation metric.
    TrainingStopped: a SIGTERM stopped the loop; its step is checkpointed.
  """
  # --- Setup.
  start_time = time.perf_counter()
  workdir = pathlib.Path(workdir).absolute()
  phase_dir = layout.phase_dir(workdir, task.name)
  check_writable(phase_dir)
  train_cfg = phase_config.train
  total_steps = int(train_cfg.steps)
  num_shards = sharding.num_batch_shards(mesh)
  if train_cfg.batch_size % num_shards or (
    train_cfg.batch_size % jax.process_count()
  ):
    raise ValueError(
      f"{task.name}.train.batch_size={train_cfg.batch_size} must be "
      f"divisible by the {num_shards} data-parallel shards of the mesh and "
      f"the {jax.process_count()} processes."
    )
  writer = metric_writer.MetricWriter(phase_dir / "logs")
  init_rng, step_rng = jax.random.split(jax.random.key(seed))

  # --- Model and optimizer.
  params = init_on_mesh(task, init_rng, mesh, mesh_config)
  tx, frozen_mask, schedule = optim.make(
    phase_config.optim, params, total_steps, task.optional_param_groups
  )
  _log_parameter_overview(params, frozen_mask)
  partition = optim.Partition.from_mask(frozen_mask)
  trainable, frozen = partition.split(params)
  del params
  state = dict(
    step=jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
    params=trainable,
    opt_state=sharding.on_mesh(jax.jit(tx.init)(trainable), mesh),
  )
  del trainable
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

  # --- Step.
  step_fn = jax.jit(
    make_train_step(
      task,
      tx,
      frozen_mask,
      schedule,
      mesh=mesh,
      axis_rules=sharding.activation_rules(mesh_config, mesh),
    ),
    in_shardings=(
      state_shardings,
      frozen_shardings,
      sharding.batch_sharding(mesh),
      sharding.replicated(mesh),
    ),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )

  # --- Restore.
  ckpt = checkpoint.TrainCheckpointer(
    phase_dir / "checkpoints", max_to_keep=train_cfg.keep_checkpoints
  )
  restored = _restore(ckpt, phase_config, checkpoint.abstract_like(state))
  if restored is not None:
    state, data_state = restored
    task.train_iterator.set_state(data_state)
  step = int(state["step"])

  # --- Evals: best-params bookkeeping survives restarts via a JSON file.
  best_path, best_record = phase_dir / "best_params", phase_dir / "best.json"
  best = _read_best(best_path, best_record)

  def maybe_update_best(results, params_now, at_step):
    nonlocal best
    metric = train_cfg.best_metric
    if not metric:
      return
    if metric not in results:
      raise KeyError(
        f"{task.name}.train.best_metric={metric!r} is not among "
        f"the validation metrics {sorted(results)}."
      )
    if best is None or results[metric] > best["value"]:
      # The record travels inside the export (swapped in with the params);
      # best.json is a copy written after the swap and healed on restart.
      best = dict(metric=metric, value=results[metric], step=at_step)
      checkpoint.save_params(best_path, params_now, record=best)
      metric_writer.write_json(best_record, best)

  pending_validation = phase_dir / "pending_validation.json"

  def validate(at_step):
    params = partition.join(state["params"], frozen)
    results = evaluate(task.evaluators, params, splits=("valid",))
    writer.write_scalars(at_step, results)
    maybe_update_best(results, params, at_step)
    pending_validation.unlink(missing_ok=True)

  def stop(at_step, validated=False):
    if not validated and itstime(at_step, train_cfg.eval_every, total_steps):
      # This step's validation (and best-params candidacy) runs first
      # thing when the run resumes, not within the scheduler's grace time.
      metric_writer.write_json(pending_validation, dict(step=at_step))
    ckpt.wait()
    ckpt.close()
    writer.close()
    raise TrainingStopped(task.name, at_step, phase_dir / "checkpoints")

  # A run stopped at a validation step validates it before going on.
  if pending_validation.exists():
    if json.loads(pending_validation.read_text()).get("step") == step:
      logging.info("Validation of step %d, pending since the stop.", step)
      validate(step)
    else:
      pending_validation.unlink(missing_ok=True)

  # --- Loop.
  first_step = step
  if step < total_steps:
    logging.info(
      "Training %s from step %d to %d.", task.name, step, total_steps
    )
  # Steps since the last fetch (device metrics) and since the last log line.
  on_device, interval = [], []
  interval_start, interval_step = time.perf_counter(), step
  with stop_requests() as stop_requested:
    while step < total_steps:
      batch = sharding.put_global_batch(next(task.train_iterator), mesh)
      state, metrics = step_fn(state, frozen, batch, step_rng)
      on_device.append(metrics)
      step += 1
      stopping = stop_requested(step)
      if stopping:
        logging.warning(
          "[%s] SIGTERM: checkpointing step %d, then stopping.",
          task.name,
          step,
        )
      log_now = itstime(step, train_cfg.log_every, total_steps)
      save_now = stopping or itstime(
        step, train_cfg.checkpoint_every, total_steps
      )
      if log_now or save_now:  # a checkpoint never follows a NaN/inf loss
        interval += fetch_metrics(on_device, step - len(on_device), task.name)
        on_device = []
      if log_now:
        now = time.perf_counter()
        rate = (step - interval_step) / max(now - interval_start, 1e-9)
        means = {
          k: float(np.mean([m[k] for m in interval])) for k in interval[0]
        }
        means["steps_per_sec"] = rate
        writer.write_scalars(step, means)
        logging.info(
          "[%s] step %d/%d  loss %.4f  lr %.2e  |g| %.3g  %.2f steps/s  "
          "ETA %.0f s",
          task.name,
          step,
          total_steps,
          means["loss"],
          means["learning_rate"],
          means["grad_norm"],
          rate,
          (total_steps - step) / max(rate, 1e-9),
        )
        interval, interval_start, interval_step = [], now, step
      if save_now:
        ckpt.save(step, state, task.train_iterator.get_state())
      if stopping:
        stop(step)
      if itstime(step, train_cfg.eval_every, total_steps):
        validate(step)
    # A SIGTERM during the last step's evaluation or checkpoint: that step
    # is saved; stop before the final evaluation.
    if step > first_step and stop_requested(step):
      if not itstime(step, train_cfg.checkpoint_every, total_steps):
        ckpt.save(step, state, task.train_iterator.get_state())
      stop(step, validated=True)
  ckpt.wait()
  ckpt.close()

  # --- Final evaluation with the selected params.
  params = partition.join(state["params"], frozen)
  if train_cfg.best_metric and best is not None:
    logging.info(
      "Using the best params (%s=%.4f at step %d).",
      best["metric"],
      best["value"],
      best["step"],
    )
    params = checkpoint.load_params(best_path, checkpoint.abstract_like(params))
  per_user = {}
  results = evaluate(task.evaluators, params, per_user=per_user)
  if results:
    writer.write_scalars(step, {f"final/{k}": v for k, v in results.items()})
    # What was trained: learning curves plot metrics against prompts seen.
    trained = dict(
      steps=step,
      batch_size=int(train_cfg.batch_size),
      prompts=step * int(train_cfg.batch_size),
      evaluated_step=best["step"] if train_cfg.best_metric and best else step,
      # Which training run: rows over several seeds are compared per seed.
      seed=int(seed),
    )
    extra = {"train": trained}
    if task.dataset_record is not None:
      extra["dataset"] = task.dataset_record
    write_split_metrics(workdir, task.name, results, per_user, extra)
  writer.close()
  return TrainResult(
    params=params,
    step=step,
    metrics=results,
    wall_time_s=time.perf_counter() - start_time,
    steps_this_run=step - first_step,
  )
