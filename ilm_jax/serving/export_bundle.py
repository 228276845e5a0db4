"""Loading a serving bundle (`WORKDIR/export/`, written by phase export).

`load_bundle` rebuilds a ready `IlmModel` and its full params from a bundle
plus the LLM checkpoint (the embedded one by default). The bundle's layout
is described in `ilm_jax.phases.export`.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from ilm_jax import checkpoint
from ilm_jax.models import ilm, llm_loading


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
  llm_config, llm_params, tokenizer = llm_loading.load_from_config(
    config.ilm.llm
  )
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
