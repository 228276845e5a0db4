"""The compile check on host devices (the TPU path needs libtpu)."""

import jax
import pytest

from configs import ml1m
from ilm_jax import compile_check
from ilm_jax.models import llm_loading


def test_unknown_topology_names_the_accepted_forms():
  with pytest.raises(ValueError, match="expected v5e-N, v5p-N"):
    compile_check.topology_devices("tpu-16")
  with pytest.raises(ValueError, match="known sizes"):
    compile_check.topology_devices("v5e-12")


@pytest.mark.slow
def test_phase2_step_compiles_on_a_sharded_cpu_mesh():
  config = ml1m.get_config("tiny")
  config.mesh.shape.fsdp = 2  # a 2 x 2 data x fsdp mesh on 4 devices
  results = compile_check.run(config, "cpu-4", phases=("ilm",))
  r = results["ilm"]
  assert r["arguments_gib"] > 0 and r["temporaries_gib"] > 0
  assert r["total_gib"] >= r["arguments_gib"]
  assert r["flops_per_step"] == pytest.approx(4 * r["flops_per_device"])
  # Gradients are summed over data shards and FSDP gathers parameters.
  assert r["collectives"].get("all-reduce", 0) >= 1
  assert r["collectives"].get("all-gather", 0) >= 1
  # The analytic count, by hand for SmolLM2-135M (d 576, 9/3 heads of 64,
  # MLP 1536, 30 layers, vocab 49152), batch 8 x 128 tokens, 64 answers.
  c = llm_loading.architecture(config.ilm.llm.checkpoint)
  assert (c.hidden_size, c.intermediate_size, c.num_layers) == (576, 1536, 30)
  b, t = config.ilm.train.batch_size, config.ilm.data.max_len
  per_layer = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536
  forward = (
    2 * per_layer * 30 * b * t
    + 4 * b * t * t * 576 * 30
    + 2 * 576 * 49152 * b * config.ilm.model.max_target_tokens
  )
  assert r["llm_flops_per_step"] == 2 * forward
  assert jax.device_count() >= 4
