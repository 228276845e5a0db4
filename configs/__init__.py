"""Experiment configs: each `<name>.py` has `get_config(arg=None)`."""
