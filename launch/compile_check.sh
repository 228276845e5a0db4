#!/usr/bin/env bash
# Compiles the phase-1/phase-2 train steps for TPU topologies on this (CPU)
# host with libtpu's compiler, before any pod is created; see
# ilm_jax/compile_check.py and docs/results/pod.md.
#   launch/compile_check.sh CONFIG TOPOLOGY [TOPOLOGY...]
# e.g. launch/compile_check.sh configs/ml1m_llama3_8b.py v5e-64 v5p-128
# Needs `pip install -e ".[tpu]"` (libtpu) in the environment.
set -euo pipefail
config=${1:?config}; shift
for topology in "$@"; do
  python -m ilm_jax.compile_check --config="$config" --topology="$topology" \
    2>&1 | grep -E '^topology|^\[' || true
done
