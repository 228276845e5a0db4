"""Checks config values before any work starts.

Unknown fields are already rejected by the locked ConfigDict
(`--config.cf.optim.lr=...` on a config without `lr` fails with the key
name). This module checks the values: each error names the dotted field, the
value and the allowed range (or the field it must equal), and all errors are
reported at once.
"""

import math
import re
from collections.abc import Callable

import ml_collections

from ilm_jax import optim
from ilm_jax.models import llm_loading

PHASES = ("cf", "qformer", "ilm", "eval", "export")


class ConfigError(ValueError):
  """One or more config values are out of their allowed range."""


def _int_at_least(low: int) -> tuple[Callable, str]:
  return (
    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low
  ), f"an integer >= {low}"


def _positive_float() -> tuple[Callable, str]:
  return (
    lambda v: isinstance(v, int | float) and math.isfinite(v) and v > 0
  ), "a finite number > 0"


def _name() -> tuple[Callable, str]:
  # Variant names become directory and metrics-file names.
  return (
    lambda v: isinstance(v, str) and re.fullmatch(r"[a-z0-9_]*", v)
  ), "lowercase letters, digits and _ (or empty)"


def _float_in(low: float, high: float) -> tuple[Callable, str]:
  return (
    lambda v: isinstance(v, int | float) and low <= v <= high,
    f"a number in [{low}, {high}]",
  )


def _one_of(*allowed) -> tuple[Callable, str]:
  return (lambda v: v in allowed), f"one of {', '.join(allowed)}"


# (regex over dotted field names, check, description of the allowed range)
_RULES = [
  (r"(.*\.)?optim\.learning_rate", *_positive_float()),
  (r"(.*\.)?optim\.warmup_steps", *_int_at_least(0)),
  (r"(.*\.)?optim\.weight_decay", *_float_in(0.0, 1.0)),
  (r"(.*\.)?optim\.b[12]", *_float_in(0.0, 0.999999)),
  (r"(.*\.)?optim\.grad_clip_norm", *_float_in(0.0, math.inf)),
  (r"(.*\.)?train\.steps", *_int_at_least(0)),
  (r"(.*\.)?train\.(batch_size|log_every|checkpoint_every)", *_int_at_least(1)),
  (r"(.*\.)?train\.keep_checkpoints", *_int_at_least(1)),
  (r"(.*\.)?train\.eval_every", *_int_at_least(0)),
  (r"data\.min_interactions", *_int_at_least(1)),
  (r"data\.max_history", *_int_at_least(1)),
  (r"seed", *_int_at_least(0)),
  (r"(qformer|ilm)\.variant", *_name()),
  (r"eval\.reference", *_name()),
  (r"ilm\.model\.tokens_per_entity", *_int_at_least(1)),
  (r"ilm\.model\.query_centering", *_int_at_least(0)),
  (r"ilm\.model\.user_target\.weight", *_float_in(0.0, 1e6)),
  (r"ilm\.model\.user_target\.temperature", *_positive_float()),
  (r"ilm\.model\.user_target\.negatives", *_int_at_least(0)),
  (r"cf\.tables", *_one_of("mf", "sasrec")),
  (r"ilm\.data\.user_state", *_one_of("user", "sequence")),
  (r"ilm\.model\.soft_token_norm", *_one_of("", "llm")),
  (r"ilm\.model\.qformer_projector", *_one_of("linear", "per_query")),
  (
    r"ilm\.evals\.\w+\.templates",
    lambda v: (
      isinstance(v, tuple | list)
      and len(v) > 0
      and set(v) <= {"seen", "unseen"}
    ),
    "a non-empty tuple of 'seen' and/or 'unseen'",
  ),
]


def _flatten(config, prefix=""):
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flatten(value, name + ".")
    else:
      yield name, value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every out-of-range field.

  Args:
    config: a full experiment config (configs/<name>.py:get_config()).
  """
  errors = []
  for name, value in _flatten(config):
    for pattern, check, allowed in _RULES:
      if re.fullmatch(pattern, name) and not check(value):
        errors.append(f"config.{name}={value!r}: must be {allowed}.")
    if re.fullmatch(r"(.*\.)?optim\.lr_mults", name):
      try:
        optim.parse_lr_mults(value)
      except ValueError as error:
        errors.append(f"config.{name}: {error}")
  for section in ("cf", "qformer", "ilm"):
    phase = config.get(section)
    if phase is None or "optim" not in phase or "train" not in phase:
      continue
    # No steps (evaluation only, e.g. the zero-shot row): no schedule runs.
    steps = phase.train.steps
    if steps > 0 and phase.optim.warmup_steps > steps:
      errors.append(
        f"config.{section}.optim.warmup_steps={phase.optim.warmup_steps}: "
        f"must be <= {section}.train.steps={phase.train.steps}."
      )
  errors.extend(_tied_fields(config))
  cf = config.get("cf")
  if cf is not None and cf.get("tables") == "sasrec":
    if "sasrec" not in [b.strip() for b in cf.baselines.split(",")]:
      errors.append(
        f"config.cf.tables='sasrec': phase cf writes SASRec's tables only "
        f"when cf.baselines includes sasrec (it is {cf.baselines!r})."
      )
  ilm_data = config.get("ilm", {}).get("data", {})
  if ilm_data.get("user_state") == "sequence" and (
    cf is None or cf.get("tables") != "sasrec"
  ):
    errors.append(
      "config.ilm.data.user_state='sequence': only SASRec has a state "
      "before each item; it needs config.cf.tables='sasrec' (it is "
      f"{None if cf is None else cf.get('tables')!r})."
    )
  if ilm_data.get("user_state") == "sequence" and cf is not None:
    if cf.get("tables") == "sasrec" and not cf.get("sasrec", {}).get(
      "export_sequence_states", False
    ):
      errors.append(
        "config.ilm.data.user_state='sequence' reads the states phase cf "
        "exports only with config.cf.sasrec.export_sequence_states=True."
      )
  llm_config = config.get("ilm", {}).get("llm", None)
  if llm_config is not None:
    try:
      llm_loading.lora_fields(llm_config)
    except ValueError as error:
      errors.append(f"config.{error}")
  if "phases" in config:
    unknown = set(selected_phases(config.phases, strict=False)) - set(PHASES)
    if unknown:
      errors.append(
        f"config.phases={config.phases!r}: unknown "
        f"{sorted(unknown)}; allowed: {', '.join(PHASES)} or all."
      )
  if errors:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(errors))


# Fields that must agree across sections, checked before phase 0 starts
# rather than when phase 1 or 2 meets the mismatch: (field, must equal,
# only when these fields have these values).
_TIED = [
  # The Q-Former reads the CF tables that `cf.tables` names.
  ("qformer.model.cf_dim", "cf.model.embed_dim", {"cf.tables": "mf"}),
  (
    "qformer.model.cf_dim",
    "cf.sasrec.model.embed_dim",
    {"cf.tables": "sasrec"},
  ),
  (
    "ilm.model.tokens_per_entity",
    "qformer.model.num_queries",
    # Every query output becomes one soft token; the MLP projector and the
    # text-only prompt choose their own count.
    {"ilm.model.adapter": "qformer"},
  ),
]


def _tied_fields(config: ml_collections.ConfigDict) -> list[str]:
  flat = dict(_flatten(config))
  return [
    f"config.{name}={flat[name]!r}: must equal {other}={flat[other]!r}"
    + "".join(f" when {k}={v!r}" for k, v in when.items())
    + "."
    for name, other, when in _TIED
    if name in flat
    and other in flat
    and flat[name] != flat[other]
    and all(flat.get(k) == v for k, v in when.items())
  ]


def selected_phases(spec: str, strict: bool = True) -> list[str]:
  """Phase names from `config.phases` ("all" or a comma list), in order."""
  names = [p.strip() for p in spec.split(",") if p.strip()]
  if names == ["all"]:
    return list(PHASES)
  if strict:
    unknown = [p for p in names if p not in PHASES]
    if unknown:
      raise ConfigError(
        f"config.phases={spec!r}: unknown {unknown}; allowed: "
        f"{', '.join(PHASES)} or all."
      )
    return [p for p in PHASES if p in names]
  return names
