"""ilm_jax tests (run on CPU; see conftest.py for the 8-device setting)."""
