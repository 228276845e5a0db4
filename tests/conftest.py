"""Test setup: eight virtual CPU devices so mesh code runs multi-device.

XLA reads the flag when the backend starts, so it must be set before any
test imports jax. Tests that want one device build a mesh from
`jax.devices()[:1]`.
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
  """Parity tests against torch/transformers belong to the slow tier.

  `reference` describes what a test compares against; `slow` is what keeps
  it out of the default (fast) selection, so a reference test without it
  would slip into the fast tier. Raises pytest.UsageError naming them.
  """
  del config  # unused
  unmarked = [
    item.nodeid
    for item in items
    if item.get_closest_marker("reference")
    and not item.get_closest_marker("slow")
  ]
  if unmarked:
    raise pytest.UsageError(
      "tests marked reference must also be marked slow: " + ", ".join(unmarked)
    )
