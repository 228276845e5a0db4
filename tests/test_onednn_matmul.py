"""The oneDNN bf16 matmul custom call against jnp float32.

Tolerance: the op rounds both operands to bfloat16 (8 significant bits) and
accumulates in float32. Against float32 `jnp.dot` on the rounded operands
it must agree to float32 accumulation error (rtol 1e-5 of the largest
entry); against float32 on the unrounded operands, to 1e-2 of the largest
entry (bf16 rounding, 2^-9 relative per operand, averaged over K terms).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax.ops import onednn_matmul as om

OK, WHY = om.available()
needs_op = pytest.mark.skipif(not OK, reason=f"oneDNN op unavailable: {WHY}")


def _arrays(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
  return x, w


def _bf16(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


def _close(got, want, rtol):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=0)


@needs_op
@pytest.mark.parametrize("m,k,n", [(64, 576, 192), (37, 96, 50), (1, 8, 3)])
def test_values_match_f32(m, k, n):
  x, w = _arrays(m, k, n)
  y = jax.jit(lambda x, w: om.frozen_matmul(x, w, use_ffi=True))(x, w)
  assert y.dtype == jnp.float32
  _close(y, _bf16(x) @ _bf16(w), 1e-5)
  _close(y, x @ w, 1e-2)


@needs_op
def test_transposed_weight_and_batch_dims():
  x, w = _arrays(24, 64, 40)
  x3 = x.reshape(2, 12, 64)
  y = om.frozen_matmul(x3, w.T, transpose_w=True, use_ffi=True)
  assert y.shape == (2, 12, 40)
  _close(y.reshape(24, 40), _bf16(x) @ _bf16(w), 1e-5)


@needs_op
def test_f32_compute_is_exact():
  x, w = _arrays(33, 80, 20)
  y = om.frozen_matmul(x, w, compute_dtype=jnp.float32, use_ffi=True)
  _close(y, x @ w, 1e-5)


@needs_op
def test_gradients_into_inputs_only():
  x, w = _arrays(48, 96, 64, seed=1)
  target = jnp.asarray(np.random.default_rng(2).normal(size=(48, 64)))

  def loss(matmul, x, w):
    return jnp.sum(jnp.tanh(matmul(x, w)) * target)

  ours = jax.jit(
    jax.grad(
      lambda x, w: loss(
        lambda a, b: om.frozen_matmul(a, b, use_ffi=True), x, w
      ),
      argnums=(0, 1),
    )
  )
  dx, dw = ours(x, w)
  want = jax.grad(lambda x: loss(jnp.dot, x, w))(x)
  _close(dx, want, 1e-2)
  assert not np.asarray(dw).any()  # frozen: no weight gradient
  # The backward is the transposed-weight custom call too.
  hlo = jax.jit(jax.grad(lambda x: loss(om.frozen_matmul, x, w))).lower(x)
  assert hlo.as_text().count(om.TARGET) == 2


@needs_op
def test_bf16_activations_keep_their_dtype():
  x, w = _arrays(16, 32, 8)
  xb = x.astype(jnp.bfloat16)
  dx = jax.grad(lambda a: om.frozen_matmul(a, w).sum())(xb)
  assert dx.dtype == jnp.bfloat16


def test_fallback_matches_op():
  x, w = _arrays(20, 48, 30)
  y = om.frozen_matmul(x, w, use_ffi=False)
  _close(y, _bf16(x) @ _bf16(w), 1e-5)
  hlo = jax.jit(lambda x: om.frozen_matmul(x, w, use_ffi=False)).lower(x)
  assert om.TARGET not in hlo.as_text()


def test_missing_library_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setenv(om.LIB_ENV, str(tmp_path / "nowhere" / "libdnnl.so.3"))
  with pytest.raises(om.OnednnUnavailable, match="is not a file"):
    om.build()


def test_missing_compiler_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("CXX", "")
  monkeypatch.setattr(om.shutil, "which", lambda name: None)
  with pytest.raises(om.OnednnUnavailable, match="C\\+\\+ compiler"):
    om._compiler()


@pytest.mark.parametrize("use_ffi", [False, pytest.param(True, marks=needs_op)])
def test_stored_transpose_gives_the_same_gradient(use_ffi):
  x, w = _arrays(40, 72, 56, seed=3)
  wb = w.astype(jnp.bfloat16)
  wt = jnp.asarray(np.asarray(wb).T.copy())

  def grad(**kw):
    def f(x):
      return jnp.sum(om.frozen_matmul(x, wb, use_ffi=use_ffi, **kw) ** 2)

    return jax.jit(jax.grad(f))(x)

  _close(grad(w_t=wt), grad(), 1e-5)
  want = jax.grad(lambda x: jnp.sum((x @ w) ** 2))(x)
  _close(grad(w_t=wt), want, 1e-2)


def test_cpu_flags_reads_the_first_flags_line_and_tolerates_no_file(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text(
    "processor\t: 0\nmodel name\t: AMD EPYC\nvmx flags\t: ept\n"
    "flags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
  )
  assert om.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
  assert om.cpu_flags(tmp_path / "missing") == frozenset()
  (tmp_path / "no_flags").write_text("processor\t: 0\n")
  assert om.cpu_flags(tmp_path / "no_flags") == frozenset()


@pytest.mark.parametrize(
  "backend, flags, expected",
  [
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "xla"),  # Zen 4
    ("cpu", {"avx2", "fma"}, None),  # Zen 3: AVX2 only
    ("cpu", {"avx512_bf16", "amx_bf16", "amx_tile"}, None),  # with AMX
    ("cpu", set(), None),  # flags unknown
    ("gpu", set(), "xla"),
    ("tpu", {"avx2"}, "xla"),
  ],
)
def test_auto_frozen_matmul_picks_bf16_only_where_it_was_faster(
  backend, flags, expected
):
  assert om.auto_frozen_matmul(backend, frozenset(flags)) == expected


def test_available_is_false_where_onednn_has_no_bf16_kernel(monkeypatch):
  """The op can load on an AVX2-only CPU and still fail every call
  ("no matmul implementation"): `available()` runs one matmul to find out,
  so `frozen_matmul="onednn"` falls back to jnp.dot there."""

  class FakeLib:
    def IlmOnednnVersion(self):  # noqa: N802 (the C symbol's name)
      return 30201

  def no_kernel(*args):
    raise jax.errors.JaxRuntimeError("INTERNAL: no matmul implementation")

  monkeypatch.setattr(om, "_load", FakeLib)
  om.available.cache_clear()
  try:
    monkeypatch.setattr(om, "_ffi_matmul", no_kernel)
    ok, why = om.available()
    assert not ok and "no bf16 matmul for this CPU" in why
    assert "no matmul implementation" in why
    om.available.cache_clear()
    monkeypatch.setattr(
      om, "_ffi_matmul", lambda x, w, t, dtype: jnp.zeros((2, 2), dtype)
    )
    assert om.available() == (True, "oneDNN 3.2")
  finally:
    om.available.cache_clear()
