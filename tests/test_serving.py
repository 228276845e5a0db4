"""The recommender, the HTTP API and the chat page on the tiny export.

The tiny config's full run (synthetic catalogue "Action Story 0" ..
"Horror Story 39", ten per genre, the real SmolLM2) is built once per module with the
end-to-end test's helper; set ILM_JAX_TINY_WORKDIR to a finished tiny
workdir to reuse one instead. The chat page is driven by Debian's chromium
(playwright, never its own browser download) against a real uvicorn
server on loopback; the test writes a screenshot.
"""

import os
import pathlib
import shutil
import socket
import threading
import time

import pytest

from ilm_jax.serving import app as app_lib
from ilm_jax.serving import recommender as recommender_lib
from ilm_jax.serving import session as session_lib
from tests import test_end_to_end

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
]
K = 5  # one beam shape for every call: each new shape compiles for ~20 s


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  given = os.environ.get("ILM_JAX_TINY_WORKDIR")
  if given and (pathlib.Path(given) / "export" / "config.json").exists():
    return pathlib.Path(given)
  path = tmp_path_factory.mktemp("serving")
  test_end_to_end._main(path, "--config.phases=cf,qformer,ilm,export")
  return path


@pytest.fixture(scope="module")
def model(workdir):
  return recommender_lib.Recommender.from_workdir(workdir, warmup=False)


@pytest.fixture(scope="module")
def client(model):
  from fastapi import testclient  # noqa: PLC0415

  return testclient.TestClient(app_lib.create_app(model))


def _titles(model, items):
  return [model.catalog.titles[i.item] for i in items]


def test_missing_export_names_the_path_and_the_command(tmp_path):
  with pytest.raises(recommender_lib.NoExportError) as error:
    recommender_lib.Recommender.from_workdir(tmp_path)
  message = str(error.value)
  assert str(tmp_path / "export") in message
  assert "python -m ilm_jax.main" in message


def test_recommend_returns_ranked_catalogue_items_outside_the_history(model):
  history = ["Action Story 1", "item_2", "action story 3", 4, "Action Stroy 5"]
  items = model.recommend(history, k=K)
  assert len(items) == K
  rows = [i.item for i in items]
  assert not set(rows) & {1, 2, 3, 4, 5}
  assert len(set(rows)) == K
  for item in items:
    assert model.catalog.titles[item.item] == item.title
    assert model.catalog.item_ids[item.item] == item.item_id
  scores = [i.score for i in items]
  assert scores == sorted(scores, reverse=True) and scores[0] < 0
  # Excluding the top item removes only it: the others keep their scores
  # (the masked trie changes which titles exist, not their log-probs).
  fewer = model.recommend(history, k=K, exclude=[items[0].item_id])
  assert items[0].item not in [i.item for i in fewer]
  before = {i.item: i.score for i in items}
  for item in fewer:
    if item.item in before:
      assert item.score == pytest.approx(before[item.item], abs=1e-3)
  # A filter admits only its items.
  allowed = list(range(30, 40))
  assert {i.item for i in model.recommend([1], k=K, allowed=allowed)} <= set(
    allowed
  )
  with pytest.raises(ValueError, match="k=0"):
    model.recommend([1], k=0)
  with pytest.raises(recommender_lib.UnknownItemError, match="not in the"):
    model.recommend(["Citizen Kane"], k=K)


def test_batched_recommendations_match_single_calls(model):
  histories = [[1, 2, 3], [11, 12], [21, 22, 23, 24]]
  batched = model.recommend_batch(histories, k=K, batch_size=4)
  assert [len(b) for b in batched] == [K, K, K]
  for history, ranked in zip(histories, batched, strict=True):
    assert not {r.item for r in ranked} & set(history)
    single = model.recommend(history, k=K)
    # Same prompt, same log-probs: the common items score the same.
    common = {i.item: i.score for i in single}
    for r in ranked:
      if r.item in common:
        assert r.score == pytest.approx(common[r.item], abs=1e-3)


def test_describe_generates_text(model):
  text = model.describe("Action Story 0")
  assert isinstance(text, str) and text


def test_chat_remembers_likes_dislikes_and_what_was_shown(model):
  session = session_lib.Session()
  first = model.chat(session, "I loved Action Story 1 and comedy story 11")
  assert [r["title"] for r in first.resolved] == [
    "Action Story 1",
    "Comedy Story 11",
  ]
  assert session.liked == [1, 11]
  assert len(first.items) == K and first.unresolved == []
  for item in first.items:
    assert item.item not in (1, 11)
    assert item.reason and item.reason_source in ("model", "metadata")
  shown = [i.item for i in first.items]
  # "not that one": the top item becomes disliked, nothing shown repeats.
  second = model.chat(session, "not that one")
  assert session.disliked == [shown[0]]
  assert not {i.item for i in second.items} & set(shown + [1, 11])
  # "more like the second one" likes item 2 of the last list.
  liked_next = second.items[1].item
  third = model.chat(session, "more like the second one")
  assert session.liked == [1, 11, liked_next]
  seen = set(session.shown) - {i.item for i in third.items}
  assert not {i.item for i in third.items} & (seen | set(session.liked))
  # "something darker": every item is dark (Horror or "dark" in text).
  fourth = model.chat(session, "something darker")
  assert fourth.items
  for item in fourth.items:
    genres = set(model.catalog.genres(item.item))
    text = model.catalog.attribute(item.item, "description")
    assert "Horror" in genres or "dark" in text, item.title


def test_chat_asks_which_one_and_reports_unknown_titles(model):
  session = session_lib.Session()
  reply = model.chat(session, "I liked Citizen Kane")
  assert reply.items == [] and session.liked == []
  assert reply.unresolved == [
    dict(mention="Citizen Kane", status="unknown", candidates=[])
  ]
  assert "Citizen Kane" in reply.reply
  # "horror story" is a word-subset of the ten Horror titles (30..39): a
  # question listing the first eight candidates, no guess.
  reply = model.chat(session, "I liked horror story")
  assert reply.items == [] and session.liked == []
  (question,) = reply.unresolved
  assert question["status"] == "ambiguous"
  titles = [c["title"] for c in question["candidates"]]
  assert len(titles) == 8 and all(t.startswith("Horror Story") for t in titles)
  assert "1. " + titles[0] in reply.reply
  # The answer "2" picks the second candidate and recommends.
  reply = model.chat(session, "2")
  assert [r["title"] for r in reply.resolved] == [titles[1]]
  assert session.liked == [model.catalog.titles.index(titles[1])]
  assert len(reply.items) == K


def test_terminal_chat_commands(model):
  from ilm_jax.serving import terminal as chat  # noqa: PLC0415

  session = session_lib.Session()
  text, session = chat.respond(model, session, "I liked Drama Story 25", K)
  assert "1. " in text and len(session.last) == K
  why, _ = chat.respond(model, session, "/why 2", K)
  assert why.startswith(session.last[1].title)
  assert chat.respond(model, session, "/why 9", K)[0] == (
    "No item 9 in the last list."
  )
  _, fresh = chat.respond(model, session, "/reset", K)
  assert fresh.liked == [] and fresh is not session
  assert chat.respond(model, fresh, "/quit", K)[1] is None


def test_health_items_and_page(client):
  health = client.get("/healthz").json()
  assert health["status"] == "ok" and health["items"] == 40
  found = client.get("/v1/items", params=dict(query="drama story 22")).json()
  assert found["items"][0]["title"] == "Drama Story 22"
  assert found["items"][0]["genres"] == ["Drama"]
  assert client.get("/v1/items", params=dict(query=" ")).status_code == 422
  assert client.get("/v1/items").status_code == 422
  page = client.get("/")
  assert page.status_code == 200 and '<form id="chat">' in page.text


def test_recommend_endpoint_contract_and_errors(client, model):
  response = client.post(
    "/v1/recommend", json=dict(history=["Action Story 1", "item_2"], k=K)
  )
  assert response.status_code == 200, response.text
  body = response.json()
  assert [h["title"] for h in body["history"]] == [
    "Action Story 1",
    "Action Story 2",
  ]
  assert len(body["items"]) == K
  for item in body["items"]:
    assert set(item) >= {"item_id", "title", "score", "reason"}
    assert item["title"] in model.catalog.titles
    assert item["item_id"] not in ("item_1", "item_2")
  for bad, fragment in (
    (dict(history=["Citizen Kane"], k=K), "not in the catalogue"),
    (dict(history=["Story"], k=K), "ambiguous"),
    (dict(history=["item_999"], k=K), "item_999"),
    (dict(history=[1], k=0), "greater than or equal to 1"),
    (dict(history=[1], k=K, colour="red"), "Extra inputs"),
    (dict(history=["item_1"] * 201, k=K), "at most 200"),
  ):
    response = client.post("/v1/recommend", json=bad)
    assert response.status_code == 422, bad
    assert fragment in response.text, response.text


def test_chat_endpoint_sessions_and_errors(client):
  first = client.post("/v1/chat", json=dict(message="I liked Drama Story 21"))
  assert first.status_code == 200, first.text
  body = first.json()
  assert set(body) >= {"session_id", "reply", "items", "resolved", "unresolved"}
  assert body["resolved"][0]["title"] == "Drama Story 21"
  shown = {i["item_id"] for i in body["items"]}
  second = client.post(
    "/v1/chat",
    json=dict(message="not that one", session_id=body["session_id"]),
  ).json()
  assert second["session_id"] == body["session_id"]
  assert not {i["item_id"] for i in second["items"]} & shown
  for bad, status in (
    (dict(message=""), 422),
    (dict(message="   "), 422),
    (dict(message="x" * 2001), 422),
    (dict(), 422),
    (dict(message="hi", session_id="nope"), 404),
  ):
    response = client.post("/v1/chat", json=bad)
    assert response.status_code == status, (bad, response.text)
    assert response.json()["detail"]


def test_openai_style_chat_completions(client):
  response = client.post(
    "/v1/chat/completions",
    json=dict(
      model="ilm",
      messages=[
        dict(role="system", content="You recommend movies."),
        dict(role="user", content="I loved Horror Story 33"),
        dict(role="assistant", content="..."),
        dict(role="user", content="and Horror Story 34, more please"),
      ],
    ),
  )
  assert response.status_code == 200, response.text
  body = response.json()
  assert body["object"] == "chat.completion"
  message = body["choices"][0]["message"]
  assert message["role"] == "assistant"
  assert "Horror Story 33" in message["content"]  # the replayed like
  assert len(body["items"]) == K
  assert body["usage"]["total_tokens"] > 0
  bad = dict(messages=[dict(role="user", content="hi")], stream=True)
  assert client.post("/v1/chat/completions", json=bad).status_code == 400
  bad = dict(messages=[dict(role="system", content="hi")])
  assert client.post("/v1/chat/completions", json=bad).status_code == 422


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_chat_page_in_a_headless_browser(model, tmp_path):
  if not pathlib.Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
  import uvicorn  # noqa: PLC0415
  from playwright import sync_api  # noqa: PLC0415

  port = _free_port()
  server = uvicorn.Server(
    uvicorn.Config(
      app_lib.create_app(model), host="127.0.0.1", port=port, log_level="error"
    )
  )
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started and time.time() < deadline:
    time.sleep(0.1)
  assert server.started
  try:
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
      page = browser.new_page(viewport=dict(width=900, height=700))
      page.goto(f"http://127.0.0.1:{port}/")
      page.fill("#message", "I loved Action Story 1 and Action Story 2")
      page.click("#send")
      page.wait_for_selector("li.item", timeout=120_000)
      titles = page.locator("li.item .title").all_inner_texts()
      reasons = page.locator("li.item .reason").all_inner_texts()
      screenshot = tmp_path / "serving_chat.png"
      page.screenshot(path=str(screenshot), full_page=True)
      browser.close()
  finally:
    server.should_exit = True
    thread.join(timeout=30)
  assert len(titles) == K
  assert set(titles) <= set(model.catalog.titles)
  assert not {"Action Story 1", "Action Story 2"} & set(titles)
  assert all(r.strip(" -") for r in reasons)
  assert screenshot.stat().st_size > 10_000
  # PNG signature: a real image was written.
  assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  target = os.environ.get("ILM_JAX_SCREENSHOT")
  if target:
    shutil.copy(screenshot, target)
