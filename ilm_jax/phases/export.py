"""The `export` phase: a self-contained adapter bundle, and its loader.

`WORKDIR/export/` holds what a server needs besides the LLM weights:
  adapter/     orbax: what phase 2 trained ("qformer" and "proj", or the
               text-only baseline's "prompt")
  cf_tables/   orbax: the frozen CF tables ("items", "users")
  config.json  the experiment config (model, prompts, LLM checkpoint name)
  index.json   item ids and titles, user ids (CF-table row order)
`load_bundle` rebuilds a ready `IlmModel` and its full params from a bundle
plus the LLM checkpoint (the embedded one by default).
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from ilm_jax import checkpoint, data
from ilm_jax.models import cf_encoder, ilm
from ilm_jax.phases import cf
from ilm_jax.phases import ilm as ilm_phase

EXPORT_DIR = "export"


def run(config: ml_collections.ConfigDict, workdir, mesh: Mesh) -> dict:
  del mesh
  workdir = pathlib.Path(workdir).absolute()
  name = ilm_phase.phase_name(config)
  adapter_dir = workdir / name / "adapter"
  if config.ilm.model.adapter == "none":
    raise ValueError("ilm.model.adapter='none' has no adapter to export.")
  if not adapter_dir.exists():
    raise checkpoint.CheckpointError(
      f"No trained adapter at {adapter_dir}; run the ilm phase first "
      "(--config.phases=ilm)."
    )
  out = workdir / EXPORT_DIR
  dataset = data.load_dataset(config.data)
  items, users, _ = cf_encoder.load_cf_tables(workdir.joinpath(*cf.EXPORT_DIR))
  checkpoint.save_params(out / "adapter", checkpoint.load_params(adapter_dir))
  checkpoint.save_params(out / "cf_tables", dict(items=items, users=users))
  if jax.process_index() == 0:
    (out / "config.json").write_text(config.to_json_best_effort(indent=1))
    (out / "index.json").write_text(
      json.dumps(
        dict(
          item_ids=list(dataset.item_ids),
          item_titles=list(dataset.item_titles),
          user_ids=list(dataset.user_ids),
        )
      )
    )
  logging.info("Exported the %s adapter to %s.", name, out)
  return dict(export_dir=str(out))


@dataclasses.dataclass
class Bundle:
  """A ready ILM: call `model` methods with `params`."""

  model: ilm.IlmModel
  params: dict
  tokenizer: object
  config: ml_collections.ConfigDict
  item_ids: list[str]
  item_titles: list[str]
  user_ids: list[str]


def load_bundle(export_dir, llm_checkpoint: str | None = None) -> Bundle:
  """Rebuilds the model from an export plus the LLM weights.

  Args:
    export_dir: `WORKDIR/export`.
    llm_checkpoint: override the LLM named in the bundle's config (a name,
      .gguf file or HF directory of the same architecture).
  """
  export_dir = pathlib.Path(export_dir).absolute()
  config_file = export_dir / "config.json"
  if not config_file.exists():
    raise checkpoint.CheckpointError(f"No export bundle at {export_dir}.")
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  if llm_checkpoint:
    config.ilm.llm.checkpoint = llm_checkpoint
  llm_config, llm_params, tokenizer = ilm_phase.load_llm(config.ilm.llm)
  model = ilm.build(config.ilm.model, llm_config, config.qformer.model)
  tables = checkpoint.load_params(export_dir / "cf_tables")
  params = dict(
    checkpoint.load_params(export_dir / "adapter"),
    cf=jax.tree.map(jnp.asarray, tables),
    llm=llm_params,
  )
  index = json.loads((export_dir / "index.json").read_text())
  return Bundle(
    model=model,
    params=params,
    tokenizer=tokenizer,
    config=config,
    item_ids=index["item_ids"],
    item_titles=index["item_titles"],
    user_ids=index["user_ids"],
  )
