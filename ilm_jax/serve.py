r"""HTTP service over a trained ILM export (FastAPI + uvicorn).

  python -m ilm_jax.serve --workdir=workdir/ml1m_cpu --port=8000

Loads `WORKDIR/export` and the frozen LLM once, compiles the decoders, then
serves the JSON API and the chat page at / (see ilm_jax/serving/app.py).
"""

import sys

import uvicorn
from absl import app, flags, logging

from ilm_jax.serving import app as app_lib
from ilm_jax.serving import recommender

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir with an export.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
_LLM = flags.DEFINE_string(
  "llm_checkpoint", None, "Override the LLM named in the export's config."
)
_WARMUP = flags.DEFINE_bool(
  "warmup", True, "Compile the decoders before accepting requests."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  try:
    model = recommender.Recommender.from_workdir(
      _WORKDIR.value, _LLM.value, warmup=_WARMUP.value
    )
  except recommender.NoExportError as e:
    sys.exit(f"FATAL: {e}")
  logging.info("Serving on http://%s:%d/", _HOST.value, _PORT.value)
  uvicorn.run(
    app_lib.create_app(model),
    host=_HOST.value,
    port=_PORT.value,
    log_level="warning",
  )


if __name__ == "__main__":
  app.run(main)
