"""Trainer core: mesh equivalence, kill/resume, freezing, clear errors."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from ilm_jax import checkpoint, experiment, optim, sharding, train, tree_utils
from tests import toy_task

REPO = pathlib.Path(__file__).resolve().parents[1]


def _loss_curve(workdir: pathlib.Path) -> np.ndarray:
  lines = (workdir / "toy" / "logs" / "metrics.jsonl").read_text().split("\n")

  return np.array([json.loads(line)["loss"] for line in lines if line])


@pytest.mark.parametrize(
  "mesh_shape",
  [dict(data=8, fsdp=1), dict(data=4, fsdp=2), dict(data=2, fsdp=4)],
)
def test_multi_device_meshes_follow_single_device_trajectory(
  tmp_path, mesh_shape
):
  assert jax.device_count() == 8, "conftest sets 8 host devices"
  single = toy_task.run(toy_task.config(), tmp_path / "one", jax.devices()[:1])
  multi = toy_task.run(
    toy_task.config(mesh_shape=mesh_shape), tmp_path / "many"
  )
  # Same data order, same rng per step: only the reduction order differs
  # across shards, so float32 sums agree to ~1e-6 relative.
  np.testing.assert_allclose(
    _loss_curve(tmp_path / "many"), _loss_curve(tmp_path / "one"), rtol=1e-5
  )
  for a, b in zip(
    jax.tree.leaves(multi.params), jax.tree.leaves(single.params), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
    )
  # The parameters really were split over fsdp when that axis exists.
  if mesh_shape["fsdp"] > 1:
    spec = multi.params["embed"]["w"].sharding.spec
    assert "fsdp" in tuple(spec)


def _run_script(workdir, params_out, step_delay, steps=60):
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(REPO))
  # The log goes to a file: a pipe nobody reads would fill up and block.
  log = open(f"{workdir}.log", "w")
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "tests.toy_task",
      f"--workdir={workdir}",
      f"--steps={steps}",
      f"--step_delay={step_delay}",
      f"--params_out={params_out}",
    ],
    cwd=REPO,
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
  )


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  reference = _run_script(tmp_path / "ref", tmp_path / "ref.npz", 0.0)
  assert reference.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()

  victim = _run_script(tmp_path / "run", tmp_path / "run.npz", 0.5)
  checkpoints = tmp_path / "run" / "toy" / "checkpoints"
  deadline = time.time() + 180
  while time.time() < deadline:
    steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
    if steps and max(steps) >= 20:
      break
    time.sleep(0.1)
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=30)
  assert victim.returncode == -signal.SIGKILL
  assert not (tmp_path / "run.npz").exists(), "killed before it finished"

  resumed = _run_script(tmp_path / "run", tmp_path / "run.npz", 0.0)
  resumed.wait(timeout=240)
  log = (tmp_path / "run.log").read_text()
  assert resumed.returncode == 0, log
  assert "Resuming from" in log
  ref, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert sorted(ref) == sorted(got)
  for name in ref:
    # Same program, same data order and rng: bitwise equal on CPU.
    np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


class _SigtermAt:
  """The toy iterator, sending this process a SIGTERM as it hands out batch
  `at` (1-based), in the training loop's own thread."""

  def __init__(self, inner, at: int):
    self.inner, self.at, self.count = inner, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    batch = next(self.inner)
    if self.count == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


@dataclasses.dataclass
class _StepsSeen:
  """A validation evaluator that records the head's sum at each call."""

  split: str = "valid"
  name: str = "steps_seen"
  calls: list = dataclasses.field(default_factory=list)

  def run(self, params):
    value = float(jnp.sum(params["head"]["w"]))
    self.calls.append(value)
    yield "head_sum", value


@pytest.fixture
def sigterm_guard():
  """SIGTERM raises in the test instead of killing pytest, should the
  trainer ever fail to install its own handler."""

  def fail(signum, frame):
    raise AssertionError("SIGTERM reached the test's guard handler")

  previous = signal.signal(signal.SIGTERM, fail)
  yield fail
  signal.signal(signal.SIGTERM, previous)


def _stopped_run(cfg, workdir, at, evaluator=None):
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  task = toy_task.make_task(cfg.toy.train.batch_size)
  task.train_iterator = _SigtermAt(task.train_iterator, at=at)
  task.evaluators = [evaluator] if evaluator else []
  with pytest.raises(train.TrainingStopped, match=f"at step {at};") as stopped:
    train.train(task, cfg.toy, mesh=mesh, mesh_config=cfg.mesh, workdir=workdir)
  return stopped.value


def _saved_steps(workdir):
  return sorted(
    int(p.name)
    for p in (workdir / "toy" / "checkpoints").iterdir()
    if p.name.isdigit()
  )


def test_sigterm_checkpoints_the_step_and_the_rerun_matches_an_uninterrupted_run(
  tmp_path, sigterm_guard
):
  """A SIGTERM (preemption, `timeout`) stops training after the step in
  flight with a checkpoint of that step (checkpoint_every=5 would have
  saved only step 5); the same run then resumes there and ends with the
  params of a run never stopped."""
  cfg = toy_task.config(steps=12)
  reference = toy_task.run(cfg, tmp_path / "ref", jax.devices()[:1])
  stopped = _stopped_run(cfg, tmp_path / "run", at=7)
  assert stopped.step == 7
  assert stopped.checkpoints == tmp_path / "run" / "toy" / "checkpoints"
  assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # restored
  assert _saved_steps(tmp_path / "run") == [5, 7]
  assert not (tmp_path / "run" / "metrics").exists()  # no final evaluation
  resumed = toy_task.run(cfg, tmp_path / "run", jax.devices()[:1])
  assert resumed.steps_this_run == 12 - 7
  for ref, got in zip(
    jax.tree.leaves(reference.params),
    jax.tree.leaves(resumed.params),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("at", [8, 12])
def test_a_validation_step_stopped_by_sigterm_is_validated_on_resume(
  tmp_path, sigterm_guard, at
):
  """Validation every 4 steps: a stop at step 8 (or the last, 12) skips
  that validation to stop promptly and runs it first on resume, so every
  validation step is evaluated once, on that step's params."""
  cfg = toy_task.config(steps=12)
  cfg.toy.train.eval_every = 4
  reference = _StepsSeen()
  task = toy_task.make_task(cfg.toy.train.batch_size)
  task.evaluators = [reference]
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  train.train(
    task, cfg.toy, mesh=mesh, mesh_config=cfg.mesh, workdir=tmp_path / "ref"
  )
  assert len(reference.calls) == 3 + 1  # steps 4, 8, 12, then the final one

  before = _StepsSeen()
  _stopped_run(cfg, tmp_path / "run", at=at, evaluator=before)
  assert (tmp_path / "run" / "toy" / "pending_validation.json").exists()
  after = _StepsSeen()
  task = toy_task.make_task(cfg.toy.train.batch_size)
  task.evaluators = [after]
  train.train(
    task, cfg.toy, mesh=mesh, mesh_config=cfg.mesh, workdir=tmp_path / "run"
  )
  assert before.calls + after.calls == reference.calls
  assert not (tmp_path / "run" / "toy" / "pending_validation.json").exists()


def test_sigterm_during_the_last_validation_stops_before_the_final_evaluation(
  tmp_path, sigterm_guard
):
  """A SIGTERM that lands while the last step is being validated (after
  the loop's last look at the signal) still stops the run before its final
  evaluation, with that step checkpointed and not validated again."""
  cfg = toy_task.config(steps=12)
  cfg.toy.train.eval_every = 4

  class SigtermOnThirdCall(_StepsSeen):
    def run(self, params):
      if len(self.calls) == 2:  # steps 4, 8 done: this is step 12's
        os.kill(os.getpid(), signal.SIGTERM)
      yield from super().run(params)

  evaluator = SigtermOnThirdCall()
  task = toy_task.make_task(cfg.toy.train.batch_size)
  task.evaluators = [evaluator]
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with pytest.raises(train.TrainingStopped, match="at step 12;"):
    train.train(
      task, cfg.toy, mesh=mesh, mesh_config=cfg.mesh, workdir=tmp_path
    )
  assert len(evaluator.calls) == 3  # no final evaluation
  assert 12 in _saved_steps(tmp_path)
  assert not (tmp_path / "toy" / "pending_validation.json").exists()
  resumed = _StepsSeen()
  task = toy_task.make_task(cfg.toy.train.batch_size)
  task.evaluators = [resumed]
  result = train.train(
    task, cfg.toy, mesh=mesh, mesh_config=cfg.mesh, workdir=tmp_path
  )
  assert result.steps_this_run == 0
  assert resumed.calls == evaluator.calls[-1:]  # the final evaluation only


@pytest.mark.slow
def test_main_exits_143_with_what_to_rerun_on_sigterm(tmp_path):
  """The command line: a SIGTERM mid-phase prints how to continue and exits
  with 128 + SIGTERM, after checkpointing the step it reached."""
  workdir = tmp_path / "w"
  log = tmp_path / "main.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "ilm_jax.main",
        "--config=configs/ml1m.py:tiny",
        f"--workdir={workdir}",
        "--config.phases=cf",
        "--config.cf.train.steps=1000000",
      ],
      cwd=REPO,
      env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(REPO)),
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  deadline = time.time() + 240
  while "Training mf from step 0" not in log.read_text():
    assert proc.poll() is None and time.time() < deadline, log.read_text()
    time.sleep(0.2)
  time.sleep(2.0)  # some steps
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()
  text = log.read_text()
  assert "STOPPED: mf: stopped by SIGTERM at step" in text
  assert "Run the same command again to continue from it." in text
  step = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert (workdir / "mf" / "checkpoints" / str(step)).is_dir()


def test_frozen_params_unchanged_and_have_no_optimizer_state(tmp_path):
  cfg = toy_task.config(steps=10)
  # The trainer runs init_params under jit (train.init_on_mesh), whose
  # division may round differently from eager in the last bit.
  initial = jax.jit(toy_task.init_params)(
    jax.random.split(jax.random.key(0))[0]
  )
  result = toy_task.run(cfg, tmp_path, jax.devices()[:1])
  np.testing.assert_array_equal(
    np.asarray(result.params["embed"]["w"]), np.asarray(initial["embed"]["w"])
  )
  assert not np.array_equal(
    np.asarray(result.params["head"]["w"]), np.asarray(initial["head"]["w"])
  )

  # Checkpoints hold only what trains: frozen leaves come from init_params.
  metadata = json.loads(
    (
      tmp_path / "toy" / "checkpoints" / "10" / "state" / "_METADATA"
    ).read_text()
  )["tree_metadata"]
  saved_arrays = [
    key
    for key, value in metadata.items()
    if value["value_metadata"]["value_type"] == "jax.Array"
  ]
  assert any("head" in key for key in saved_arrays)
  assert not any("embed" in key for key in saved_arrays), saved_arrays

  # The optimizer sees the trainable half only: no moments for frozen leaves.
  tx, mask, _ = optim.make(cfg.toy.optim, initial, 10)
  trainable, frozen = optim.Partition.from_mask(mask).split(initial)
  assert sorted(trainable) == ["head/b", "head/w"]
  assert sorted(frozen) == ["embed/w"]
  opt_shapes = jax.eval_shape(tx.init, trainable)
  paths = tree_utils.leaf_paths(opt_shapes)
  assert any("head" in p and "mu" in p for p in paths), paths
  assert not any("embed" in p for p in paths), paths
  assert (
    tree_utils.count_params(initial, mask) == toy_task.IN_DIM * toy_task.HIDDEN
  )


def test_partition_join_inverts_split():
  params = toy_task.init_params(jax.random.key(3))
  mask = optim.frozen_mask(params, toy_task.config().toy.optim)
  partition = optim.Partition.from_mask(mask)
  joined = partition.join(*partition.split(params))
  assert jax.tree.structure(joined) == jax.tree.structure(params)
  for a, b in zip(
    jax.tree.leaves(joined), jax.tree.leaves(params), strict=True
  ):
    assert a is b


def test_lr_mults_match_separate_adamw_per_group():
  # Independent reference: optax.multi_transform with one AdamW per group,
  # the second at a tenth of the schedule; clipping off so groups do not
  # share a global norm.
  cfg = common.optim_config(
    lr=1e-2, warmup_steps=2, weight_decay=0.1, frozen=["embed/.*"]
  )
  cfg.grad_clip_norm = 0.0
  cfg.lr_mults = (("head/b", 0.0), ("head/.*", 0.1))
  params = toy_task.init_params(jax.random.key(1))
  tx, mask, schedule = optim.make(cfg, params, total_steps=5)
  trainable, _ = optim.Partition.from_mask(mask).split(params)
  assert sorted(trainable) == ["head/b", "head/w"]

  def adamw(scale):
    return optax.adamw(
      lambda step: scale * schedule(step),
      weight_decay=0.1,
      mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
    )

  reference = optax.multi_transform(
    {"tenth": adamw(0.1), "zero": adamw(0.0)},
    {"head/w": "tenth", "head/b": "zero"},
  )
  state, ref_state = tx.init(trainable), reference.init(trainable)
  ours, theirs = dict(trainable), dict(trainable)
  rng = np.random.default_rng(0)
  for _ in range(4):
    grads = {
      k: jnp.asarray(rng.normal(size=v.shape), v.dtype)
      for k, v in trainable.items()
    }
    updates, state = tx.update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
    ref_updates, ref_state = reference.update(grads, ref_state, theirs)
    theirs = optax.apply_updates(theirs, ref_updates)
  for key in trainable:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
  # Multiplier 0 holds the bias, 0.1 moves the matrix.
  np.testing.assert_array_equal(ours["head/b"], trainable["head/b"])
  assert not np.allclose(ours["head/w"], trainable["head/w"])


@pytest.mark.parametrize(
  ("lr_mults", "message"),
  [
    ((("embed/.*", 0.1),), "matches no trainable parameter"),
    ((("head/(", 0.1),), "does not compile"),
    ((("head/.*", -1.0),), "multiplier >= 0"),
    (("head/.*=0.1",), "pair"),
  ],
)
def test_bad_lr_mults_are_named(lr_mults, message):
  cfg = toy_task.config().toy.optim
  cfg.lr_mults = lr_mults
  # embed/.* is frozen in the toy config: a multiplier for it is a mistake.
  with pytest.raises(ValueError, match=message):
    optim.make(cfg, toy_task.init_params(jax.random.key(0)), 10)


def test_lr_mults_for_an_absent_optional_group_are_skipped():
  paths = ["proj/w", "proj/b"]
  mults = (("qformer/.*", 0.1), ("proj/b", 0.0))
  # Phase 2's MLP baseline has no Q-Former: its entry is skipped, the
  # others still apply.
  assert optim.lr_multipliers(paths, mults, ("qformer", "proj")) == {
    "proj/w": 1.0,
    "proj/b": 0.0,
  }
  # Not declared optional, or a typo of the group name: still an error.
  with pytest.raises(ValueError, match="'qformer/.*' matches no trainable"):
    optim.lr_multipliers(paths, mults)
  with pytest.raises(ValueError, match="'qfromer/.*' matches no trainable"):
    optim.lr_multipliers(paths, (("qfromer/.*", 0.1),), ("qformer",))
  # Present but unmatched (all of its leaves frozen, say): an error too.
  with pytest.raises(ValueError, match="'proj/x' matches no trainable"):
    optim.lr_multipliers(paths, (("proj/x", 0.1),), ("proj",))


def test_group_norms_split_the_global_norm_by_top_level_group(tmp_path):
  grads = {
    "a/x": jnp.array([3.0, 4.0]),
    "a/y": jnp.array([12.0]),
    "b/z": jnp.array([1.0, 0.0]),
  }
  norms = train._group_norms(grads, grads, grads)
  assert float(norms["grad_norm/a"]) == pytest.approx(13.0)  # 3-4-12-13
  assert float(norms["grad_norm/b"]) == pytest.approx(1.0)
  # One group: the global norm says it all, nothing extra is logged.
  assert train._group_norms({"a/x": grads["a/x"]}, {}, {}) == {}

  # A run training both toy groups logs them, and they add up in squares.
  cfg = toy_task.config(steps=5, frozen=())
  cfg.toy.train.log_every = 1  # logged values are interval means
  toy_task.run(cfg, tmp_path)
  rows = [
    json.loads(line)
    for line in (tmp_path / "toy" / "logs" / "metrics.jsonl")
    .read_text()
    .splitlines()
  ]
  row = [r for r in rows if "grad_norm/embed" in r][-1]
  assert row["grad_norm"] ** 2 == pytest.approx(
    row["grad_norm/embed"] ** 2 + row["grad_norm/head"] ** 2, rel=1e-4
  )


def test_itstime_every_nth_and_last_step():
  assert [s for s in range(1, 13) if train.itstime(s, 5, 12)] == [5, 10, 12]
  assert [s for s in range(1, 13) if train.itstime(s, 1, 12)] == list(
    range(1, 13)
  )
  assert not any(train.itstime(s, 0, 12) for s in range(1, 13))


def test_metrics_are_fetched_at_log_and_checkpoint_steps_only(
  tmp_path, monkeypatch
):
  fetched = []
  fetch = train.fetch_metrics

  def spy(device_metrics, first_step, phase):
    fetched.append((first_step, len(device_metrics)))
    return fetch(device_metrics, first_step, phase)

  monkeypatch.setattr(train, "fetch_metrics", spy)
  cfg = toy_task.config(steps=12)
  cfg.toy.train.checkpoint_every = 4
  toy_task.run(cfg, tmp_path, jax.devices()[:1])
  # Logs at 5, 10, 12 and checkpoints at 4, 8, 12: every other step stays
  # on the device until one of those.
  assert fetched == [(0, 4), (4, 1), (5, 3), (8, 2), (10, 2)]
  assert len(_loss_curve(tmp_path)) == 3


def test_mesh_that_does_not_fit_devices_is_rejected():
  with pytest.raises(sharding.MeshConfigError, match=r"config.mesh.shape.*16"):
    sharding.make_mesh(common.mesh_config(data=16))
  with pytest.raises(sharding.MeshConfigError, match="does not divide"):
    sharding.make_mesh(common.mesh_config(data=-1, fsdp=3))


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(PermissionError, match=str(blocker)):
    toy_task.run(toy_task.config(), blocker / "workdir", jax.devices()[:1])


def test_corrupted_checkpoint_is_reported(tmp_path):
  toy_task.run(toy_task.config(steps=5), tmp_path, jax.devices()[:1])
  step_dir = tmp_path / "toy" / "checkpoints" / "5" / "state"
  for path in step_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
    toy_task.run(toy_task.config(steps=10), tmp_path, jax.devices()[:1])


def test_incompatible_checkpoint_is_reported(tmp_path, monkeypatch):
  toy_task.run(toy_task.config(steps=5), tmp_path, jax.devices()[:1])
  monkeypatch.setattr(toy_task, "HIDDEN", toy_task.HIDDEN * 2)
  with pytest.raises(checkpoint.CheckpointError, match="different model"):
    toy_task.run(toy_task.config(steps=10), tmp_path, jax.devices()[:1])


def test_nonfinite_loss_fails_loudly(tmp_path):
  cfg = toy_task.config(steps=10)
  cfg.toy.optim.learning_rate = 1e30
  cfg.toy.optim.grad_clip_norm = 0.0
  with pytest.raises(
    train.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+\."
  ):
    toy_task.run(cfg, tmp_path, jax.devices()[:1])


def test_batch_size_must_split_over_data_shards(tmp_path):
  cfg = toy_task.config(batch_size=12)  # 8 data shards
  with pytest.raises(ValueError, match="toy.train.batch_size=12"):
    toy_task.run(cfg, tmp_path)


def test_tensorboard_tags_replace_what_tensorboard_rejects():
  from ilm_jax import metric_writer  # noqa: PLC0415

  assert metric_writer.tensorboard_tag("final/test/hr@10") == "final/test/hr_10"
  assert metric_writer.tensorboard_tag("ii/recall@10 x") == "ii/recall_10_x"
  assert metric_writer.tensorboard_tag("a.b-c/d_e") == "a.b-c/d_e"


def test_init_on_mesh_runs_init_under_jit_into_shardings_and_adds_loaded_parts():
  mesh_config = common.mesh_config(data=2, fsdp=2, model=2)
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:8])
  traced = []

  def init_params(rng):
    traced.append(isinstance(rng, jax.core.Tracer))
    w = jax.random.normal(rng, (8, 12))
    return dict(
      llm_like=nn.LogicallyPartitioned(w, ("embed", "mlp")),
      head=dict(b=jnp.zeros((3,))),
    )

  on_mesh = jax.device_put(jnp.ones((4, 2)), sharding.replicated(mesh))
  loaded = dict(kept=on_mesh, host=np.arange(8.0).reshape(8, 1))
  task = train.Task(
    name="init",
    init_params=init_params,
    loss_fn=None,
    train_iterator=None,
    load_params=lambda mesh_, config_: loaded,
  )
  params = train.init_on_mesh(task, jax.random.key(3), mesh, mesh_config)
  # Traced for the shapes and for the jitted init; never run eagerly.
  assert traced == [True, True]
  assert sorted(params) == ["head", "host", "kept", "llm_like"]
  # embed -> fsdp, mlp -> model (the rules); each device holds one block.
  assert tuple(params["llm_like"].sharding.spec) == ("fsdp", "model")
  assert params["llm_like"].addressable_shards[0].data.shape == (4, 6)
  np.testing.assert_array_equal(
    np.asarray(params["llm_like"]),
    np.asarray(
      jax.jit(lambda r: jax.random.normal(r, (8, 12)))(jax.random.key(3))
    ),
  )
  # Loaded arrays already over the whole mesh stay as they are; host
  # arrays are placed (fsdp over their largest divisible dimension).
  assert params["kept"] is on_mesh
  assert tuple(params["host"].sharding.spec) == ("fsdp", None)
  np.testing.assert_array_equal(np.asarray(params["host"]), loaded["host"])

  clash = dataclasses.replace(
    task, load_params=lambda mesh_, config_: dict(head=jnp.ones(3))
  )
  with pytest.raises(ValueError, match=r"both return \['head'\]"):
    train.init_on_mesh(clash, jax.random.key(3), mesh, mesh_config)


def test_a_finished_run_evaluated_again_keeps_its_training_time(tmp_path):
  cfg = toy_task.config(steps=6)
  first = toy_task.run(cfg, tmp_path, jax.devices()[:1])
  again = toy_task.run(cfg, tmp_path, jax.devices()[:1])
  assert (first.step, first.steps_this_run) == (6, 6)
  assert (again.step, again.steps_this_run) == (6, 0)
  trained = dict(steps=6, steps_this_run=6, wall_time_s=120.0)
  evaluated = dict(steps=6, steps_this_run=0, wall_time_s=9.0)
  assert experiment._keep_training_time(trained, evaluated) == dict(
    steps=6, steps_this_run=0, wall_time_s=120.0, reevaluation_wall_time_s=9.0
  )
  # Training further, or a first run, records this call's time.
  longer = dict(steps=8, steps_this_run=2, wall_time_s=30.0)
  assert experiment._keep_training_time(trained, longer) == longer
  assert experiment._keep_training_time(None, evaluated) == evaluated
  other = dict(steps=4, steps_this_run=0, wall_time_s=9.0)
  assert experiment._keep_training_time(trained, other) == other
