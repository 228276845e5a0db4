"""ilm_jax.models."""
