"""The `export` phase: a self-contained adapter bundle.

`WORKDIR/export/` holds what a server needs besides the LLM weights:
  adapter/     orbax: what phase 2 trained ("qformer" and "proj", or the
               text-only baseline's "prompt"; plus "lora" with
               ilm.llm.lora.rank > 0)
  cf_tables/   orbax: the frozen CF tables ("items", "users")
  config.json  the experiment config (model, prompts, LLM checkpoint name)
  index.json   item ids and titles, user ids (CF-table row order)
`ilm_jax.serving.export_bundle.load_bundle` rebuilds a ready `IlmModel` and
its full params from a bundle plus the LLM checkpoint (the embedded one by
default).
"""

import json

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from ilm_jax import checkpoint, data, layout


def run(config: ml_collections.ConfigDict, workdir, mesh: Mesh) -> dict:
  del mesh
  name = layout.phase_name(config, "ilm")
  adapter_dir = layout.ilm_adapter(config, workdir)
  if config.ilm.model.adapter == "none":
    raise ValueError("ilm.model.adapter='none' has no adapter to export.")
  if not adapter_dir.exists():
    raise checkpoint.CheckpointError(
      f"No trained adapter at {adapter_dir}; run the ilm phase first "
      "(--config.phases=ilm)."
    )
  out = layout.export_dir(workdir)
  dataset = data.load_dataset(config.data)
  items, users = layout.read_cf_export(
    workdir, dataset, tables=config.cf.tables
  )
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
