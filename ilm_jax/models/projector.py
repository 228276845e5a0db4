"""Adapters from item representations into the LLM's embedding space.

`linear` is ILM's projector: one Dense layer applied to every Q-Former query
output. `mlp` is the CoLLM-style baseline: a two-layer MLP that maps one raw
CF vector to `num_tokens` soft tokens. Both start with small random weights:
all-zero soft tokens gave NaN gradients through the frozen LLM.
"""

import flax.linen as nn
import jax.numpy as jnp

_SMALL = nn.initializers.normal(stddev=0.02)


class LinearProjector(nn.Module):
  """[..., in_dim] -> [..., llm_dim], token by token."""

  llm_dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.llm_dim, kernel_init=_SMALL, name="dense")(x)


class MlpProjector(nn.Module):
  """[batch, cf_dim] -> [batch, num_tokens, llm_dim] (CoLLM-style)."""

  llm_dim: int
  num_tokens: int
  hidden_dim: int = 1024

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden_dim, kernel_init=_SMALL, name="hidden")(x))
    out = nn.Dense(
      self.num_tokens * self.llm_dim, kernel_init=_SMALL, name="out"
    )(h)
    return jnp.reshape(out, x.shape[:-1] + (self.num_tokens, self.llm_dim))
