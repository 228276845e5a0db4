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

HELP = "Commands: /reset, /why N, /quit."


def format_reply(reply: session_lib.Reply) -> str:
  """The answer as terminal lines: numbered items with their reasons."""
  if not reply.items:
    return reply.reply
  lines = [
    f"  {n}. {item.title}  ({item.score:.2f})\n     {item.reason}"
    for n, item in enumerate(reply.items, start=1)
  ]
  notes = [
    f'  (not in the catalogue: "{u["mention"]}")'
    for u in reply.unresolved
    if u["status"] == "unknown"
  ]
  return "\n".join(notes + lines)


def respond(model, session: session_lib.Session, line: str, k: int):
  """(text to print, session) for one input line; session None to quit."""
  line = line.strip()
  if not line:
    return "", session
  if line in ("/quit", "/exit"):
    return "Bye.", None
  if line == "/reset":
    return "Forgotten. What do you like?", session_lib.Session()
  if line.startswith("/why"):
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
      return "Usage: /why N", session
    n = int(parts[1])
    if not 1 <= n <= len(session.last):
      return f"No item {n} in the last list.", session
    item = session.last[n - 1]
    return f"{item.title}: {item.reason} ({item.reason_source})", session
  if line.startswith("/"):
    return HELP, session
  return format_reply(model.chat(session, line, k=k)), session


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
