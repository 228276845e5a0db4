"""Device mesh and parameter/batch shardings declared in config.

The mesh has named axes (`data`, `fsdp`, `model` by default). A global batch
is split over (`data`, `fsdp`). A parameter gets its partition spec, in this
order:
  1. its flax logical axis names (modules annotated with
     `nn.with_logical_partitioning`, e.g. the LLM) mapped through
     `config.mesh.logical_axis_rules`;
  2. the first regex in `config.mesh.partition_rules` matching its
     '/'-joined path (e.g. `("qformer/.*kernel", (None, "model"))`);
  3. FSDP: if the `fsdp` axis is larger than one, the largest dimension
     divisible by it is split over it (big_vision's strategy);
  4. otherwise replicated.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ilm_jax import tree_utils

BATCH_AXES = ("data", "fsdp")
# Activation logical axes (ilm_jax/models/llm.py) -> mesh axes, used unless
# `config.mesh.logical_axis_rules` names them: the batch over the
# data-parallel axes, attention heads and MLP columns over `model` (as the
# weights producing them), everything else unconstrained by name.
ACTIVATION_RULES = (
  ("activation_batch", BATCH_AXES),
  ("activation_heads", "model"),
  ("activation_kv_heads", None),
  ("activation_mlp", "model"),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_head_dim", None),
)


class MeshConfigError(ValueError):
  """The configured mesh does not fit the devices at hand."""


def mesh_axis_sizes(shape: Mapping[str, int], num_devices: int) -> dict:
  """Resolves one -1 axis and checks that the mesh uses every device.

  Args:
    shape: axis name -> size, in mesh order; at most one size may be -1.
    num_devices: how many devices the mesh must cover.

  Returns:
    axis name -> positive size.

  Raises:
    MeshConfigError: naming `config.mesh.shape`, the product and the count.
  """
  sizes = dict(shape)
  free = [name for name, size in sizes.items() if size == -1]
  bad = {n: s for n, s in sizes.items() if s != -1 and s < 1}
  if bad or len(free) > 1:
    raise MeshConfigError(
      f"config.mesh.shape={sizes}: sizes must be >= 1, with at most one -1 "
      f"(got {bad or free})."
    )
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      raise MeshConfigError(
        f"config.mesh.shape={sizes}: the fixed axes use {fixed} devices, "
        f"which does not divide the {num_devices} devices available."
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshConfigError(
      f"config.mesh.shape={sizes} needs {fixed} devices but "
      f"{num_devices} are available (jax.devices()); use -1 for one axis "
      "to take the rest."
    )
  return sizes


def make_mesh(
  mesh_config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds the named device mesh described by `config.mesh`."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_axis_sizes(mesh_config.shape, len(devices))
  # Auto axes: XLA propagates shardings from the ones we pin (params, batch)
  # rather than requiring every intermediate to be typed explicitly.
  return jax.make_mesh(
    tuple(sizes.values()),
    tuple(sizes.keys()),
    axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
    devices=devices,
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes))


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  size = mesh.shape.get("fsdp", 1)
  if size <= 1:
    return PartitionSpec()
  # Largest dimension first; ties go to the earlier dimension.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0 and shape[dim] >= size:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return PartitionSpec(*spec)
  return PartitionSpec()


def _check_spec(path: str, spec: PartitionSpec, shape, mesh: Mesh):
  if len(spec) > len(shape):
    raise MeshConfigError(
      f"Partition spec {spec} for {path} has more entries than its shape "
      f"{shape}."
    )
  for dim, axes in zip(shape, spec, strict=False):
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    split = int(np.prod([mesh.shape[a] for a in axes]))
    if dim % split:
      raise MeshConfigError(
        f"{path} has a dimension of {dim}, not divisible by the {split}-way "
        f"split {spec} on mesh {dict(mesh.shape)}."
      )


def param_shardings(
  params: Any, mesh: Mesh, mesh_config: ml_collections.ConfigDict
) -> Any:
  """Returns a NamedSharding for every leaf of `params`.

  Args:
    params: a param tree, possibly holding flax `LogicallyPartitioned` boxes
      (arrays or `jax.ShapeDtypeStruct`s as values).
    mesh: the device mesh.
    mesh_config: `config.mesh` (logical_axis_rules, optional partition_rules).

  Returns:
    A tree of NamedShardings with the structure of the unboxed params.
  """
  rules = [
    (re.compile(pattern), PartitionSpec(*spec))
    for pattern, spec in mesh_config.get("partition_rules", ())
  ]
  logical_rules = [tuple(r) for r in mesh_config.get("logical_axis_rules", ())]

  def spec_for(path, leaf):
    name = tree_utils.path_str(path)
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, logical_rules)
      # Mesh axes the rules name but this mesh lacks are dropped.
      spec = PartitionSpec(*(a if a in mesh.axis_names else None for a in spec))
      shape = leaf.value.shape
    else:
      shape = leaf.shape
      spec = next((s for pattern, s in rules if pattern.fullmatch(name)), None)
      if spec is None:
        spec = _fsdp_spec(shape, mesh)
    _check_spec(name, spec, shape, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
    spec_for, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )


def activation_rules(
  mesh_config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple:
  """Logical axis rules for activations on `mesh` (config first).

  Returns:
    ((logical name, mesh axes or None), ...): the config's rules followed by
    ACTIVATION_RULES for names the config does not set; mesh axes that
    `mesh` lacks are dropped.
  """
  rules = [tuple(r) for r in mesh_config.get("logical_axis_rules", ())]
  named = {name for name, _ in rules}
  rules += [r for r in ACTIVATION_RULES if r[0] not in named]

  def keep(axes):
    if axes is None or isinstance(axes, str):
      return axes if axes in mesh.axis_names else None
    kept = tuple(a for a in axes if a in mesh.axis_names)
    return kept or None

  return tuple((name, keep(axes)) for name, axes in rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Keeps leaves laid out over the whole mesh; replicates the others.

  `jax.jit(tx.init)(params)` gives optimizer moments the params' layouts,
  but scalars (step counts) land on one device; the train step wants every
  input on the mesh.
  """
  mesh_devices = set(mesh.devices.flat)

  def place(x):
    if set(x.sharding.device_set) == mesh_devices:
      return x
    return jax.device_put(x, replicated(mesh))

  return jax.tree.map(place, tree)


def put_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Turns this process's slice of the global batch into global jax Arrays."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in batch.items()
  }
