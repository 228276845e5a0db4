r"""ILM on MovieLens-1M with Llama 3.1 8B Instruct as the frozen LLM.

  python -m ilm_jax.main --config=configs/ml1m_llama3_8b.py \
    --workdir=/mnt/shared/ilm_llama3_8b

Same experiment as configs/ml1m.py (its sizes and modes after the colon)
with an 8B-class LLM. The weights are the Hugging Face directory
(config.json, *.safetensors, tokenizer.json) that the user brings, found at
`$ILM_LLM_DIR/llama-3.1-8b-instruct` (default ~/.cache/ilm_jax/llm/...);
override with `--config.ilm.llm.checkpoint=/path/to/dir`. The compile check
needs no weights:

  python -m ilm_jax.compile_check --config=configs/ml1m_llama3_8b.py \
    --topology=v5e-64

Mesh: the frozen LLM is 16 GB in bfloat16, as much as a v5e chip's HBM, so
every parameter is split over all devices (FSDP, `fsdp=-1`); the batch is
split over the same axis.
"""

import ml_collections

from configs import common, ml1m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ML-1M's config at the size named by `arg`, with this LLM (every size)."""
  config = ml1m.get_config(arg)
  with common.locked(config):
    config.ilm.llm.update(
      checkpoint="llama-3.1-8b-instruct",
      dtype="bfloat16",  # compute
      param_dtype="bfloat16",  # frozen weights
      # Recompute LLM layers in the backward pass (llm.LlamaConfig.remat):
      # at batch 64 x 1024 tokens the saved activations need 43 GiB per v5e
      # chip otherwise (python -m ilm_jax.compile_check, docs/results/pod.md).
      remat=True,
    )
    config.mesh.shape.update(data=1, fsdp=-1)
  return config
