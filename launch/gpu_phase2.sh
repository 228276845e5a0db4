#!/usr/bin/env bash
# Phase 2 on one GPU, from the phase-0/1 outputs of a `cpu` run (copy its
# workdir to the GPU machine), at a real budget, evaluating every test user;
# writes the same metrics files and results.md as the cpu run.
#   launch/gpu_phase2.sh WORKDIR [CONFIG] [EXTRA FLAGS...]
# CONFIG defaults to configs/ml1m.py:gpu (bf16, 128,000 prompts, all 6,040
# users; sized for about 8 minutes on one H100/H200-class GPU). Tests run
# it on CPU with configs/ml1m.py:tiny. A SIGTERM checkpoints phase 2's step
# and exits 143; rerunning the same command resumes.
set -euo pipefail
workdir=${1:?usage: launch/gpu_phase2.sh WORKDIR [CONFIG] [EXTRA FLAGS...]}
config=${2:-configs/ml1m.py:gpu}
shift $(( $# < 2 ? $# : 2 ))
# Phase 1's output is WORKDIR/qformer[_<variant>]/export (layout.py); phase
# 2 reads it unless the adapter has no Q-Former or starts it at random.
variant="" init=phase1 adapter=qformer previous=""
for flag in "$@"; do
  case $previous in  # "--flag value" as well as "--flag=value"
    --config.qformer.variant | --config.ilm.model.qformer_init | \
      --config.ilm.model.adapter) flag=$previous=$flag ;;
  esac
  case $flag in
    --config.qformer.variant=*) variant=${flag#*=} ;;
    --config.ilm.model.qformer_init=*) init=${flag#*=} ;;
    --config.ilm.model.adapter=*) adapter=${flag#*=} ;;
  esac
  previous=$flag
done
qformer=""
if [ "$adapter" = qformer ] && [ "$init" = phase1 ]; then
  qformer=qformer${variant:+_$variant}/export/params
fi
for needed in cf/export/metadata.json ${qformer:+"$qformer"}; do
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
# A SIGTERM to this script (a scheduler's preemption notice, `timeout`)
# goes on to phase 2, which checkpoints the step it reached and exits 143;
# the script waits for that checkpoint and exits with the same status.
# Ctrl-C and a hang-up do the same: a background job ignores SIGINT.
pid="" term=0
trap 'term=1; [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true' \
  TERM INT HUP
python -m ilm_jax.main --config="$config" --workdir="$workdir" \
  --config.phases=ilm,eval "$@" &
pid=$!
[ "$term" = 0 ] || kill -TERM "$pid" 2>/dev/null || true
while :; do
  wait "$pid" && status=0 || status=$?
  kill -0 "$pid" 2>/dev/null || break  # else a trapped signal ended wait
done
# If phase 2 ended just after a trapped signal cut `wait` short, its own
# status is still held for one more `wait` (127: none left).
wait "$pid" 2>/dev/null && status=0 || { last=$?; [ "$last" = 127 ] || status=$last; }
if [ "$status" -ne 0 ]; then
  echo "gpu_phase2: phase 2 exited with status $status; rerun the same" \
    "command to resume from its last checkpoint." >&2
  exit "$status"
fi
echo "gpu_phase2: phase 2 and the tables in $(( $(date +%s) - start )) s;" \
  "see $workdir/results.md and $workdir/metrics/."
