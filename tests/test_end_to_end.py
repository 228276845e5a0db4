"""All phases on the tiny config (synthetic data, the real SmolLM2 and the
real orbax/grain machinery) in a temporary workdir, then the export bundle.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ml1m
from ilm_jax import checkpoint, data
from ilm_jax.data import prompts
from ilm_jax.serving import export_bundle

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir, *flags):
  """The README's command on the tiny config, as a user runs it.

  One CPU device (the multi-device paths have their own tests): eight
  virtual devices on two cores only slow the run down.
  """
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ilm_jax.main",
      "--config=configs/ml1m.py:tiny",
      f"--workdir={workdir}",
      *flags,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads((workdir / "phases.json").read_text()), proc.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("e2e")
  return workdir, _main(workdir)[0]


def test_every_phase_runs_and_writes_its_outputs(finished_run):
  workdir, summaries = finished_run
  assert set(summaries) == {"cf", "qformer", "ilm", "eval", "export"}
  for phase in summaries.values():
    assert phase["wall_time_s"] > 0
  ilm_test = json.loads((workdir / "metrics" / "ilm_test.json").read_text())
  for which in ("seen", "unseen"):
    for metric in ("hr@5", "hr@10", "ndcg@5", "ndcg@10"):
      value = ilm_test[f"sequential/{which}/{metric}"]
      assert 0.0 <= value <= 1.0
    assert 0.0 <= ilm_test[f"description/{which}/semantic_consistency"] <= 1
  # NDCG can never exceed HR at the same cut-off.
  assert (
    ilm_test["sequential/seen/ndcg@10"]
    <= ilm_test["sequential/seen/hr@10"] + 1e-9
  )
  assert ilm_test["users"] == 4
  # Every phase's file says which data it measured: the config's dataset.
  record = data.load_dataset(ml1m.get_config("tiny").data).record()
  assert ilm_test["dataset"] == record
  for name in ("mf", "sasrec", "popularity", "qformer"):
    path = workdir / "metrics" / f"{name}_test.json"
    assert json.loads(path.read_text())["dataset"] == record, name
  table = (workdir / "results.md").read_text()
  assert "| ILM (Q-Former + projector) |" in table
  assert "| SASRec (phase 0, full ranking) |" in table
  assert "| all five (ITC+ITM+ITG+II+UI) |" in table  # the phase-1 table
  assert summaries["ilm"]["trie/titles"] == 40


def _one_prompt_batch(bundle):
  """One sequential prompt (user 0, history items 1 and 2, answer item 3)
  encoded for the bundle's model, as a batch of one."""
  encoder = prompts.PromptEncoder(
    bundle.tokenizer,
    bundle.item_titles,
    tokens_per_entity=2,
    max_len=96,
    max_entities=4,
  )
  request = prompts.Request(
    "sequential",
    "{user} watched {history}.",
    user=0,
    history=(1, 2),
    target_text=bundle.item_titles[3],
    target_item=3,
  )
  return {k: v[None] for k, v in encoder.encode(request).items()}


def test_export_bundle_reloads_the_trained_adapter(finished_run):
  workdir, _ = finished_run
  bundle = export_bundle.load_bundle(workdir / "export")
  trained = checkpoint.load_params(workdir / "ilm" / "adapter")
  for got, want in zip(
    jax.tree.leaves({k: bundle.params[k] for k in ("qformer", "proj")}),
    jax.tree.leaves(trained),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert len(bundle.item_titles) == bundle.params["cf"]["items"].shape[0]
  # The rebuilt model scores an answer: a finite, positive loss.
  batch = _one_prompt_batch(bundle)
  loss, _ = jax.jit(bundle.model.loss)(bundle.params, batch, None)
  assert np.isfinite(float(loss)) and float(loss) > 0


def test_rerunning_a_finished_run_resumes_instead_of_retraining(finished_run):
  workdir, _ = finished_run
  summaries, log = _main(workdir, "--config.phases=qformer")
  # The checkpoint at the last step is found: no training step runs again.
  assert "Resuming from" in log and "Training qformer" not in log
  assert (
    summaries["qformer"]["steps"] == ml1m.get_config("tiny").qformer.train.steps
  )


def test_a_run_warm_started_from_the_main_adapter_starts_from_it(
  finished_run,
):
  workdir, _ = finished_run
  _, log = _main(
    workdir,
    "--config.phases=ilm",
    "--config.ilm.variant=warm",
    "--config.ilm.model.adapter_init=ilm",
    "--config.ilm.train.steps=0",  # the exported adapter is the start
  )
  assert "Adapter warm-started from" in log
  started = checkpoint.load_params(workdir / "ilm_warm" / "adapter")
  trained = checkpoint.load_params(workdir / "ilm" / "adapter")
  assert set(started) == set(trained) == {"qformer", "proj"}
  for got, want in zip(
    jax.tree.leaves(started), jax.tree.leaves(trained), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_text_only_baseline_trains_only_its_prompt_beside_the_main_run(
  finished_run,
):
  workdir, _ = finished_run
  summaries, _ = _main(
    workdir,
    "--config.phases=ilm,eval",
    "--config.ilm.variant=textonly",
    "--config.ilm.model.adapter=prompt",
    "--config.ilm.model.tokens_per_entity=3",
  )
  assert {"ilm", "ilm_textonly"} <= set(summaries)  # the main run's stays
  adapter = checkpoint.load_params(workdir / "ilm_textonly" / "adapter")
  assert list(adapter) == ["prompt"]
  assert adapter["prompt"]["embedding"].shape == (3, 576)  # SmolLM2's width
  table = (workdir / "results.md").read_text()
  assert "| ILM (Q-Former + projector) |" in table
  assert "| Text-only (titles, learned prompt) |" in table


def test_gpu_phase2_script_runs_phase_2_and_writes_per_user_metrics(
  finished_run,
):
  """launch/gpu_phase2.sh at the tiny size on CPU: phase 2 and the tables
  from the run's phase-0/1 outputs, with per-user results; a workdir
  without them is refused with what to run."""
  workdir, _ = finished_run
  env = dict(os.environ, XLA_FLAGS="")
  script = REPO / "launch" / "gpu_phase2.sh"
  proc = subprocess.run(
    [
      str(script),
      str(workdir),
      "configs/ml1m.py:tiny",
      "--config.ilm.variant=gpuscript",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "gpu_phase2: phase 2 and the tables in" in proc.stdout
  metrics = json.loads(
    (workdir / "metrics" / "ilm_gpuscript_test.json").read_text()
  )
  users = metrics["per_user"]["user_ids"]
  assert metrics["users"] == len(users) > 0
  assert "| ilm_gpuscript |" in (workdir / "results.md").read_text()
  empty = workdir.parent / "empty_workdir"
  empty.mkdir(exist_ok=True)
  refused = subprocess.run(
    [str(script), str(empty)], capture_output=True, text=True, check=False
  )
  assert refused.returncode == 1
  assert "cf/export/metadata.json is missing" in refused.stderr


def test_lora_run_trains_exports_and_serves_its_factors(finished_run, tmp_path):
  """ilm.llm.lora.rank > 0 end to end, in a copy of the finished run (the
  export phase writes WORKDIR/export): the factors train, go into the
  adapter export and the bundle, and change the bundle's loss."""
  workdir = tmp_path / "lora_run"
  source = finished_run[0]
  shutil.copytree(
    source,
    workdir,
    # The phase-2 runs and the bundle, not cf/export or qformer/export.
    ignore=lambda folder, names: [
      n
      for n in names
      if folder == str(source) and n.startswith(("ilm", "export"))
    ],
  )
  _main(
    workdir,
    "--config.phases=ilm,export",
    "--config.ilm.llm.lora.rank=2",
    "--config.ilm.llm.lora.targets=('q','v','down')",
  )
  trained = checkpoint.load_params(workdir / "ilm" / "adapter")
  assert set(trained) == {"qformer", "proj", "lora"}
  assert trained["lora"]["down_lora_b"].shape == (30, 2, 576)  # SmolLM2
  assert float(np.abs(trained["lora"]["q_lora_b"]).max()) > 0  # B moved
  bundle = export_bundle.load_bundle(workdir / "export")
  assert bundle.model.llm.config.lora_rank == 2
  assert bundle.model.llm.config.lora_targets == ("q", "v", "down")
  for name, value in trained["lora"].items():
    np.testing.assert_array_equal(
      np.asarray(bundle.params["lora"][name]), value
    )
  metrics = json.loads((workdir / "metrics" / "ilm_test.json").read_text())
  assert metrics["users"] > 0  # the beam search ran with the factors
  batch = _one_prompt_batch(bundle)
  loss = jax.jit(lambda p: bundle.model.loss(p, batch, None)[0])
  # B = 0 is the LLM without LoRA.
  zero_b = {
    k: np.zeros_like(v) if k.endswith("_lora_b") else v
    for k, v in bundle.params["lora"].items()
  }
  without = dict(bundle.params, lora=zero_b)
  assert abs(float(loss(bundle.params)) - float(loss(without))) > 1e-6
  missing = {k: v for k, v in bundle.params.items() if k != "lora"}
  with pytest.raises(ValueError, match="ilm.llm.lora.rank=2.*no 'lora'"):
    bundle.model.loss(missing, batch, None)
