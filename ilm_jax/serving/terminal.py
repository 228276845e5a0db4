"""The terminal chat's turn logic, importable without the CLI's flags.

`respond(model, session, line, k)` handles one input line: a message to the
recommender, or a command (/reset, /why N, /quit). `ilm_jax/chat.py` wraps
it in a read-eval-print loop.
"""

from ilm_jax.serving import session as session_lib

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
