r"""A bounded load test of a running `ilm_jax.serve` on loopback.

  python -m ilm_jax.serve --workdir=DIR --port=8000 &   # one process
  python -m benchmarks.serve_load --url=http://127.0.0.1:8000 \
    --requests=40 --clients=4                            # another process

Sends a fixed number of requests from a few concurrent clients (threads,
stdlib HTTP only), alternating POST /v1/recommend (a five-item history,
k=5) and POST /v1/chat (a new session naming two items), with histories
drawn from the catalogue by GET /v1/items. Prints p50/p95/max latency,
requests/s and the error count (any non-200 or failed request), plus the
machine's load average: other processes slow every figure down.
"""

import json
import os
import threading
import time
import urllib.request

import numpy as np
from absl import app, flags

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "Service URL.")
_REQUESTS = flags.DEFINE_integer("requests", 40, "Requests in total.")
_CLIENTS = flags.DEFINE_integer("clients", 4, "Concurrent clients.")
_QUERY = flags.DEFINE_string("query", "story", "Title search for histories.")


def _call(url, body=None, timeout=300):
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(
    url, data=data, headers={"Content-Type": "application/json"}
  )
  with urllib.request.urlopen(request, timeout=timeout) as response:
    return response.status, json.loads(response.read())


def _payload(n, titles):
  start = (7 * n) % max(len(titles) - 5, 1)
  history = titles[start : start + 5]
  if n % 2 == 0:
    return "/v1/recommend", dict(history=history, k=5)
  return "/v1/chat", dict(message=f"I loved {history[0]} and {history[1]}")


def main(argv):
  del argv
  base = _URL.value.rstrip("/")
  _, found = _call(f"{base}/v1/items?query={_QUERY.value}&limit=100")
  titles = [item["title"] for item in found["items"]]
  if len(titles) < 6:
    raise SystemExit(f"Need 6+ titles for {_QUERY.value!r}; got {titles}.")
  latencies, errors, lock = [], [], threading.Lock()
  counter = iter(range(_REQUESTS.value))

  def client():
    while True:
      with lock:
        n = next(counter, None)
      if n is None:
        return
      path, body = _payload(n, titles)
      start = time.perf_counter()
      try:
        status, reply = _call(base + path, body)
        ok = status == 200 and len(reply["items"]) > 0
      except Exception as e:  # noqa: BLE001  (every failure is counted)
        ok, reply = False, repr(e)
      with lock:
        latencies.append(time.perf_counter() - start)
        if not ok:
          errors.append((path, str(reply)[:200]))

  start = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(_CLIENTS.value)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  ms = np.array(latencies) * 1000
  print(
    f"requests {len(latencies)}  clients {_CLIENTS.value}  "
    f"errors {len(errors)}  wall {wall:.1f}s  "
    f"requests/s {len(latencies) / wall:.2f}"
  )
  print(
    f"latency ms: p50 {np.percentile(ms, 50):.0f}  "
    f"p95 {np.percentile(ms, 95):.0f}  max {ms.max():.0f}"
  )
  print(f"load average {os.getloadavg()}")
  for error in errors[:5]:
    print("error:", error)


if __name__ == "__main__":
  app.run(main)
