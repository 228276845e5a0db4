#!/usr/bin/env bash
# Creates a TPU VM or pod slice for ilm_jax.
#   launch/create_tpu.sh NAME ZONE ACCELERATOR [RUNTIME]
# e.g. launch/create_tpu.sh ilm-v5e us-west4-a v5litepod-16
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; accelerator=${3:?accelerator type}
runtime=${4:-v2-alpha-tpuv5-lite}
gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
  --accelerator-type="$accelerator" --version="$runtime"
