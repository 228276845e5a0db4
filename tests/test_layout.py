"""Workdir layout: the paths phases share, and phases not importing phases."""

import ast
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from ilm_jax import layout

PACKAGE = pathlib.Path(layout.__file__).parent


def _config(qformer_variant="", ilm_variant=""):
  return ml_collections.ConfigDict(
    dict(qformer=dict(variant=qformer_variant), ilm=dict(variant=ilm_variant))
  )


def test_variants_name_their_phase_directories(tmp_path):
  plain, variant = _config(), _config("it", "mlp")
  assert layout.phase_name(plain, "qformer") == "qformer"
  assert layout.phase_name(variant, "qformer") == "qformer_it"
  assert layout.phase_name(variant, "ilm") == "ilm_mlp"
  assert layout.phase_name(variant, "cf") == "cf"
  assert layout.phase_name(variant, "eval") == "eval"
  assert layout.qformer_export(variant, tmp_path) == (
    tmp_path / "qformer_it" / "export"
  )
  assert layout.qformer_export(plain, tmp_path) == tmp_path / "qformer/export"
  assert layout.ilm_adapter(variant, tmp_path) == tmp_path / "ilm_mlp/adapter"
  assert layout.cf_export(tmp_path) == tmp_path / "cf" / "export"
  assert layout.export_dir(tmp_path) == tmp_path / "export"
  assert layout.metrics_file(tmp_path, "ilm_mlp", "test") == (
    tmp_path / "metrics" / "ilm_mlp_test.json"
  )
  assert layout.results_file(tmp_path) == tmp_path / "results.md"


def test_read_phases_is_empty_before_any_phase(tmp_path):
  assert layout.read_phases(tmp_path) == {}
  layout.phases_file(tmp_path).write_text(json.dumps({"cf": {"x": 1}}))
  assert layout.read_phases(tmp_path) == {"cf": {"x": 1}}


def test_cf_tables_that_do_not_fit_the_dataset_are_a_clear_error():
  dataset = type("Dataset", (), dict(num_items=4, num_users=3))()
  items, users = np.zeros((4, 8)), np.zeros((3, 8))
  layout.check_cf_tables(items, users, dataset, cf_dim=8)
  layout.check_cf_tables(items, users, dataset, cf_dim=None)
  with pytest.raises(ValueError, match="5 items / 3 users but the dataset"):
    layout.check_cf_tables(np.zeros((5, 8)), users, dataset, cf_dim=8)
  with pytest.raises(ValueError, match="dimension 8 but qformer.model.cf_dim"):
    layout.check_cf_tables(items, users, dataset, cf_dim=64)


def test_cf_tables_choose_the_export_and_phase_1_records_them(tmp_path):
  assert layout.cf_export(tmp_path, "mf") == tmp_path / "cf" / "export"
  assert layout.cf_export(tmp_path, "sasrec") == tmp_path / "sasrec/export"
  with pytest.raises(ValueError, match="cf.tables='bpr'; expected one of"):
    layout.cf_export(tmp_path, "bpr")
  assert layout.read_cf_tables_record(tmp_path) is None  # older exports
  layout.write_cf_tables_record(tmp_path, "sasrec")
  assert layout.read_cf_tables_record(tmp_path) == "sasrec"


@pytest.mark.parametrize("package", ["phases", "serving"])
def test_phases_and_serving_do_not_import_phases(package):
  importers = []
  for path in sorted((PACKAGE / package).glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "ilm_jax.phases"
      ):
        importers.append(path.name)
      if isinstance(node, ast.Import) and any(
        alias.name.startswith("ilm_jax.phases") for alias in node.names
      ):
        importers.append(path.name)
  assert importers == []


def test_phase_2_refuses_a_q_former_trained_on_other_cf_tables(tmp_path):
  from configs import ml1m
  from ilm_jax.phases import ilm_training as ilm_phase

  config = ml1m.get_config("tiny")
  export = layout.qformer_export(config, tmp_path)
  export.mkdir(parents=True)
  layout.write_cf_tables_record(export, "mf")
  config.cf.tables = "sasrec"
  with pytest.raises(ValueError, match="trained on the 'mf' CF tables but"):
    ilm_phase.load_qformer(config, tmp_path, None)


def test_every_phase_name_has_a_module_with_run():
  import importlib

  from ilm_jax import config_validation, experiment

  assert set(experiment.PHASE_MODULES) == set(config_validation.PHASES)
  for module in experiment.PHASE_MODULES.values():
    assert callable(importlib.import_module(f"ilm_jax.phases.{module}").run)


def test_config_validation_accepts_exactly_the_layouts_cf_tables():
  from configs import ml1m
  from ilm_jax import config_validation

  for tables in layout.CF_TABLES:
    config = ml1m.get_config("cpu")
    config.cf.tables = tables
    config_validation.validate(config)  # cpu: MF's and SASRec's d are 64
  config.cf.tables = "lightgcn"
  with pytest.raises(config_validation.ConfigError, match="cf.tables"):
    config_validation.validate(config)


def test_phase_2_warm_starts_from_another_runs_adapter_or_names_the_misfit(
  tmp_path,
):
  import jax
  import numpy as np

  from ilm_jax import checkpoint
  from ilm_jax.phases import ilm_training as ilm_phase

  saved = {"proj": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  checkpoint.save_params(tmp_path / "ilm_grounding" / "adapter", saved)
  expected = {"proj": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32)}}
  got = ilm_phase.warm_start_adapter("ilm_grounding", tmp_path, expected)
  np.testing.assert_array_equal(got["proj"]["kernel"], saved["proj"]["kernel"])
  # Another projector size: refused, naming the config key and the path.
  other = {"proj": {"kernel": jax.ShapeDtypeStruct((2, 4), np.float32)}}
  with pytest.raises(
    checkpoint.CheckpointError, match=r"adapter_init='ilm_grounding'.*proj"
  ):
    ilm_phase.warm_start_adapter("ilm_grounding", tmp_path, other)
  with pytest.raises(checkpoint.CheckpointError, match=r"ilm_missing/adapter"):
    ilm_phase.warm_start_adapter("ilm_missing", tmp_path, expected)
