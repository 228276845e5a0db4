"""One process of a (possibly multi-process) toy training run on CPU.

  python -m tests.multiprocess_toy PROCESS_ID NUM_PROCESSES PORT WORKDIR STEPS

Each process has the host devices XLA_FLAGS gives it; with more than one
process they join through `jax.distributed.initialize` on localhost and
exchange data with gloo CPU collectives.
"""

import sys

import jax

process_id, num_processes, port = map(int, sys.argv[1:4])
workdir, steps = sys.argv[4], int(sys.argv[5])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
  jax.distributed.initialize(
    f"localhost:{port}", num_processes=num_processes, process_id=process_id
  )

from tests import toy_task  # noqa: E402

if num_processes > 1:
  # Gloo gives a process 30 s to join the first collective; under load the
  # imports above alone can differ by more between the two processes, so
  # meet at a coordination-service barrier (no collective, 5 min) first.
  from jax._src import distributed  # noqa: E402

  distributed.global_state.client.wait_at_barrier("toy_imported", 300_000)

config = toy_task.config(steps=steps)
# A schedule that does not depend on the total steps, so runs of 10 and 15
# steps (and a 10-step run resumed to 15) share their first 10 steps.
config.toy.optim.schedule = "constant"
result = toy_task.run(config, workdir)
print(
  "done",
  jax.process_index(),
  jax.process_count(),
  jax.device_count(),
  result.step,
  flush=True,
)
