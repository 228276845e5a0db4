r"""Phase-2 input pipeline: training prompts built per second on the host.

  python -m benchmarks.ilm_input_pipeline --config=configs/ml1m.py:gpu \
    --workdir=/tmp/ilm_ml1m --config.cf.tables=sasrec \
    --config.qformer.variant=sasrec

Needs a workdir where the cf phase ran (phase 2 reads its CF tables to
check them against the dataset). On an accelerator the trainer waits for
the host to build each batch (sample a request, render the chat template,
tokenize, lay out soft-token slots): if the host builds fewer batches a
second than the device runs steps, the host sets the pace. On one H200 the
bf16 SmolLM2 step at batch 64 took 47.5 ms (`benchmarks.gpu_check`, 21
steps/s) while the phase-2 loop ran 4-5 steps/s (docs/results/ilm.md).

Back to back in this one process, on the same example numbers, it times

  before  each prompt compiles the chat template (what LlmTokenizer did
          until the template was compiled once per source);
  after   the code as it is;

each as ms per prompt over --batches batches of the config's batch size
(`examples.gather`, no threads), and then the training iterator itself
(grain, its prefetch threads) in batches/s. The last line printed is one
JSON object of these figures. Other processes slow every figure down, so
compare figures of one run only.
"""

import json
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ilm_jax.models import llm_tokenizer
from ilm_jax.phases import ilm_training as ilm_phase

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/ml1m.py:gpu", "Experiment config."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "A workdir with the cf phase outputs.", required=True
)
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per variant.")


def _ms_per_prompt(examples, batch_size: int, batches: int) -> float:
  examples.gather(np.arange(batch_size))  # warm caches (untimed)
  start = time.perf_counter()
  for b in range(batches):
    examples.gather(np.arange(b * batch_size, (b + 1) * batch_size))
  return (time.perf_counter() - start) / (batches * batch_size) * 1e3


def main(argv):
  del argv
  config = _CONFIG.value
  batch_size = config.ilm.train.batch_size
  phase2 = ilm_phase.make_task(config, _WORKDIR.value)
  # One untimed pass first, so both variants meet the tokenizer's caches
  # equally warm.
  _ms_per_prompt(phase2.examples, batch_size, _BATCHES.value)
  compiled = llm_tokenizer._compiled_chat_template
  try:  # before: compile the template for every prompt
    llm_tokenizer._compiled_chat_template = compiled.__wrapped__
    before = _ms_per_prompt(phase2.examples, batch_size, _BATCHES.value)
  finally:
    llm_tokenizer._compiled_chat_template = compiled
  after = _ms_per_prompt(phase2.examples, batch_size, _BATCHES.value)
  iterator = phase2.task.train_iterator
  next(iterator)  # starts the prefetch threads (untimed)
  start = time.perf_counter()
  for _ in range(_BATCHES.value * 5):
    next(iterator)
  iterator_batches_s = _BATCHES.value * 5 / (time.perf_counter() - start)
  summary = dict(
    batch_size=batch_size,
    before_ms_per_prompt=round(before, 3),
    after_ms_per_prompt=round(after, 3),
    speedup=round(before / after, 2),
    before_batches_s=round(1e3 / (before * batch_size), 2),
    after_batches_s=round(1e3 / (after * batch_size), 2),
    iterator_batches_s=round(iterator_batches_s, 2),
    iterator_prompts_s=round(iterator_batches_s * batch_size, 1),
    load_average=[round(x, 2) for x in os.getloadavg()],
  )
  for key, value in summary.items():
    print(f"{key:>22}  {value}")
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
