"""Partition specs from logical names, regex rules and FSDP; batch placement."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from ilm_jax import sharding


def _mesh(**shape):
  return sharding.make_mesh(common.mesh_config(**shape))


class _Annotated(nn.Module):
  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")),
      (8, 16),
    )
    return x @ kernel


def test_logical_names_map_through_rules():
  mesh = _mesh(data=2, fsdp=2, model=2)
  boxed = jax.eval_shape(
    _Annotated().init, jax.random.key(0), jnp.ones((1, 8))
  )["params"]
  shardings = sharding.param_shardings(boxed, mesh, common.mesh_config())
  # embed -> fsdp, mlp -> model (configs/common.py rules).
  assert shardings["kernel"].spec == P("fsdp", "model")


def test_regex_rules_then_fsdp_then_replicated():
  mesh = _mesh(data=2, fsdp=4, model=1)
  cfg = common.mesh_config()
  cfg.partition_rules = [("proj/kernel", (None, "fsdp"))]
  params = dict(
    proj=dict(kernel=np.zeros((6, 8))),
    table=np.zeros((12, 40)),
    odd=np.zeros((3, 5)),
  )
  specs = jax.tree.map(
    lambda s: s.spec, sharding.param_shardings(params, mesh, cfg)
  )
  assert specs["proj"]["kernel"] == P(None, "fsdp")
  assert specs["table"] == P(None, "fsdp")  # largest divisible dim (40)
  assert specs["odd"] == P()  # nothing divisible by 4: replicated


def test_indivisible_rule_is_rejected_with_the_param_name():
  mesh = _mesh(data=2, fsdp=4, model=1)
  cfg = common.mesh_config()
  cfg.partition_rules = [("w", ("fsdp",))]
  with pytest.raises(sharding.MeshConfigError, match="w has a dimension of 6"):
    sharding.param_shardings(dict(w=np.zeros((6,))), mesh, cfg)


def test_global_batch_is_split_over_data_axes():
  mesh = _mesh(data=4, fsdp=2, model=1)
  batch = sharding.put_global_batch({"x": np.arange(16).reshape(16, 1)}, mesh)
  assert batch["x"].shape == (16, 1)
  assert len(batch["x"].addressable_shards) == 8
  assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 1)}
  np.testing.assert_array_equal(
    np.asarray(batch["x"]), np.arange(16).reshape(16, 1)
  )


def test_mesh_axis_sizes_resolve_minus_one():
  assert sharding.mesh_axis_sizes({"data": -1, "fsdp": 2, "model": 1}, 8) == {
    "data": 4,
    "fsdp": 2,
    "model": 1,
  }
  with pytest.raises(sharding.MeshConfigError, match="at most one -1"):
    sharding.mesh_axis_sizes({"data": -1, "fsdp": -1}, 8)
  assert isinstance(common.mesh_config(), ml_collections.ConfigDict)
