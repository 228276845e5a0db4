"""Evaluator plugins: named in config, built from a registry, run on params.

A phase's config holds `evals`, a dict of name -> dict(type=..., split=...,
...). `from_config` looks each `type` up in the registry and builds the
evaluator with the config and the phase's context (dataset, model functions,
mesh). An evaluator's `run(params)` yields `(metric_name, value)` pairs; the
trainer prefixes them with the evaluator's split and writes
`WORKDIR/metrics/<phase>_<split>.json`. An evaluator that averages over
users also yields `(metric_writer.PER_USER, {"user_ids": int [n], name:
float [n], ...})`, the per-user values of its means, which the metrics file
keeps (with bootstrap intervals) for paired comparisons between rows.
"""

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import ml_collections


class Evaluator(Protocol):
  """What the trainer needs from an evaluator."""

  name: str
  split: str  # "valid" runs during training; every split runs at the end

  def run(self, params: Any) -> Iterator[tuple[str, Any]]: ...


_REGISTRY: dict[str, Callable[..., Evaluator]] = {}
# Modules under ilm_jax/evaluators/ that register plugins; imported on first
# use so that phases need not import them for their side effect.
PLUGIN_MODULES = (
  "ranking",
  "generative",
  "retrieval",
  "soft_tokens",
  "cf_signal",
)


def _import_plugins() -> None:
  for module in PLUGIN_MODULES:
    try:
      importlib.import_module(f"ilm_jax.evaluators.{module}")
    except ModuleNotFoundError as e:
      if e.name != f"ilm_jax.evaluators.{module}":
        raise


def register(type_name: str):
  """Class decorator adding an evaluator under `type_name`."""

  def decorator(cls):
    if type_name in _REGISTRY:
      raise ValueError(f"Evaluator type {type_name!r} registered twice.")
    _REGISTRY[type_name] = cls
    return cls

  return decorator


def from_config(
  evals_config: ml_collections.ConfigDict | Mapping, **context: Any
) -> list[Evaluator]:
  """Builds every evaluator listed in a phase's `evals` config.

  An entry with `enabled=False` is skipped (so one run can evaluate only
  some of them: `--config.ilm.evals.rank.enabled=False`).
  """
  _import_plugins()
  evaluators = []
  for name, cfg in evals_config.items():
    if not cfg.get("enabled", True):
      continue
    type_name = cfg["type"]
    if type_name not in _REGISTRY:
      raise ValueError(
        f"evals.{name}.type={type_name!r} is not a known evaluator; "
        f"registered: {sorted(_REGISTRY)}."
      )
    evaluators.append(_REGISTRY[type_name](name=name, config=cfg, **context))
  return evaluators
