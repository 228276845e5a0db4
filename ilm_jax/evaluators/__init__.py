"""ilm_jax.evaluators."""
