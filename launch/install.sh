#!/usr/bin/env bash
# Copies this checkout to every worker of a TPU VM/pod and installs it.
#   launch/install.sh NAME ZONE
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}
repo=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$repo" --exclude=.git --exclude='workdir*' -czf /tmp/ilm_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/ilm_jax.tgz "$name":~/ --zone="$zone" \
  --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
  'mkdir -p ~/ilm_jax && tar -C ~/ilm_jax -xzf ~/ilm_jax.tgz &&
   cd ~/ilm_jax && python3 -m pip install -q -e ".[tpu]"'
