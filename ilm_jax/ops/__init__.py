"""Custom operations (XLA FFI custom calls) with pure-jnp fallbacks."""
