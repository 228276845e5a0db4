"""Installs ilm_jax: `pip install -e .` (add `[test]` for the test suite)."""

import setuptools

# Versions tested together on Python 3.11 (CPU); see docs/RESULTS.md.
INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "grain==0.2.18",
  "ml_collections==1.1.0",
  "absl-py==2.5.1",
  "numpy==2.4.6",
  "safetensors==0.8.0",  # HF checkpoints (MiniLM, larger Llama-family LLMs)
  "gguf==0.19.0",  # the packaged SmolLM2 weights and tokenizer
  "tokenizers==0.22.2",  # fast tokenizers; the newest that transformers 4.57.6 (tests) accepts
  "tensorboardX==2.6.4",  # TensorBoard event files without TensorFlow
  "jinja2==3.1.6",  # renders the chat template stored with the LLM
  # oneDNN 3.2 (libdnnl.so.3, GNU OpenMP, no other dependency) for the bf16
  # matmul custom call ilm_jax/ops/onednn_matmul.py, built at first use.
  'onednn-cpu-gomp==2023.2.0; sys_platform == "linux" and platform_machine == "x86_64"',
  # mimalloc (libmimalloc.so.3), preloaded by ilm_jax/allocator.py: glibc's
  # malloc page-faults through every buffer above 32 MiB at each step.
  'cmeel-mimalloc==3.4.3; sys_platform == "linux"',
  "fastapi==0.165.0",  # ilm_jax.serve: the HTTP service
  "uvicorn==0.54.0",
  "rapidfuzz==3.14.6",  # catalogue title matching for chat mentions
  "scipy==1.17.1",  # ilm_jax/stats.py: bootstrap intervals, McNemar test
]

EXTRAS = {
  # Independent references for parity tests: transformers' PyTorch Llama and
  # BERT. 4.57.6 is the last release that still reads GGUF the way our
  # tests rely on; torch 2.13.0 installs from the machine's local wheel.
  "test": [
    "pytest==9.0.3",
    "pytest-benchmark==5.2.3",
    "ruff==0.17.6",
    "torch==2.13.0",
    "transformers==4.57.6",
    "accelerate==1.15.0",  # transformers reads the GGUF reference with it
    "httpx==0.28.1",  # FastAPI's TestClient
    # Drives Debian's chromium (apt-get install chromium) for the chat-page
    # test; it never downloads a browser of its own there.
    "playwright==1.65.2",
    "matplotlib==3.11.2",  # tests/test_plot_learning_curves.py
  ],
  # docs/plot_learning_curves.py (Agg backend, PNG only).
  "plot": ["matplotlib==3.11.2"],
  # libtpu 0.0.42.* (what jax 0.10.2 pins): TPU runtime, and the compiler
  # that ilm_jax.compile_check uses on CPU hosts. Never in the base install.
  "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.*"],
  "gpu": ["jax[cuda12]==0.10.2"],
  "tfds": ["tensorflow-datasets"],
}

setuptools.setup(
  name="ilm_jax",
  version="0.1.0",
  description=(
    "Item-Language Model (ILM) for conversational recommendation in "
    "JAX/Flax: CF encoder, Q-Former pretraining, frozen-LLM adapter."
  ),
  packages=setuptools.find_packages(include=["ilm_jax", "ilm_jax.*"]),
  package_data={
    "ilm_jax": ["data/templates/*.json", "ops/csrc/*", "serving/static/*"]
  },
  python_requires=">=3.11",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
)
