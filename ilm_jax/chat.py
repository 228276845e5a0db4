r"""Terminal chat with a trained ILM export.

  python -m ilm_jax.chat --workdir=workdir/ml1m_cpu

Type what you liked ("I loved The Matrix and Toy Story"), then refine
("something darker", "not that one", "more like the second one").
Commands: /reset (forget the conversation), /why N (the reason for item N
of the last list), /quit. Line editing and history come from readline.
"""

import sys

from absl import app, flags

from ilm_jax.serving import recommender
from ilm_jax.serving import session as session_lib
from ilm_jax.serving.terminal import HELP, respond

try:
  import readline  # noqa: F401  (input() gains line editing and history)
except ImportError:  # not on every platform
  pass

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir with an export.")
_K = flags.DEFINE_integer("k", 5, "Items per answer.")
_LLM = flags.DEFINE_string(
  "llm_checkpoint", None, "Override the LLM named in the export's config."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  print("Loading the model...", file=sys.stderr)
  try:
    model = recommender.Recommender.from_workdir(_WORKDIR.value, _LLM.value)
  except recommender.NoExportError as e:
    sys.exit(f"FATAL: {e}")
  print(f"Ready ({len(model.catalog)} items). {HELP}")
  session = session_lib.Session()
  while session is not None:
    try:
      line = input("you> ")
    except (EOFError, KeyboardInterrupt):
      print()
      break
    text, session = respond(model, session, line, _K.value)
    if text:
      print(text)


if __name__ == "__main__":
  app.run(main)
