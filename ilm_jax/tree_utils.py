"""Parameter-tree helpers: '/'-joined paths, regex masks, counts, norms."""

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def path_str(path) -> str:
  """'/'-joined names of a jax tree path (dict keys, attributes, indices)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def unbox(tree: Any) -> Any:
  """Strips flax partitioning boxes, leaving the raw values."""
  return nn.meta.unbox(tree)


def regex_mask(tree: Any, patterns: Sequence[str]) -> Any:
  """True for leaves whose path fully matches any of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
    lambda path, _: any(c.fullmatch(path_str(path)) for c in compiled), tree
  )


def leaf_paths(tree: Any) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def count_params(tree: Any, mask: Any | None = None) -> int:
  """Number of scalars in `tree` (only where `mask` is True, if given)."""
  sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), tree)
  if mask is not None:
    sizes = jax.tree.map(lambda s, m: s if m else 0, sizes, mask)
  return int(sum(jax.tree.leaves(sizes)))


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves, computed in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(
    sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
  )


def select(tree: Any, mask: Any, keep: bool) -> Any:
  """Leaves where mask == keep; the others become None (pruned subtrees)."""
  return jax.tree.map(lambda x, m: x if m == keep else None, tree, mask)


def merge(first: Any, second: Any) -> Any:
  """Combines two `select` halves of one tree back into the full tree."""
  return jax.tree.map(
    lambda a, b: b if a is None else a,
    first,
    second,
    is_leaf=lambda x: x is None,
  )
