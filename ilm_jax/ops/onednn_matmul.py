"""bf16 matmuls of a frozen weight through oneDNN, as an XLA FFI custom call.

XLA:CPU (jax 0.10) no longer reaches oneDNN, so its bf16 dots do not use the
AMX units of recent Intel CPUs. This module calls oneDNN's matmul primitive
(`csrc/onednn_matmul.cc`) from jitted JAX code on CPU:

  frozen_matmul(x, w)  # x [..., K], w [K, N] (frozen) -> [..., N] float32

It casts both operands to bfloat16 (the compute dtype), accumulates and
returns float32. Its gradient goes to `x` only, dx = dy @ w^T, through the
same custom call with the weight read transposed (no copy); the weight's
cotangent is zero, so use it only for weights that do not train. On other
platforms, or where the op cannot be built, the same function runs
`jnp.dot` with the same dtypes.

The extension is compiled at first use (a few seconds, g++) into the cache
directory (`ILM_JAX_CACHE`, default `~/.cache/ilm_jax`), keyed by the sources,
the jax version and the oneDNN library, and reused afterwards. It needs a
C++ compiler (`CXX`, else g++ or c++) and `libdnnl.so.3`, which the
`onednn-cpu-gomp` wheel (oneDNN 3.2, GNU OpenMP, no other dependency)
installs. `ILM_JAX_ONEDNN_LIB` points at another `libdnnl.so.3` instead.
`available()` says whether the op can run and, if not, why.

oneDNN chooses its kernels from the CPU: AMX (`brg:avx512_core_amx`) on
Sapphire Rapids and later, AVX512-BF16 (`brg:avx512_core_bf16`) on Zen 4
and Cooper Lake; `ONEDNN_VERBOSE=1` prints which one ran. It runs on its own
OpenMP threads (`OMP_NUM_THREADS`, default: all cores) while the calling XLA
thread waits.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

TARGET = "ilm_onednn_matmul"
_CSRC = pathlib.Path(__file__).parent / "csrc"
_SOURCES = ("onednn_matmul.cc", "onednn_c_api.h")
# Wheels that install lib/libdnnl.so.3, in order of preference.
_ONEDNN_DISTRIBUTIONS = ("onednn-cpu-gomp", "onednn-cpu-iomp", "onednn")
LIB_ENV = "ILM_JAX_ONEDNN_LIB"


class OnednnUnavailable(RuntimeError):
  """The custom call cannot be built or loaded here; the message says why."""


def find_library() -> pathlib.Path:
  """Path of the libdnnl.so.3 to link: `ILM_JAX_ONEDNN_LIB` or a wheel's."""
  if os.environ.get(LIB_ENV):
    path = pathlib.Path(os.environ[LIB_ENV])
    if not path.is_file():
      raise OnednnUnavailable(f"{LIB_ENV}={path} is not a file")
    return path
  for name in _ONEDNN_DISTRIBUTIONS:
    try:
      files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for f in files:
      if f.name == "libdnnl.so.3":
        path = pathlib.Path(f.locate()).resolve()
        if path.is_file():
          return path
  raise OnednnUnavailable(
    "no oneDNN library: `pip install onednn-cpu-gomp` (it ships "
    f"libdnnl.so.3) or set {LIB_ENV}"
  )


def _compiler() -> str:
  for candidate in (os.environ.get("CXX"), "g++", "c++"):
    if candidate and shutil.which(candidate):
      return shutil.which(candidate)
  raise OnednnUnavailable(
    "no C++ compiler to build the oneDNN custom call: install g++ "
    "(Debian: apt-get install g++) or set CXX"
  )


def _cache_dir() -> pathlib.Path:
  root = os.environ.get(
    "ILM_JAX_CACHE", pathlib.Path.home() / ".cache" / "ilm_jax"
  )
  return pathlib.Path(root) / "ops"


def build(verbose: bool = False) -> pathlib.Path:
  """Compiles the extension into the cache (once) and returns its path."""
  library = find_library()
  compiler = _compiler()
  digest = hashlib.sha256()
  for name in _SOURCES:
    digest.update((_CSRC / name).read_bytes())
  digest.update(f"{jax.__version__}|{library}|{compiler}".encode())
  out = _cache_dir() / f"onednn_matmul_{digest.hexdigest()[:16]}.so"
  if out.is_file():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  command = [
    compiler,
    "-O2",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-Wno-return-type",  # in the FFI headers
    f"-I{jax.ffi.include_dir()}",
    str(_CSRC / "onednn_matmul.cc"),
    str(library),
    f"-Wl,-rpath,{library.parent}",
  ]
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    partial = pathlib.Path(tmp) / out.name
    result = subprocess.run(
      command + ["-o", str(partial)], capture_output=True, text=True
    )
    if result.returncode != 0:
      raise OnednnUnavailable(
        "building the oneDNN custom call failed:\n"
        + " ".join(command)
        + "\n"
        + result.stderr[-4000:]
      )
    os.replace(partial, out)  # atomic: concurrent builders both succeed
  if verbose:
    logging.info("built %s", out)
  return out


@functools.cache
def _load():
  """Builds, loads and registers the custom call once per process."""
  if sys.platform != "linux":
    raise OnednnUnavailable("the oneDNN custom call is Linux-only here")
  path = build()
  try:
    lib = ctypes.CDLL(str(path))
  except OSError as e:  # e.g. libgomp.so.1 missing
    raise OnednnUnavailable(f"loading {path}: {e}") from e
  jax.ffi.register_ffi_target(
    TARGET, jax.ffi.pycapsule(lib.IlmOnednnMatmul), platform="cpu"
  )
  version = lib.IlmOnednnVersion()
  logging.info(
    "oneDNN matmul custom call: oneDNN %d.%d.%d from %s",
    version // 10000,
    version // 100 % 100,
    version % 100,
    find_library(),
  )
  return lib


@functools.cache
def available() -> tuple[bool, str]:
  """(True, oneDNN version) if the custom call runs here, else (False, why).

  Besides building and loading the op, it runs one 2x2 bf16 matmul
  through it: oneDNN has no bf16 matmul kernel on CPUs without AVX-512
  (e.g. AVX2-only Zen 3), where the op loads but every call would fail.
  """
  try:
    version = _load().IlmOnednnVersion()
    probe = jnp.ones((2, 2), jnp.bfloat16)
    try:
      jax.block_until_ready(_ffi_matmul(probe, probe, False, jnp.float32))
    except jax.errors.JaxRuntimeError as e:
      raise OnednnUnavailable(
        f"oneDNN has no bf16 matmul for this CPU ({e})"
      ) from e
  except OnednnUnavailable as e:
    return False, str(e)
  return True, f"oneDNN {version // 10000}.{version // 100 % 100}"


@functools.cache
def _warn_fallback(reason: str):
  logging.warning("oneDNN matmul unavailable, using jnp.dot: %s", reason)


def _ffi_matmul(x, w, transpose_w, out_dtype):
  n = w.shape[0] if transpose_w else w.shape[1]
  call = jax.ffi.ffi_call(
    TARGET,
    jax.ShapeDtypeStruct((x.shape[0], n), out_dtype),
    vmap_method="sequential",
  )
  return call(x, w, transpose_w=transpose_w)


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
  """The feature flags of the first CPU in `path` (Linux's cpuinfo).

  Returns an empty set where the file cannot be read or has no `flags`
  line (other systems): callers then assume no bf16 instructions.
  """
  try:
    text = pathlib.Path(path).read_text()
  except OSError:
    return frozenset()
  for line in text.splitlines():
    name, _, value = line.partition(":")
    if name.strip() == "flags":
      return frozenset(value.split())
  return frozenset()


def auto_frozen_matmul(backend: str, flags: frozenset[str]) -> str | None:
  """The frozen-matmul route that `ilm.llm.frozen_matmul="auto"` picks.

  bf16 operands pay on CPU only where the CPU has bf16 dot-product
  instructions and XLA uses them: "xla" with `avx512_bf16` and no AMX
  (Zen 4: the LLM's forward + backward about 1.5x f32, docs/results/
  cpu_runtime.md). Without `avx512_bf16` (AVX2-only CPUs such as Zen 3)
  XLA's bf16 dot ran the 30-layer stack at 0.70-0.79x its f32 speed
  (`benchmarks/cpu_matmul.py`) and the phase-2 step about 1.4x slower; on
  AMX CPUs XLA's bf16 dot was slower than f32 too (issue 12); both get
  ordinary f32 matmuls (None). Accelerators (any other backend) get "xla",
  their native bf16 path.

  Args:
    backend: `jax.default_backend()`, e.g. "cpu", "gpu", "tpu".
    flags: the CPU's feature flags (`cpu_flags()`).

  Returns:
    "xla" or None (ordinary matmuls in the LLM's dtype).
  """
  if backend != "cpu":
    return "xla"
  if "avx512_bf16" in flags and "amx_bf16" not in flags:
    return "xla"
  return None


def row_major_transpose(w):
  """w.T as a materialized row-major array (a copy XLA cannot fold away).

  XLA:CPU's bf16 dot is about twice as fast as its f32 one only when its
  right operand is row-major [K, N]; given `x @ w.T` it folds the transpose
  into the dot and runs at f32 speed. Flattening behind an optimization
  barrier forces the copy (a 1-D array has one layout).
  """
  flat = jax.lax.optimization_barrier(jnp.transpose(w).reshape(-1))
  return flat.reshape(w.shape[::-1])


def _jnp_matmul(x, w, transpose_w, out_dtype, copy_transpose=False):
  if transpose_w:
    w = row_major_transpose(w) if copy_transpose else w.T
  return jnp.dot(x, w, preferred_element_type=out_dtype).astype(out_dtype)


def matmul_2d(x, w, *, transpose_w=False, out_dtype=jnp.float32, use_ffi=None):
  """x [M, K] @ w [K, N] (or w [N, K] transposed) in the operands' dtype.

  The custom call on CPU when it is available (`use_ffi=None`), else (or
  with `use_ffi=False`) `jnp.dot`; `use_ffi=True` raises if it is not.
  On CPU, `jnp.dot` with bf16 operands and `transpose_w` reads a
  row-major copy of w.T (`row_major_transpose`): twice as fast there.
  """
  if use_ffi is None:
    ok, reason = available()
    if not ok:
      _warn_fallback(reason)
    use_ffi = ok
  elif use_ffi:
    _load()
  default = functools.partial(
    _jnp_matmul, transpose_w=transpose_w, out_dtype=out_dtype
  )
  if use_ffi:
    cpu = functools.partial(
      _ffi_matmul, transpose_w=transpose_w, out_dtype=out_dtype
    )
  elif transpose_w and x.dtype == jnp.bfloat16:
    cpu = functools.partial(default, copy_transpose=True)
  else:
    return default(x, w)
  return jax.lax.platform_dependent(x, w, cpu=cpu, default=default)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _frozen(x2, w, w_t, transpose_w, compute_dtype, use_ffi):
  del w_t  # backward only
  return matmul_2d(
    x2.astype(compute_dtype),
    w.astype(compute_dtype),
    transpose_w=transpose_w,
    use_ffi=use_ffi,
  )


def _frozen_fwd(x2, w, w_t, transpose_w, compute_dtype, use_ffi):
  y = _frozen(x2, w, w_t, transpose_w, compute_dtype, use_ffi)
  # A zero-size array carries x's dtype (residuals must be arrays).
  return y, (w, w_t, jnp.zeros((0,), x2.dtype))


def _frozen_bwd(transpose_w, compute_dtype, use_ffi, residuals, dy):
  w, w_t, x_like = residuals
  # y = x @ W  ->  dx = dy @ W^T: the stored transpose if given, else the
  # same weight buffer read the other way.
  if w_t is not None:
    w, transpose_w = w_t, not transpose_w
  dx = matmul_2d(
    dy.astype(compute_dtype),
    w.astype(compute_dtype),
    transpose_w=not transpose_w,
    use_ffi=use_ffi,
  )
  # None: the frozen weight (and its transpose) get no gradient.
  return dx.astype(x_like.dtype), None, None


_frozen.defvjp(_frozen_fwd, _frozen_bwd)


def frozen_matmul(
  x,
  w,
  *,
  w_t=None,
  transpose_w: bool = False,
  compute_dtype=jnp.bfloat16,
  use_ffi: bool | None = None,
):
  """x [..., K] @ w [K, N] -> [..., N] float32, gradients into x only.

  Args:
    x: activations, any float dtype.
    w: the frozen weight [K, N], or [N, K] with `transpose_w` (a tied
      embedding used as the output head). Its cotangent is zero: never use
      this for a weight that trains.
    w_t: optional: the same weight stored transposed (w.T, contiguous),
      used by the backward dx = dy @ w^T. Without it the backward reads w
      transposed: oneDNN in place, `jnp.dot` on CPU through a row-major
      copy made per call (`row_major_transpose`; XLA's bf16 dot is slow on
      a transposed right operand).
    transpose_w: read `w` as its transpose.
    compute_dtype: the operands' dtype inside the matmul (bfloat16; float32
      runs oneDNN's f32 kernels). Pass `w` already in it to avoid a cast per
      call.
    use_ffi: None: the oneDNN custom call on CPU when available, else
      `jnp.dot`; False: always `jnp.dot`; True: fail if it is unavailable.
  """
  k = x.shape[-1]
  if (w.shape[1] if transpose_w else w.shape[0]) != k:
    raise ValueError(f"frozen_matmul: x {x.shape} and w {w.shape} mismatch")
  if w_t is not None and w_t.shape != w.shape[::-1]:
    raise ValueError(f"frozen_matmul: w_t {w_t.shape} is not w {w.shape}^T")
  y = _frozen(
    x.reshape(-1, k), w, w_t, transpose_w, jnp.dtype(compute_dtype), use_ffi
  )
  return y.reshape(*x.shape[:-1], y.shape[-1])
