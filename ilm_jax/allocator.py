"""A faster malloc for CPU runs, with only what `pip install` brings.

glibc's malloc serves every allocation above 32 MiB with a fresh `mmap` and
returns it with `munmap`, so each training step page-faults through its
large buffers again (the vocabulary logits, the LLM's stacked per-layer
residuals): see docs/results/llm.md and docs/results/cpu_runtime.md. An
allocator that keeps freed memory mapped removes that cost, but it has to be
in place before the process allocates anything, i.e. through `LD_PRELOAD`.

`reexec_with_preload()` does that from inside Python: called first thing in
an entry point, it re-executes the same command line once (same
interpreter, same arguments) with `LD_PRELOAD` naming the allocator library
that the `cmeel-mimalloc` wheel installs. Environment:

  ILM_JAX_ALLOCATOR   "mimalloc" (default), "system" (opt out: keep glibc),
                      or the path of another malloc library (tcmalloc ...)
  ILM_JAX_ALLOCATOR_REEXEC
                      set in the re-executed process; while it is set no
                      further re-exec happens, so there is never a loop

A missing library, a platform other than Linux, or an allocator already in
`LD_PRELOAD` leave the process as it is, with one log line saying why.
"""

import importlib.metadata
import os
import pathlib
import sys

from absl import logging

ENV = "ILM_JAX_ALLOCATOR"
GUARD = "ILM_JAX_ALLOCATOR_REEXEC"
# mimalloc options for the re-executed process (its own environment wins).
# mimalloc returns freed memory to the OS 10 ms after it is freed by
# default; a training step lasts seconds, so its large buffers would be
# faulted in again each step. -1: never purge (tcmalloc-like; the process
# keeps its peak footprint, as it would need it again next step anyway).
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}


def mimalloc_library() -> pathlib.Path | None:
  """libmimalloc.so.3 from the cmeel-mimalloc wheel, or None."""
  try:
    files = importlib.metadata.distribution("cmeel-mimalloc").files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.name == "libmimalloc.so.3":
      path = pathlib.Path(f.locate()).resolve()
      if path.is_file():
        return path
  return None


def loaded_allocator() -> str:
  """The malloc library mapped into this process, or 'glibc malloc'."""
  try:
    maps = pathlib.Path("/proc/self/maps").read_text()
  except OSError:
    return "unknown"
  for name in ("mimalloc", "tcmalloc", "jemalloc"):
    for line in maps.splitlines():
      if f"lib{name}" in line:
        return line.split()[-1]
  return "glibc malloc"


def _choice() -> tuple[str, pathlib.Path | None]:
  choice = os.environ.get(ENV, "mimalloc").strip() or "mimalloc"
  if choice in ("system", "glibc", "none", "0"):
    return choice, None
  if choice == "mimalloc":
    return choice, mimalloc_library()
  return "path", pathlib.Path(choice)


def reexec_with_preload() -> str:
  """Re-executes this process once with the allocator preloaded.

  Returns (only when it does not re-execute) a short description of the
  allocator in use, also logged. Call it before the process does real work:
  everything done before it is done twice.
  """
  choice, library = _choice()
  if os.environ.get(GUARD):
    state = loaded_allocator()
    if library is not None and str(library) not in state:
      logging.warning(
        "allocator: re-executed with %s preloaded but %s is mapped; "
        "not trying again",
        library,
        state,
      )
    else:
      logging.info("allocator: %s (preloaded)", state)
    return state
  if library is None:
    if choice == "mimalloc":
      logging.warning(
        "allocator: glibc malloc (cmeel-mimalloc is not installed: "
        "`pip install cmeel-mimalloc`; large buffers page-fault every step)"
      )
    else:
      logging.info("allocator: glibc malloc (%s=%s)", ENV, choice)
    return "glibc malloc"
  if not library.is_file():
    logging.warning(
      "allocator: glibc malloc (%s=%s: no such file)", ENV, library
    )
    return "glibc malloc"
  if sys.platform != "linux":
    logging.info("allocator: system malloc (LD_PRELOAD is Linux-only here)")
    return "system malloc"
  preloaded = os.environ.get("LD_PRELOAD", "")
  if any(n in preloaded for n in ("malloc", str(library))):
    logging.info("allocator: %s (LD_PRELOAD set by the caller)", preloaded)
    return preloaded
  env = dict(os.environ)
  env["LD_PRELOAD"] = ":".join(p for p in (str(library), preloaded) if p)
  env[GUARD] = "1"
  if "mimalloc" in library.name:
    for key, value in MIMALLOC_ENV.items():
      env.setdefault(key, value)
  argv = [sys.executable, *sys.orig_argv[1:]]
  logging.info(
    "allocator: re-executing with LD_PRELOAD=%s (opt out: %s=system)",
    library,
    ENV,
  )
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
  raise AssertionError("unreachable")  # execve does not return
