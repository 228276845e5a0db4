"""glibc malloc settings for CPU runs: large buffers come from the heap.

glibc serves every allocation above 32 MiB with a fresh `mmap` and unmaps
it on free, so on a CPU backend each step page-faults its big buffers in
again: the vocabulary logits, XLA's temporaries and the stacked per-layer
residuals of the LLM's backward pass. Turning mmap off (with a high trim
threshold and one arena) keeps freed memory in the heap for reuse; the
phase-2 training step is measurably faster (docs/results/llm.md).
Preloading tcmalloc has the same effect; then nothing is changed here.

The settings must be applied before JAX starts its backend: threads that
already have their own malloc arenas keep them.
"""

import ctypes
import os

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = (
  (M_MMAP_MAX, 0),  # never mmap: large chunks come from the heap
  (M_TRIM_THRESHOLD, 2**31 - 1),  # keep up to 2 GiB of free heap at the top
  (M_ARENA_MAX, 1),  # one heap, so freed chunks serve every thread
)


def keep_large_buffers_in_heap() -> str:
  """Applies SETTINGS unless another malloc is preloaded; says what it did."""
  preloaded = os.environ.get("LD_PRELOAD")
  if preloaded:
    return f"malloc: preloaded {preloaded}; glibc settings left alone"
  try:
    libc = ctypes.CDLL("libc.so.6")
    accepted = all(libc.mallopt(p, v) == 1 for p, v in SETTINGS)
  except (OSError, AttributeError):
    return "malloc: no glibc mallopt here; settings left alone"
  if not accepted:
    return "malloc: glibc refused a setting; partly applied"
  return "malloc: glibc keeps large buffers in the heap (no mmap, one arena)"
