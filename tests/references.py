"""Independent reference implementations shared by the parity tests.

Each function runs the PyTorch model from transformers on the same pinned
checkpoint our Flax code loads, so a test compares against code we did not
write. torch and transformers are test-only dependencies; a test calling
these is skipped where they are missing.
"""

import numpy as np
import pytest

from ilm_jax.models import bert


def minilm_sentence_embeddings(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """transformers' BertModel on the pinned MiniLM, mean-pooled, unit norm.

  The pooling is sentence-transformers' (masked mean, then L2 normalise),
  written out here rather than taken from `bert.mean_pool`.

  Args:
    ids: [batch, length] int token ids (our WordPiece tokenizer's).
    mask: [batch, length] 0/1 attention mask.

  Returns:
    [batch, 384] float32 embeddings.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory = str(bert.minilm_files()["config.json"].parent)
  reference = transformers.BertModel.from_pretrained(directory).eval()
  with torch.no_grad():
    out = reference(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
    )
  states, weights = out.last_hidden_state.numpy(), np.asarray(mask)[..., None]
  pooled = (states * weights).sum(1) / weights.sum(1)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
