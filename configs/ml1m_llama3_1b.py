r"""ILM on MovieLens-1M with Llama 3.2 1B Instruct as the frozen LLM.

  python -m ilm_jax.main --config=configs/ml1m_llama3_1b.py \
    --workdir=/mnt/shared/ilm_llama3_1b

Same experiment as configs/ml1m.py (its sizes and modes after the colon)
with a 1B-class LLM. The weights are the Hugging Face directory
(config.json, *.safetensors, tokenizer.json) that the user brings, found at
`$ILM_LLM_DIR/llama-3.2-1b-instruct` (default ~/.cache/ilm_jax/llm/...);
override with `--config.ilm.llm.checkpoint=/path/to/dir`. The compile check
needs no weights:

  python -m ilm_jax.compile_check --config=configs/ml1m_llama3_1b.py \
    --topology=v5e-8

Mesh: the frozen 1B LLM (2.5 GB in bfloat16) fits every TPU chip's HBM, so
the default data-parallel mesh of configs/ml1m.py is kept.
"""

import ml_collections

from configs import common, ml1m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ML-1M's config at the size named by `arg`, with this LLM (every size)."""
  config = ml1m.get_config(arg)
  with common.locked(config):
    config.ilm.llm.update(
      checkpoint="llama-3.2-1b-instruct",
      dtype="bfloat16",  # compute
      param_dtype="bfloat16",  # frozen weights
      # Recompute LLM layers in the backward pass (llm.LlamaConfig.remat):
      # at batch 64 x 1024 tokens the saved activations need 43 GiB per v5e
      # chip otherwise (python -m ilm_jax.compile_check, docs/results/pod.md).
      remat=True,
    )
  return config
