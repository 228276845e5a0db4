"""Test setup: eight virtual CPU devices so mesh code runs multi-device.

XLA reads the flag when the backend starts, so it must be set before any
test imports jax. Tests that want one device build a mesh from
`jax.devices()[:1]`.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
