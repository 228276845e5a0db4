"""The HTTP service: a FastAPI app over one `Recommender`.

Endpoints (JSON unless noted):
  POST /v1/recommend          {"history": [titles or item ids], "k": int}
                              -> {"items": [...], "history": [...]}
  POST /v1/chat               {"message": str, "session_id": str?}
                              -> {"session_id", "reply", "items",
                                  "resolved", "unresolved"}
  POST /v1/chat/completions   OpenAI-style; the user messages are replayed
                              into a fresh session, the last one answered
  GET  /v1/items?query=       title search -> {"items": [...]}
  GET  /healthz               {"status": "ok", "items": N, ...}
  GET  /                      the chat page (HTML)
Items are {"item_id", "title", "score", "reason", "reason_source"}.
Invalid requests get 4xx with {"detail": message}. The model is shared:
its calls hold the recommender's lock; each session has its own lock.
"""

import collections
import importlib.resources
import threading
import time
import uuid

import fastapi
import pydantic
from fastapi import responses

from ilm_jax.serving import recommender as recommender_lib
from ilm_jax.serving import session as session_lib

MAX_MESSAGE_CHARS = 2000
MAX_HISTORY = 200
MAX_SESSIONS = 10_000  # least recently used sessions are forgotten


class RecommendRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  history: list[str | int] = pydantic.Field(max_length=MAX_HISTORY)
  k: int = pydantic.Field(10, ge=1, le=recommender_lib.MAX_K)
  user_id: str | None = None
  exclude: list[str | int] = pydantic.Field(
    default_factory=list, max_length=MAX_HISTORY
  )
  reasons: bool = True


class ChatRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  message: str = pydantic.Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
  session_id: str | None = pydantic.Field(None, max_length=64)
  k: int = pydantic.Field(5, ge=1, le=recommender_lib.MAX_K)


class CompletionMessage(pydantic.BaseModel):
  role: str
  content: str = pydantic.Field(max_length=MAX_MESSAGE_CHARS)


class CompletionRequest(pydantic.BaseModel):
  model: str = "ilm"
  messages: list[CompletionMessage] = pydantic.Field(
    min_length=1, max_length=100
  )
  stream: bool = False


class _Sessions:
  """Sessions by id, least recently used forgotten past a cap."""

  def __init__(self, cap: int):
    self.cap = cap
    self._items = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._items)

  def get_or_create(self, session_id):
    with self._lock:
      if session_id is None:
        session = session_lib.Session()
        self._items[session.id] = (session, threading.Lock())
        session_id = session.id
      elif session_id not in self._items:
        return None
      self._items.move_to_end(session_id)
      while len(self._items) > self.cap:
        self._items.popitem(last=False)
      return self._items[session_id]


def _bad_request(status: int, message: str) -> fastapi.HTTPException:
  return fastapi.HTTPException(status_code=status, detail=message)


def _usage(recommender, said, content) -> dict:
  """OpenAI's token counts, in the LLM's tokens (0 without a tokenizer)."""
  tokenizer = getattr(recommender, "tokenizer", None)

  def count(text):
    return (
      len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else 0
    )

  prompt = sum(count(m) for m in said)
  completion = count(content)
  return dict(
    prompt_tokens=prompt,
    completion_tokens=completion,
    total_tokens=prompt + completion,
  )


def _page() -> str:
  files = importlib.resources.files("ilm_jax.serving")
  return (files / "static" / "index.html").read_text()


def create_app(recommender, max_sessions: int = MAX_SESSIONS):
  """The FastAPI app serving `recommender` (loaded once, by the caller).

  Args:
    recommender: a `recommender.Recommender` (tests may pass a stand-in
      with `catalog`, `recommend`, `describe` and `chat`).
    max_sessions: sessions kept in memory.
  """
  app = fastapi.FastAPI(
    title="ILM recommender",
    description="Conversational recommendation over a trained ILM export.",
  )
  sessions = _Sessions(max_sessions)
  catalog = recommender.catalog
  page = _page()
  started = time.time()

  def resolve_all(entries, what):
    rows, problems = [], []
    for entry in entries:
      try:
        # Numbers are raw item ids (ML-1M's are numeric), not rows.
        rows.append(recommender.item_index(str(entry)))
      except recommender_lib.UnknownItemError as e:
        problems.append(str(e))
    if problems:
      raise _bad_request(422, f"Unknown {what}: " + " ".join(problems))
    return rows

  @app.get("/healthz")
  def healthz():
    return dict(
      status="ok",
      items=len(catalog),
      sessions=len(sessions),
      uptime_s=round(time.time() - started, 1),
    )

  @app.get("/", response_class=responses.HTMLResponse)
  def index():
    return page

  @app.get("/v1/items")
  def items(
    query: str = fastapi.Query(..., max_length=200),
    limit: int = fastapi.Query(10, ge=1, le=100),
  ):
    if not query.strip():
      raise _bad_request(422, "query must not be empty.")
    found = catalog.search(query, limit=limit)
    return dict(
      items=[
        dict(
          item_id=catalog.item_ids[i],
          title=catalog.titles[i],
          score=score,
          genres=catalog.genres(i),
          year=catalog.years[i],
        )
        for i, score in found
      ]
    )

  @app.post("/v1/recommend")
  def recommend(request: RecommendRequest):
    history = resolve_all(request.history, "history items")
    exclude = resolve_all(request.exclude, "excluded items")
    try:
      found = recommender.recommend(
        history,
        k=request.k,
        user=request.user_id,
        exclude=exclude,
        reasons=request.reasons,
      )
    except recommender_lib.UnknownItemError as e:
      raise _bad_request(422, str(e)) from e
    return dict(
      items=[r.to_json() for r in found],
      history=[
        dict(item_id=catalog.item_ids[i], title=catalog.titles[i])
        for i in history
      ],
    )

  @app.post("/v1/chat")
  def chat(request: ChatRequest):
    if not request.message.strip():
      raise _bad_request(422, "message must not be empty.")
    entry = sessions.get_or_create(request.session_id)
    if entry is None:
      raise _bad_request(
        404,
        f"Unknown session_id {request.session_id!r} (expired or never "
        "created); omit it to start a new session.",
      )
    session, lock = entry
    with lock:
      return recommender.chat(session, request.message, k=request.k).to_json()

  @app.post("/v1/chat/completions")
  def completions(request: CompletionRequest):
    if request.stream:
      raise _bad_request(400, "stream=true is not supported.")
    said = [m.content for m in request.messages if m.role == "user"]
    if not said or not said[-1].strip():
      raise _bad_request(422, "The last user message must not be empty.")
    session = session_lib.Session()
    # Earlier turns only set what the user likes; the last one is answered.
    for message in said[:-1]:
      if message.strip():
        session_lib.apply_preferences(session, message, catalog)
    reply = recommender.chat(session, said[-1])
    content = reply.reply
    return dict(
      id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
      object="chat.completion",
      created=int(time.time()),
      model=request.model,
      choices=[
        dict(
          index=0,
          message=dict(role="assistant", content=content),
          finish_reason="stop",
        )
      ],
      usage=_usage(recommender, said, content),
      items=[r.to_json() for r in reply.items],
    )

  return app
