"""benchmarks/gpu_check.py at CPU size (no GPU is lent to the test suite)."""

import numpy as np
import pytest

from benchmarks import gpu_check
from configs import ml1m

pytestmark = pytest.mark.slow  # a tool run (a phase-2 step)


def test_tiny_phase2_step_reports_throughput_and_model_flops():
  config = ml1m.get_config("tiny")
  result = gpu_check.run(config, batch_size=4, steps=2, tiny=True)
  assert np.isfinite(result["loss"]) and result["prompts_per_s"] > 0
  assert result["prompts_per_s"] == 4 / result["step_s"]
  # By hand for TINY_LLM (d 64, 4/2 heads of 16, MLP 128, 2 layers, vocab
  # 512), batch 4 x 32 tokens, 8 answer tokens scored: 2 x forward.
  per_layer = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128
  forward = (
    2 * per_layer * 2 * 4 * 32 + 4 * 4 * 32 * 32 * 64 * 2 + 2 * 64 * 512 * 4 * 8
  )
  assert result["model_tflops_per_step"] * 1e12 == 2 * forward
  assert result["mfu"] is None  # CPU: no peak in the table
