"""ilm_jax: the Item-Language Model (ILM) in JAX/Flax."""
