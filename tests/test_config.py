"""Configs load in every mode, every field is read by the code, and bad
values and fields get clear errors."""

import ast
import importlib
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import common, ml1m
from ilm_jax import config_validation, experiment

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(
  p.stem
  for p in (REPO / "configs").glob("*.py")
  if p.stem not in ("__init__", "common")
)
MODE_ARGS = [None, "cpu", "tiny"]


def _all_configs():
  """(label, config) for every configs/<name>.py in every mode."""
  for name in CONFIG_NAMES:
    module = importlib.import_module(f"configs.{name}")
    for arg in MODE_ARGS:
      yield f"{name}:{arg or 'full'}", module.get_config(arg)


@pytest.mark.parametrize("arg", MODE_ARGS)
def test_every_mode_validates(arg):
  config = ml1m.get_config(arg)
  config_validation.validate(config)
  assert common.parse_mode(arg) == (arg or "full")


def test_every_config_file_validates_in_every_mode():
  labels = []
  for label, config in _all_configs():
    config_validation.validate(config)
    labels.append(label)
  assert len(labels) == 3 * len(CONFIG_NAMES) and len(CONFIG_NAMES) >= 4


def test_sizes_differ_where_the_docstrings_say():
  full, cpu, tiny = (ml1m.get_config(a) for a in MODE_ARGS)
  assert (full.data.dataset, cpu.data.dataset, tiny.data.dataset) == (
    "ml1m",
    "ml1m",
    "synthetic",
  )
  assert (full.ilm.train.steps, cpu.ilm.train.steps, tiny.ilm.train.steps) == (
    20000,
    640,
    2,
  )
  for config in (full, cpu, tiny):  # the two must agree (models/ilm.py)
    assert (
      config.ilm.model.tokens_per_entity == config.qformer.model.num_queries
    )
    assert config.qformer.model.cf_dim == config.cf.model.embed_dim


def test_a_size_block_cannot_add_a_field():
  config = ml1m.base_config()
  with pytest.raises(AttributeError, match="num_querys"):
    with common.locked(config):
      config.qformer.model.num_querys = 4  # misspelt
  config.qformer.model.num_queries = 4  # unlocked again afterwards


def test_configs_import_no_model_code():
  for name in CONFIG_NAMES + ["common"]:
    tree = ast.parse((REPO / "configs" / f"{name}.py").read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import | ast.ImportFrom):
        modules = [a.name for a in node.names] + [getattr(node, "module", "")]
        assert not any((m or "").startswith("ilm_jax") for m in modules), (
          f"configs/{name}.py imports {modules}"
        )


# Every config field must be read by the library. The check is static: a
# field counts as read when its key appears in ilm_jax/ as an attribute load
# (`config.data.max_history`), a string subscript (`spec["type"]`), or an
# identifier-like string passed to a call (`cfg.get("ks")`,
# `_option(data_config, "cache_dir")`) or compared (`"optim" in phase`).
# Its blind spot: a key read in one section counts for every section with a
# field of that name (`steps` is read under `train`, so an `optim.steps`
# would pass); configs/common.py keeps such names out of the sections that
# do not use them. A runtime tracker was not used: the tiny pipeline takes
# one branch of each config switch (one adapter, no variant), so it would
# report the other branches' fields as unread.
def _identifier(value) -> bool:
  return isinstance(value, str) and value.isidentifier()


def names_read_by(root: pathlib.Path) -> set[str]:
  """Keys that code under `root` reads (see the comment above)."""
  names = set()
  for path in root.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
        names.add(node.attr)
      elif isinstance(node, ast.Subscript) and isinstance(
        node.slice, ast.Constant
      ):
        names.add(node.slice.value)
      elif isinstance(node, ast.Call):
        args = [*node.args, *(k.value for k in node.keywords)]
        names.update(
          a.value
          for a in args
          if isinstance(a, ast.Constant) and _identifier(a.value)
        )
      elif isinstance(node, ast.Compare):
        names.update(
          c.value
          for c in (node.left, *node.comparators)
          if isinstance(c, ast.Constant) and _identifier(c.value)
        )
  return {n for n in names if _identifier(n)}


def unread_fields(config: ml_collections.ConfigDict, names: set[str]):
  """Dotted leaf fields of `config` whose key is not in `names`."""
  flat = config.to_dict()
  stack, unread = [("", flat)], []
  while stack:
    prefix, node = stack.pop()
    for key, value in node.items():
      if isinstance(value, dict):
        stack.append((f"{prefix}{key}.", value))
      elif key not in names:
        unread.append(f"{prefix}{key}")
  return sorted(unread)


@pytest.fixture(scope="module")
def library_reads():
  return names_read_by(REPO / "ilm_jax")


def test_every_config_field_is_read_by_the_library(library_reads):
  unread = {
    label: fields
    for label, config in _all_configs()
    if (fields := unread_fields(config, library_reads))
  }
  assert not unread, f"fields no code in ilm_jax/ reads: {unread}"


def test_the_read_check_catches_an_unread_field(library_reads):
  config = ml1m.get_config("tiny")
  config.cf.model.never_read_anywhere = 1
  config.ilm.evals.rank.also_unread = "x"
  assert unread_fields(config, library_reads) == [
    "cf.model.never_read_anywhere",
    "ilm.evals.rank.also_unread",
  ]


def test_unknown_mode_lists_the_valid_ones():
  with pytest.raises(ValueError, match="full.*cpu.*tiny"):
    ml1m.get_config("huge")


def test_out_of_range_values_name_field_and_range():
  config = ml1m.get_config("tiny")
  config.cf.optim.learning_rate = 0.0
  config.cf.train.batch_size = -4
  config.data.max_history = 0
  config.ilm.variant = "../mlp"
  config.eval.reference = "ilm/../x"  # becomes a file name
  # What the command line makes of --config.ilm.optim.lr_mults=qformer/.*=0.1
  config.ilm.optim.lr_mults = ("qformer/.*=0.1",)
  config.ilm.evals.rank_masked.templates = ("seen", "unseen_")
  config.ilm.model.qformer_projector = "dense"
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config)
  message = str(error.value)
  assert "config.cf.optim.learning_rate=0.0: must be a finite number > 0" in (
    message
  )
  assert "config.cf.train.batch_size=-4: must be an integer >= 1" in message
  assert "config.data.max_history=0: must be an integer >= 1" in message
  assert "config.ilm.variant='../mlp': must be lowercase letters" in message
  assert "config.eval.reference='ilm/../x': must be lowercase" in message
  assert "config.ilm.model.qformer_projector='dense': must be one of" in (
    message
  )
  assert (
    "config.ilm.evals.rank_masked.templates=('seen', 'unseen_'): must be a "
    "non-empty tuple of 'seen' and/or 'unseen'." in message
  )
  assert (
    "config.ilm.optim.lr_mults: optim.lr_mults entry 'qformer/.*=0.1': "
    "expected a (regex, multiplier >= 0) pair" in message
  )


def test_warmup_longer_than_training_is_rejected_unless_nothing_trains():
  config = ml1m.get_config("cpu")  # ilm warmup 16
  config.ilm.train.steps = 10
  with pytest.raises(config_validation.ConfigError, match=r"warmup_steps=16"):
    config_validation.validate(config)
  # The README's zero-shot row: --config.ilm.train.steps=0, evaluation only.
  config.ilm.train.steps = 0
  config_validation.validate(config)


def test_tied_fields_must_agree():
  config = ml1m.get_config("cpu")
  config.cf.tables = "mf"
  config.qformer.model.num_queries = 8
  config.qformer.model.cf_dim = 32
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config)
  message = str(error.value)
  assert (
    "config.ilm.model.tokens_per_entity=4: must equal "
    "qformer.model.num_queries=8 when ilm.model.adapter='qformer'." in message
  )
  assert (
    "config.qformer.model.cf_dim=32: must equal cf.model.embed_dim=64 "
    "when cf.tables='mf'." in message
  )
  # The MLP projector and the text-only prompt choose their token count.
  for adapter in ("mlp", "prompt"):
    config = ml1m.get_config("cpu")
    config.ilm.model.adapter = adapter
    config.ilm.model.tokens_per_entity = 20
    config_validation.validate(config)


def test_phase_selection():
  assert config_validation.selected_phases("all") == list(
    config_validation.PHASES
  )
  # Order follows the pipeline, not the command line.
  assert config_validation.selected_phases("ilm, cf") == ["cf", "ilm"]
  with pytest.raises(config_validation.ConfigError, match="unknown.*'nope'"):
    config_validation.selected_phases("cf,nope")


def _main(*args):
  return subprocess.run(
    [sys.executable, "-m", "ilm_jax.main", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def _leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_every_field_has_a_type_the_command_line_can_set():
  # config_flags cannot override list or dict fields ("Type <class
  # 'list'> ... is not supported for overriding"): sequences are tuples.
  unsettable = [
    f"{label} {key}"
    for label, config in _all_configs()
    for key, value in _leaves(config)
    if isinstance(value, list | dict | set)
  ]
  assert not unsettable


def test_command_line_overrides_the_freezing_and_the_mesh_rules(tmp_path):
  # The overrides parse (a list field fails here, naming its type), then
  # a bad value stops the run before any work.
  proc = _main(
    "--config=configs/ml1m.py:tiny",
    f"--workdir={tmp_path}",
    "--config.ilm.optim.frozen=('llm/.*', 'cf/.*', 'qformer/.*')",
    "--config.mesh.logical_axis_rules=(('batch', 'data'),)",
    "--config.cf.train.steps=-1",
  )
  assert proc.returncode != 0
  assert "not supported for overriding" not in proc.stderr
  assert "config.cf.train.steps=-1: must be an integer >= 0" in proc.stderr


def test_cli_rejects_unknown_config_field(tmp_path):
  proc = _main(
    "--config=configs/ml1m.py:tiny",
    f"--workdir={tmp_path}",
    "--config.cf.optim.lr=3",
  )
  assert proc.returncode != 0
  assert "Unknown config field 'lr' in --config.cf.optim.lr" in proc.stderr


def test_cli_rejects_bad_value_before_any_work(tmp_path):
  proc = _main(
    "--config=configs/ml1m.py:tiny",
    f"--workdir={tmp_path}",
    "--config.cf.train.steps=-1",
  )
  assert proc.returncode != 0
  assert "config.cf.train.steps=-1: must be an integer >= 0" in proc.stderr
  assert not (tmp_path / "cf").exists()


@pytest.mark.parametrize(
  "preload, hinted", [("", True), ("libtcmalloc.so", False)]
)
def test_allocator_hint_only_on_cpu_with_glibc_malloc(
  monkeypatch, preload, hinted
):
  monkeypatch.setenv("LD_PRELOAD", preload)
  messages = []
  monkeypatch.setattr(
    experiment.logging, "info", lambda msg, *a: messages.append(msg)
  )
  experiment.log_allocator_hint()
  assert any("tcmalloc" in m for m in messages) == hinted


def test_cf_tables_must_exist_and_fit_the_q_former():
  config = ml1m.get_config("cpu")
  assert config.cf.tables == "sasrec"  # the main command's (session 35)
  config_validation.validate(config)
  config.cf.tables = "mf"  # cpu: SASRec's d is 64 like MF's
  config_validation.validate(config)
  config = ml1m.get_config()  # full: SASRec d 128, cf_dim 64
  config.cf.tables = "sasrec"
  config.cf.baselines = "popularity"
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config)
  message = str(error.value)
  assert (
    "config.qformer.model.cf_dim=64: must equal cf.sasrec.model.embed_dim="
    "128 when cf.tables='sasrec'." in message
  )
  assert "cf.baselines includes sasrec (it is 'popularity')" in message
  config.cf.tables = "lightgcn"
  with pytest.raises(config_validation.ConfigError, match="one of mf, sasrec"):
    config_validation.validate(config)


def test_sequence_user_states_need_sasrec_tables():
  config = ml1m.get_config("cpu")
  config.cf.tables = "mf"
  config.ilm.data.user_state = "sequence"
  with pytest.raises(
    config_validation.ConfigError,
    match=r"user_state='sequence': .* needs config.cf.tables='sasrec' "
    r"\(it is 'mf'\)",
  ):
    config_validation.validate(config)
  config.cf.tables = "sasrec"
  with pytest.raises(
    config_validation.ConfigError,
    match=r"only with config.cf.sasrec.export_sequence_states=True",
  ):
    config_validation.validate(config)
  config.cf.sasrec.export_sequence_states = True
  config_validation.validate(config)
  config.ilm.data.user_state = "session"
  with pytest.raises(
    config_validation.ConfigError,
    match=r"user_state='session': must be one of user, sequence",
  ):
    config_validation.validate(config)


def test_lora_is_off_at_full_size_on_at_cpu_size_and_checked_early():
  # The paper's frozen LLM at full size; the cpu size (the README's main
  # command, and the gpu size after it) trains LoRA rank 8 (session 35).
  assert ml1m.get_config().ilm.llm.lora.rank == 0
  assert ml1m.get_config().cf.tables == "mf"  # the paper's CF modality
  config = ml1m.get_config("cpu")
  assert config.ilm.llm.lora.rank == 8
  config.ilm.llm.lora.update(rank=8, targets=("q", "qkv"))
  with pytest.raises(
    config_validation.ConfigError,
    match=r"config.ilm.llm.lora.targets=\('q', 'qkv'\); expected distinct "
    r"names from \('q', 'k', 'v', 'o', 'gate', 'up', 'down'\)",
  ):
    config_validation.validate(config)
  config.ilm.llm.lora.targets = ("q", "v")
  config_validation.validate(config)


def test_gpu_size_is_phase_2_of_a_cpu_run_at_a_real_budget():
  """`configs/ml1m.py:gpu` reads a `cpu` run's phase-0/1 outputs, so every
  field before phase 2 is the cpu size's; phase 2 trains in bf16 on all
  users. Other config files keep their three sizes."""
  gpu, cpu = ml1m.get_config("gpu"), ml1m.get_config("cpu")
  config_validation.validate(gpu)
  for section in ("data", "cf", "qformer", "mesh"):
    assert gpu[section].to_dict() == cpu[section].to_dict(), section
  assert gpu.ilm.model.to_dict() == cpu.ilm.model.to_dict()
  # One padded step shape on the GPU (one compile), five one-task ones on
  # the CPU (less padding); the prompts themselves are the cpu size's.
  gpu_data, cpu_data = gpu.ilm.data.to_dict(), cpu.ilm.data.to_dict()
  assert cpu_data.pop("one_task_batches")
  assert not gpu_data.pop("one_task_batches")
  assert gpu_data == cpu_data
  assert gpu.ilm.llm.dtype == "bfloat16" and gpu.ilm.llm.frozen_matmul == ""
  assert gpu.ilm.evals.rank.num_users == 0  # all test users
  assert gpu.ilm.train.steps * gpu.ilm.train.batch_size == 128_000
  from configs import ml100k

  with pytest.raises(ValueError, match="'gpu'; expected one of"):
    ml100k.get_config("gpu")


def test_ml100k_ranks_every_test_user_in_phase_2():
  from configs import ml100k

  for size in (None, "cpu"):
    config = ml100k.get_config(size)
    assert config.data.dataset == "ml100k"
    assert config.ilm.evals.rank.num_users == 0  # 0: all 943 users
