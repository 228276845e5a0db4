r"""Command-line entry point: runs the phases of an ILM experiment.

  python -m ilm_jax.main --config=configs/ml1m.py:cpu --workdir=/tmp/ilm

Pick phases with `--config.phases=cf,qformer` (default: all). On a TPU pod
or several GPU hosts add `--multihost` (see launch/ and WORKSPACE.md).
Rerunning the same command resumes each phase from its latest checkpoint;
a SIGTERM checkpoints the step in training and exits with status 143.
"""

import logging as py_logging
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ilm_jax import allocator, experiment, train
from ilm_jax.data import files

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, e.g. configs/ml1m.py:cpu.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where checkpoints, logs, metrics and exports go."
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() first (one process per host).",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(py_logging.Filter):
  """Drops orbax's per-save INFO chatter; keeps its warnings and errors."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or (
      "orbax" not in record.pathname
    )


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for unknown config fields."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # The locked config rejects `--config.<path>=...` for a missing field
    # with a bare KeyError; name the flag it came from.
    overrides = [
      a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")
    ]
    missing = str(e).strip("\"'")
    culprit = next((o for o in overrides if missing in o.split(".")), None)
    message = f"Unknown config field {missing!r}"
    if culprit:
      message += f" in --{culprit}; see the config file for valid fields"
    raise SystemExit(f"FATAL: {message}.") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Once, before JAX starts: re-executes with mimalloc preloaded (glibc's
  # malloc page-faults through large buffers every step). Opt out:
  # ILM_JAX_ALLOCATOR=system.
  allocator.reexec_with_preload()
  if _MULTIHOST.value:
    jax.distributed.initialize()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietOrbax())
  logging.info(
    "JAX %s: process %d of %d, %d local / %d global devices.",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  try:
    experiment.run(_CONFIG.value, _WORKDIR.value)
  except files.USER_INPUT_ERRORS as e:
    # The message names the file (and line and field): one line, status 1.
    raise SystemExit(f"FATAL: {type(e).__name__}: {e}") from None
  except train.TrainingStopped as e:
    # Checkpointed: the same command resumes. 143 = killed by SIGTERM, as
    # schedulers expect of a process they asked to stop.
    print(f"STOPPED: {e}", file=sys.stderr)
    raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
