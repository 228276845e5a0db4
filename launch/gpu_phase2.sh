#!/usr/bin/env bash
# Phase 2 on one GPU, from the phase-0/1 outputs of a `cpu` run (copy its
# workdir to the GPU machine), at a real budget, evaluating every test user;
# writes the same metrics files and results.md as the cpu run.
#   launch/gpu_phase2.sh WORKDIR [CONFIG] [EXTRA FLAGS...]
# CONFIG defaults to configs/ml1m.py:gpu (bf16, 128,000 prompts, all 6,040
# users; sized for at most 8 minutes on one H100/H200-class GPU). Tests run
# it on CPU with configs/ml1m.py:tiny.
set -euo pipefail
workdir=${1:?usage: launch/gpu_phase2.sh WORKDIR [CONFIG] [EXTRA FLAGS...]}
config=${2:-configs/ml1m.py:gpu}
shift $(( $# < 2 ? $# : 2 ))
# Phase 1's output is WORKDIR/qformer[_<variant>]/export (layout.py).
qformer=qformer
for flag in "$@"; do
  case $flag in
    --config.qformer.variant=?*) qformer=qformer_${flag#*=} ;;
  esac
done
for needed in cf/export/metadata.json $qformer/export/params; do
  if [ ! -e "$workdir/$needed" ]; then
    echo "gpu_phase2: $workdir/$needed is missing: run the cf and qformer" \
      "phases first (python -m ilm_jax.main --config=configs/ml1m.py:cpu" \
      "--workdir=$workdir --config.phases=cf,qformer, with the same" \
      "--config.qformer.variant)." >&2
    exit 1
  fi
done
cd "$(dirname "$0")/.."
start=$(date +%s)
python -m ilm_jax.main --config="$config" --workdir="$workdir" \
  --config.phases=ilm,eval "$@"
echo "gpu_phase2: phase 2 and the tables in $(( $(date +%s) - start )) s;" \
  "see $workdir/results.md and $workdir/metrics/."
