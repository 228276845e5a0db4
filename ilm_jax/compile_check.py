r"""Compiles the sharded phase-1 and phase-2 train steps for a TPU topology.

  python -m ilm_jax.compile_check --config=configs/ml1m.py --topology=v5e-16

No TPU is needed: the TPU compiler in `libtpu` (`pip install -e ".[tpu]"`)
compiles for a topology described by `jax.experimental.topologies`, as
MaxText's train_compile.py does. Parameters, optimizer state and batches
are abstract (`jax.eval_shape`; no weights are read), placed with the same
shardings `train.train` gives them on `config.mesh`, and the step is
`train.make_train_step` jitted as in `train.train`. For each phase the
report gives, per device: argument, output and temporary bytes and their
total against the chip's HBM; FLOPs per step (XLA's cost analysis of the
per-device program, and times the device count); and the collectives in
the optimized HLO.

Topologies: `v5e-N` (N chips), `v5p-N` / `v4-N` (N TensorCores, two per
chip, as Cloud names them), `v6e-N`, or a raw `v5e:4x4` form. `cpu-N`
compiles for N host devices instead (set
XLA_FLAGS=--xla_force_host_platform_device_count=N): the fallback when
libtpu is missing.
"""

import dataclasses
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ilm_jax import optim, sharding, train, tree_utils
from ilm_jax.models import ilm, llm, llm_loading, qformer


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures from the vendor's public specifications."""

  hbm_gib: float
  peak_bf16_tflops: float
  cores_per_chip: int  # how a "v5p-N" name counts


CHIPS = {
  "v4": Chip(32, 275, 2),
  "v5e": Chip(16, 197, 1),
  "v5p": Chip(95, 459, 2),
  "v6e": Chip(32, 918, 1),
}
# Chip grids per chip count: 2-D tori for v5e/v6e, 3-D for v4/v5p.
_GRIDS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}
_COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)
# The ML-1M sizes after the 5-core filter (docs/RESULTS.md): CF tables.
ML1M_ITEMS, ML1M_USERS = 3416, 6040


def topology_devices(name: str) -> tuple[list, Chip | None, str]:
  """(devices, chip figures or None for CPU, topology in libtpu's form).

  Raises:
    ValueError: an unknown name, naming the accepted forms.
  """
  if name.startswith("cpu-"):
    count = int(name[4:])
    devices = jax.devices("cpu")
    if len(devices) < count:
      raise ValueError(
        f"--topology={name}: {len(devices)} CPU devices; set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={count}."
      )
    return devices[:count], None, name
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)[-:]([0-9x]+)", name)
  if not match:
    raise ValueError(
      f"--topology={name!r}: expected v5e-N, v5p-N, v4-N, v6e-N, a raw "
      "form like v5e:4x4, or cpu-N."
    )
  kind, size = match.groups()
  chip = CHIPS[kind]
  if "x" in size:
    grid = size
  else:
    chips = int(size) // chip.cores_per_chip
    grids = _GRIDS_3D if kind in ("v4", "v5p") else _GRIDS_2D
    if chips not in grids:
      raise ValueError(
        f"--topology={name}: {chips} chips; known sizes: "
        f"{[g * chip.cores_per_chip for g in grids]}."
      )
    grid = grids[chips]
  from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu)

  desc = topologies.get_topology_desc(f"{kind}:{grid}", "tpu")
  return list(desc.devices), chip, f"{kind}:{grid}"


def _abstract(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def qformer_step_inputs(config: ml_collections.ConfigDict):
  """(init fn, loss fn, abstract global batch) of the phase-1 step."""
  model_config = config.qformer.model
  b, length = config.qformer.train.batch_size, model_config.max_text_len
  cf = _abstract((b, model_config.cf_dim), jnp.float32)
  batch = dict(
    item_cf=cf,
    pair_cf=cf,
    user_cf=cf,
    user_item_cf=cf,
    text_ids=_abstract((b, length), jnp.int32),
    text_mask=_abstract((b, length), jnp.int32),
  )

  def init(rng):  # MiniLM weights, when configured, have these shapes
    return qformer.init_params(model_config, rng)

  def loss_fn(params, batch, rng):
    return qformer.phase1_losses(params, batch, rng, model_config)

  return init, loss_fn, batch


def ilm_step_inputs(config: ml_collections.ConfigDict, items: int, users: int):
  """(init fn, loss fn, abstract global batch) of the phase-2 step."""
  ilm_config = config.ilm
  dtypes = dict(bfloat16=jnp.bfloat16, float32=jnp.float32)
  llm_config = llm_loading.architecture(
    ilm_config.llm.checkpoint,
    dtypes[ilm_config.llm.dtype],
    dtypes[ilm_config.llm.param_dtype],
  ).replace(remat=bool(ilm_config.llm.get("remat", False)))
  model = ilm.build(ilm_config.model, llm_config, config.qformer.model)
  cf_dim = config.qformer.model.cf_dim

  def init(rng):
    llm_params = llm.Llama(llm_config).init(rng, jnp.zeros((1, 1), jnp.int32))
    # The loader keeps norm scales in float32 (llm_loading._to_params).
    llm_params = jax.tree_util.tree_map_with_path(
      lambda path, x: (
        x.astype(jnp.float32) if "scale" in tree_utils.path_str(path) else x
      ),
      llm_params["params"],
    )
    params = dict(
      cf=dict(
        items=jnp.zeros((items, cf_dim)), users=jnp.zeros((users, cf_dim))
      ),
      llm=llm_params,
    )
    if model.adapter == "qformer":
      params["qformer"] = qformer.init_params(config.qformer.model, rng)
    adapter = ilm.init_adapter(
      model, rng, cf_dim, config.qformer.model.hidden_size
    )
    if adapter:
      params["prompt" if model.adapter == "prompt" else "proj"] = adapter
    return params

  b, length = ilm_config.train.batch_size, ilm_config.data.max_len
  entities = 1 + max(ilm_config.data.max_history, 3)
  tokens = _abstract((b, length), jnp.int32)
  flags_ = _abstract((b, length), jnp.bool_)
  batch = dict(
    input_ids=tokens,
    soft_entity=tokens,
    soft_slot=tokens,
    targets=tokens,
    attention_mask=flags_,
    loss_mask=flags_,
    entity_kind=_abstract((b, entities), jnp.int32),
    entity_index=_abstract((b, entities), jnp.int32),
    entity_mask=_abstract((b, entities), jnp.bool_),
  )
  return init, model.loss, batch


def llm_step_flops(config: ml_collections.ConfigDict) -> float:
  """Analytic FLOPs of the frozen LLM in one phase-2 step (whole batch).

  XLA's cost analysis counts a loop body once, and the LLM's layers run in
  a scanned loop, so its figure misses (layers - 1) layers; this is the
  count to compare with. Forward: 2 FLOPs per multiply-add over every
  projection for each token, plus QK^T and PV over the full L x L scores,
  plus the vocabulary head on max_target_tokens answer positions. The
  frozen LLM's backward computes input gradients only (no weight
  gradients), about as many FLOPs as the forward: the step is 2x forward.
  """
  ilm_config = config.ilm
  c = llm_loading.architecture(ilm_config.llm.checkpoint)
  b, length = ilm_config.train.batch_size, ilm_config.data.max_len
  e, h, kvh, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  per_layer = e * h * d * 2 + 2 * e * kvh * d + 3 * e * c.intermediate_size
  projections = 2 * per_layer * c.num_layers * b * length
  attention = 2 * 2 * b * length * length * h * d * c.num_layers
  head = 2 * e * c.vocab_size * b * ilm_config.model.max_target_tokens
  return 2.0 * (projections + attention + head)


def compile_step(
  init, loss_fn, batch, phase_config, mesh, mesh_config, optional_groups=()
):
  """Lowers and compiles the train step as `train.train` jits it.

  `optional_groups`: as `train.Task.optional_param_groups`.

  Returns:
    The compiled executable.
  """
  start = time.perf_counter()
  boxed = jax.eval_shape(init, jax.random.key(0))
  param_shardings = sharding.param_shardings(boxed, mesh, mesh_config)
  params = tree_utils.unbox(boxed)
  tx, frozen_mask, schedule = optim.make(
    phase_config.optim, params, int(phase_config.train.steps), optional_groups
  )
  partition = optim.Partition.from_mask(frozen_mask)
  trainable_shardings, frozen_shardings = partition.split(param_shardings)
  trainable, frozen = partition.split(params)
  opt_shardings = (
    jax.jit(tx.init, in_shardings=(trainable_shardings,))
    .lower(trainable)
    .compile()
    .output_shardings
  )
  replicated = sharding.replicated(mesh)
  # As in train.train: every state leaf laid out over the whole mesh.
  opt_shardings = jax.tree.map(
    lambda s: s if len(s.device_set) == mesh.size else replicated,
    opt_shardings,
  )
  opt_state = jax.eval_shape(tx.init, trainable)
  state_shardings = dict(
    step=replicated, params=trainable_shardings, opt_state=opt_shardings
  )
  state = dict(
    step=_abstract((), jnp.int32), params=trainable, opt_state=opt_state
  )
  task = train.Task(
    name="compile_check", init_params=init, loss_fn=loss_fn, train_iterator=None
  )
  step = jax.jit(
    train.make_train_step(
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
      replicated,
    ),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
  rng = jax.eval_shape(lambda: jax.random.key(0))
  lowered = step.lower(state, frozen, batch, rng)
  logging.info("Lowered in %.1f s.", time.perf_counter() - start)
  compiled = lowered.compile()
  logging.info("Compiled in %.1f s.", time.perf_counter() - start)
  return compiled


def collectives(hlo_text: str) -> dict[str, int]:
  """Counts each collective op (sync or async start) in optimized HLO."""
  counts = {}
  for name in _COLLECTIVES:
    n = len(re.findall(rf"\s{name}(?:-start)?\(", hlo_text))
    if n:
      counts[name] = n
  return counts


def report(compiled, num_devices: int, chip: Chip | None) -> dict:
  """Per-device memory (GiB), FLOPs and collectives of a compiled step."""
  memory = compiled.memory_analysis()
  gib = 1024**3
  arguments = memory.argument_size_in_bytes / gib
  outputs = memory.output_size_in_bytes / gib
  aliased = memory.alias_size_in_bytes / gib
  temporaries = memory.temp_size_in_bytes / gib
  total = arguments + outputs - aliased + temporaries
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  out = dict(
    arguments_gib=arguments,
    outputs_gib=outputs,
    aliased_gib=aliased,
    temporaries_gib=temporaries,
    total_gib=total,
    flops_per_device=flops,
    flops_per_step=flops * num_devices,
    collectives=collectives(compiled.as_text()),
  )
  if chip is not None:
    out["hbm_gib"] = chip.hbm_gib
    out["fits"] = total <= chip.hbm_gib
  return out


def run(config, topology: str, phases=("qformer", "ilm")) -> dict:
  """Compiles the selected phases' steps; returns {phase: report}."""
  devices, chip, desc = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  print(
    f"topology {topology} ({desc}): {len(devices)} devices, mesh "
    f"{dict(mesh.shape)}"
  )
  results = {}
  for phase in phases:
    if phase == "qformer":
      inputs = qformer_step_inputs(config)
    elif phase == "ilm":
      inputs = ilm_step_inputs(config, ML1M_ITEMS, ML1M_USERS)
    else:
      raise ValueError(f"--phases: {phase!r}; expected qformer or ilm.")
    try:
      optional = ilm.ADAPTER_PARTS if phase == "ilm" else ()
      compiled = compile_step(
        *inputs, config[phase], mesh, config.mesh, optional
      )
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler refuses programs that exceed HBM: that is a result.
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      results[phase] = dict(fits=False, error=str(e).splitlines()[0])
      print(f"[{phase}] does not fit: {results[phase]['error']}")
      continue
    results[phase] = r = report(compiled, len(devices), chip)
    if phase == "ilm":
      r["llm_flops_per_step"] = llm_step_flops(config)
      if chip is not None:
        r["min_step_s"] = r["llm_flops_per_step"] / (
          len(devices) * chip.peak_bf16_tflops * 1e12
        )
    print(
      f"[{phase}] per device: arguments {r['arguments_gib']:.2f} GiB, "
      f"temporaries {r['temporaries_gib']:.2f} GiB, total "
      f"{r['total_gib']:.2f} GiB"
      + (f" of {chip.hbm_gib} GiB HBM" if chip else "")
      + f"; XLA cost analysis {r['flops_per_step'] / 1e12:.2f} TFLOP/step "
      f"({r['flops_per_device'] / 1e12:.3f} per device, loop bodies once)"
      + (
        f"; analytic LLM {r['llm_flops_per_step'] / 1e12:.1f} TFLOP/step"
        if "llm_flops_per_step" in r
        else ""
      )
      + (
        f", >= {r['min_step_s'] * 1e3:.0f} ms/step at peak bf16"
        if "min_step_s" in r
        else ""
      )
      + f"; collectives {r['collectives']}"
    )
  return results


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    run(f.config, f.topology, tuple(f.phases))
  except ValueError as e:
    print(f"compile_check: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # Defined here, not at import: benchmarks import this module's functions.
  config_flags.DEFINE_config_file("config", lock_config=True)
  flags.DEFINE_string("topology", "v5e-16", "see the module docstring")
  flags.DEFINE_list("phases", ["qformer", "ilm"], "which train steps")
  app.run(main)
