"""The workdir layout: every path that one phase writes and another reads.

Phases talk only through files in the workdir; this module names those
files, so that a phase finds another's outputs without importing it.

```
WORKDIR/
  config.json                     the experiment config (experiment.run)
  phases.json                     {phase name: summary, wall_time_s} (an
                                  evaluation-only rerun keeps the training
                                  run's and adds reevaluation_wall_time_s)
  results.md                      the eval phase's tables
  metrics/<name>_<split>.json     final metrics of a phase (or variant)
  cf/export/                      the CF tables (phase cf)
  <name>/                         logs/, checkpoints/, best_params/ (train)
  qformer[_<variant>]/export/     params/ and config.json (phase qformer)
  ilm[_<variant>]/adapter/        the trained adapter (phase ilm)
  export/                         the serving bundle (phase export)
```

A phase's *name* is the phase, or `<phase>_<variant>` for the variants of
`qformer` and `ilm` (ablations and baselines that share one workdir).
"""

import json
import pathlib

import ml_collections

from ilm_jax.models import cf_encoder

# Phases whose config section has a `variant` that suffixes their name.
_VARIANT_PHASES = ("qformer", "ilm")


def phase_name(config: ml_collections.ConfigDict, phase: str) -> str:
  """`phase`, or `<phase>_<variant>` when `config.<phase>.variant` is set.

  Args:
    config: the experiment config.
    phase: "cf", "qformer", "ilm", "eval" or "export".

  Returns:
    The name of the phase's directory, metrics files and phases.json entry.
  """
  if phase in _VARIANT_PHASES:
    variant = config[phase].variant
    if variant:
      return f"{phase}_{variant}"
  return phase


def phase_dir(workdir, name: str) -> pathlib.Path:
  """`WORKDIR/<name>/`: the trainer's logs, checkpoints and best params."""
  return pathlib.Path(workdir).absolute() / name


# `cf.tables`: which CF tables phases 1 and 2 read, and where phase cf
# writes them. "mf" (the paper's): MF's item and user embeddings; "sasrec":
# SASRec's item embeddings and users' sequence states.
CF_TABLES = {"mf": "cf", "sasrec": "sasrec"}


def cf_export(workdir, tables: str = "mf") -> pathlib.Path:
  """`WORKDIR/cf/export/` (MF) or `WORKDIR/sasrec/export/`: the CF item
  and user tables (phase cf).

  Raises:
    ValueError: `tables` is not one of CF_TABLES.
  """
  if tables not in CF_TABLES:
    raise ValueError(
      f"cf.tables={tables!r}; expected one of {sorted(CF_TABLES)}."
    )
  return phase_dir(workdir, CF_TABLES[tables]) / "export"


def check_cf_tables(item_table, user_table, dataset, cf_dim: int | None):
  """Clear errors when the CF export does not fit the data or the model.

  Args:
    item_table: `[num_items, d]`.
    user_table: `[num_users, d]`.
    dataset: the ProcessedDataset the tables should describe.
    cf_dim: the model's CF input size `d`; None: any.

  Raises:
    ValueError: the tables' row counts differ from the dataset's, or `d`
      from `cf_dim`.
  """
  if item_table.shape[0] != dataset.num_items or (
    user_table.shape[0] != dataset.num_users
  ):
    raise ValueError(
      f"CF tables have {item_table.shape[0]} items / {user_table.shape[0]} "
      f"users but the dataset has {dataset.num_items} / "
      f"{dataset.num_users}: rerun the cf phase for this dataset."
    )
  if cf_dim is not None and item_table.shape[1] != cf_dim:
    raise ValueError(
      f"CF tables have dimension {item_table.shape[1]} but "
      f"qformer.model.cf_dim={cf_dim}; set them equal."
    )


def read_cf_export(
  workdir, dataset, cf_dim: int | None = None, tables: str = "mf"
):
  """The CF tables of `cf_export(workdir, tables)`, checked against the
  dataset.

  Returns:
    (item_table `[num_items, d]`, user_table `[num_users, d]`), float numpy.

  Raises:
    checkpoint.CheckpointError: no CF export (run the cf phase first).
    ValueError: as `check_cf_tables`.
  """
  item_table, user_table, _ = cf_encoder.load_cf_tables(
    cf_export(workdir, tables)
  )
  check_cf_tables(item_table, user_table, dataset, cf_dim)
  return item_table, user_table


def read_sequence_states(workdir, dataset, tables: str = "sasrec"):
  """The `sequence_states` of `cf_export(workdir, tables)`.

  Returns:
    float numpy `[num_interactions, d]` (see `sasrec.sequence_states`).

  Raises:
    checkpoint.CheckpointError: the export has none, or they do not fit
      the dataset (as `cf_encoder.load_sequence_states`).
  """
  return cf_encoder.load_sequence_states(
    cf_export(workdir, tables), dataset.num_interactions
  )


def qformer_export(config: ml_collections.ConfigDict, workdir) -> pathlib.Path:
  """`WORKDIR/<qformer name>/export/`: the phase-1 Q-Former of `config`.

  Written by phase qformer, read by phase ilm (`ilm.model.qformer_init`).
  """
  return phase_dir(workdir, phase_name(config, "qformer")) / "export"


_CF_TABLES_RECORD = "cf_tables.json"


def write_cf_tables_record(export: pathlib.Path, tables: str) -> None:
  """Records in a phase-1 export which CF tables (`cf.tables`) it saw."""
  (export / _CF_TABLES_RECORD).write_text(json.dumps({"cf_tables": tables}))


def read_cf_tables_record(export: pathlib.Path) -> str | None:
  """The `cf.tables` a phase-1 export was trained on (None: not recorded,
  an export from before the record existed, trained on MF's)."""
  path = export / _CF_TABLES_RECORD
  if not path.exists():
    return None
  return json.loads(path.read_text())["cf_tables"]


def ilm_adapter(config: ml_collections.ConfigDict, workdir) -> pathlib.Path:
  """`WORKDIR/<ilm name>/adapter/`: the phase-2 adapter of `config`."""
  return phase_dir(workdir, phase_name(config, "ilm")) / "adapter"


def export_dir(workdir) -> pathlib.Path:
  """`WORKDIR/export/`: the serving bundle (phase export, serving)."""
  return phase_dir(workdir, "export")


def metrics_dir(workdir) -> pathlib.Path:
  """`WORKDIR/metrics/`: every phase's final metrics files."""
  return pathlib.Path(workdir).absolute() / "metrics"


def metrics_file(workdir, name: str, split: str) -> pathlib.Path:
  """`WORKDIR/metrics/<name>_<split>.json`: a phase's final metrics."""
  return metrics_dir(workdir) / f"{name}_{split}.json"


def phases_file(workdir) -> pathlib.Path:
  """`WORKDIR/phases.json`: each phase's summary and wall time."""
  return pathlib.Path(workdir).absolute() / "phases.json"


def read_phases(workdir) -> dict:
  """The contents of `phases_file(workdir)`; {} before any phase ran."""
  path = phases_file(workdir)
  return json.loads(path.read_text()) if path.exists() else {}


def results_file(workdir, reference: str | None = None) -> pathlib.Path:
  """`WORKDIR/results.md`: the eval phase's tables; with another paired
  reference row than the main ILM, `WORKDIR/results_<reference>.md`."""
  name = "results.md" if reference is None else f"results_{reference}.md"
  return pathlib.Path(workdir).absolute() / name


def config_file(workdir) -> pathlib.Path:
  """`WORKDIR/config.json`: the experiment config of the last run."""
  return pathlib.Path(workdir).absolute() / "config.json"
