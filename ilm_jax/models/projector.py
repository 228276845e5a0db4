"""Adapters from item representations into the LLM's embedding space.

`linear` is ILM's projector: one Dense layer applied to every Q-Former query
output (BLIP-2's fully connected layer). `per_query` (the configs' default)
gives each query its own Dense layer (ours, not the paper's): with one shared
layer, an item's query outputs, nearly equal already after phase 1, become
one soft token repeated (docs/results/ilm.md). `mlp` is the CoLLM-style
baseline: a two-layer MLP that maps one raw CF vector to `num_tokens` soft
tokens, one output block per token. All start with small random weights: all-zero soft tokens gave NaN
gradients through the frozen LLM.
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


class PerQueryProjector(nn.Module):
  """[..., num_queries, in_dim] -> [..., num_queries, llm_dim].

  Query t's output goes through its own affine map: kernel
  [num_queries, in_dim, llm_dim], bias [num_queries, llm_dim] (float32).

  Raises:
    ValueError: the input's second-to-last axis is not `num_queries`.
  """

  llm_dim: int
  num_queries: int

  @nn.compact
  def __call__(self, x):
    if x.shape[-2] != self.num_queries:
      raise ValueError(
        f"PerQueryProjector expects {self.num_queries} query outputs on "
        f"axis -2, got shape {x.shape}."
      )
    kernel = self.param(
      "kernel", _SMALL, (self.num_queries, x.shape[-1], self.llm_dim)
    )
    bias = self.param(
      "bias", nn.initializers.zeros, (self.num_queries, self.llm_dim)
    )
    return jnp.einsum("...ti,tid->...td", x, kernel) + bias


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
