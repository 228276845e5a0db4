#!/usr/bin/env bash
# Runs phases of an experiment on every worker at once (one process per host).
#   launch/run.sh NAME ZONE WORKDIR [CONFIG] [EXTRA FLAGS...]
# WORKDIR must be one directory all hosts share (an NFS/Filestore or gcsfuse
# mount): orbax writes each host's shards there; only process 0 writes logs.
# e.g. launch/run.sh ilm-v5e us-west4-a /mnt/shared/ilm configs/ml1m.py \
#        --config.phases=cf,qformer
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; workdir=${3:?workdir}
config=${4:-configs/ml1m.py}; shift $(( $# < 4 ? $# : 4 ))
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
  "cd ~/ilm_jax && python3 -m ilm_jax.main --multihost \
   --config=$config --workdir=$workdir $*"
