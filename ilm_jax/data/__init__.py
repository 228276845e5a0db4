"""ilm_jax.data."""
