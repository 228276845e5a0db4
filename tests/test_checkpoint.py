"""Checkpoints and exports: any device count to any other, atomic overwrite.

Writers and readers run in subprocesses because the device count is fixed
when a process starts (XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax import checkpoint, train

COUNTS = (1, 2, 4, 8)
ROOT = pathlib.Path(__file__).parents[1]

# Saves, on N devices, a (16, 8) kernel sharded 2-D over the whole mesh, a
# replicated bias, the same tree fully replicated, and a train checkpoint.
WRITER = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ilm_jax import checkpoint
root, n = sys.argv[1], len(jax.devices())
mesh = Mesh(np.array(jax.devices()).reshape(n // 2 or 1, -1), ("a", "b"))
kernel = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
params = {
  "dense": {
    "kernel": jax.device_put(kernel, NamedSharding(mesh, P("a", "b"))),
    "bias": jax.device_put(jnp.full((8,), 0.5), NamedSharding(mesh, P())),
  }
}
checkpoint.save_params(f"{root}/export", params)
rep = NamedSharding(mesh, P())
checkpoint.save_params(
  f"{root}/export_replicated", jax.tree.map(lambda x: jax.device_put(x, rep), params)
)
ckpt = checkpoint.TrainCheckpointer(f"{root}/checkpoints")
ckpt.save(3, {"params": params, "step": jnp.asarray(3)}, {"position": 3})
ckpt.wait()
ckpt.close()
print("wrote", n)
"""

# Loads every writer's outputs on M devices: without a target, with a
# target without shardings and with a target sharded over M devices.
READER = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ilm_jax import checkpoint
roots, m = sys.argv[1:], len(jax.devices())
mesh = Mesh(np.array(jax.devices()), ("b",))
shapes = {"dense": {"kernel": (16, 8), "bias": (8,)}}
plain = jax.tree.map(
  lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
  is_leaf=lambda x: isinstance(x, tuple))
sharded = {"dense": {
  "kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                 sharding=NamedSharding(mesh, P(None, "b"))),
  "bias": jax.ShapeDtypeStruct((8,), jnp.float32,
                               sharding=NamedSharding(mesh, P()))}}
out = {}
def digest(p):
  return [float(jnp.sum(p["dense"]["kernel"] * jnp.arange(8.0))),
          float(jnp.sum(p["dense"]["bias"]))]
for root in roots:
  for name in ("export", "export_replicated"):
    for label, target in (("none", None), ("plain", plain), ("sharded", sharded)):
      p = checkpoint.load_params(f"{root}/{name}", target)
      if label == "sharded":
        assert p["dense"]["kernel"].sharding == sharded["dense"]["kernel"].sharding
      out[f"{root}:{name}:{label}"] = digest(p)
  for label, target in (("none", None), ("sharded", {"params": sharded,
      "step": jax.ShapeDtypeStruct((), jnp.int32)})):
    state, data = checkpoint.restore_from_path(f"{root}/checkpoints", target)
    out[f"{root}:train:{label}"] = digest(state["params"]) + [
      int(state["step"]), data["position"]]
print("RESULT", json.dumps(out))
"""


def _run(code: str, devices: int, *args) -> str:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT)
  result = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_every_device_count_restores_on_every_other(tmp_path):
  for n in COUNTS:
    assert f"wrote {n}" in _run(WRITER, n, tmp_path / f"n{n}")
  kernel = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  expected_params = [float(np.sum(kernel * np.arange(8.0))), 4.0]
  for m in COUNTS:
    out = _run(READER, m, *(tmp_path / f"n{n}" for n in COUNTS))
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    results = json.loads(line[len("RESULT ") :])
    assert len(results) == len(COUNTS) * 8, m
    for key, value in results.items():
      expected = expected_params + ([3, 3] if ":train:" in key else [])
      assert value == expected, (m, key)


def _tree(value: float, n: int = 64):
  return {"w": jnp.full((n,), value), "step": jnp.asarray(int(value))}


def test_shape_mismatch_is_a_different_model_not_corruption(tmp_path):
  checkpoint.save_params(tmp_path / "export", _tree(1.0))
  target = {
    "w": jax.ShapeDtypeStruct((65,), jnp.float32),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.load_params(tmp_path / "export", target)
  message = str(info.value)
  assert "different model" in message and "'w' is (64,)" in message
  assert "corrupt" not in message
  with pytest.raises(checkpoint.CheckpointError, match="lacks"):
    checkpoint.load_params(tmp_path / "export", {"w": target["w"]})


def test_unreadable_files_are_reported_as_such(tmp_path):
  checkpoint.save_params(tmp_path / "export", _tree(1.0))
  for path in (tmp_path / "export").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
    checkpoint.load_params(tmp_path / "export")


@pytest.mark.slow
def test_read_inside_a_trace_blames_the_caller_not_the_files(tmp_path):
  checkpoint.save_params(tmp_path / "p", {"w": jnp.arange(3.0)})
  with pytest.raises(checkpoint.CheckpointError) as error:
    jax.eval_shape(lambda: checkpoint.load_params(tmp_path / "p"))
  message = str(error.value)
  assert "inside a JAX transformation" in message
  assert "corrupted" not in message
  # The same files read outside the trace are fine.
  np.testing.assert_array_equal(
    checkpoint.load_params(tmp_path / "p")["w"], np.arange(3.0)
  )


def test_overwrite_killed_mid_write_keeps_the_previous_export(tmp_path):
  export = tmp_path / "export"
  checkpoint.save_params(export, _tree(1.0))
  child = textwrap.dedent(f"""
    import jax.numpy as jnp
    from ilm_jax import checkpoint
    tree = {{f"w{{i}}": jnp.full((4_000_000,), 2.0) for i in range(8)}}
    checkpoint.save_params({str(export)!r}, tree)
  """)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", child], env=env)
  deadline = time.time() + 120
  while not list(tmp_path.glob("export.saving*")):
    assert proc.poll() is None and time.time() < deadline, "no write seen"
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  restored = checkpoint.load_params(export)
  assert float(restored["w"][0]) == 1.0 and restored["w"].shape == (64,)
  checkpoint.save_params(export, _tree(3.0))  # the stale write is cleared
  assert float(checkpoint.load_params(export)["w"][0]) == 3.0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_kill_between_the_renames_is_recovered(tmp_path):
  export = tmp_path / "export"
  checkpoint.save_params(export, _tree(1.0), record={"step": 1})
  # The state a kill after "export -> export.old" leaves behind.
  os.replace(export, tmp_path / "export.old")
  assert float(checkpoint.load_params(export)["w"][0]) == 1.0
  assert checkpoint.load_record(export) == {"step": 1}
  checkpoint.save_params(export, _tree(2.0), record={"step": 2})
  assert float(checkpoint.load_params(export)["w"][0]) == 2.0
  assert checkpoint.load_record(export) == {"step": 2}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_best_json_follows_the_params_that_are_there(tmp_path):
  best_path, best_json = tmp_path / "best_params", tmp_path / "best.json"
  record = {"metric": "valid/hr", "value": 0.5, "step": 20}
  checkpoint.save_params(best_path, _tree(1.0), record=record)
  # Killed after the swap, before best.json: the JSON names older params.
  best_json.write_text(json.dumps({**record, "value": 0.4, "step": 10}))
  assert train._read_best(best_path, best_json) == record
  assert json.loads(best_json.read_text()) == record
  # best.json without any params: forgotten, not trusted.
  (tmp_path / "other").mkdir()
  stale = tmp_path / "other" / "best.json"
  stale.write_text(json.dumps(record))
  assert train._read_best(tmp_path / "other" / "best_params", stale) is None
  assert not stale.exists()
