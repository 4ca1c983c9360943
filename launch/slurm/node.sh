#!/usr/bin/env bash
# One node's part of launch/slurm/train.sbatch (run by srun, one task per node): torchrun with a c10d
# rendezvous at $MEGAQWEN_RDZV_HOST:$MASTER_PORT over $MEGAQWEN_NNODES nodes. Arguments are the
# trainer's Hydra overrides. MEGAQWEN_DRY_RUN=1 prints the command (shell-quoted) instead of running it.
# SIGUSR1 (forwarded by srun) is passed to the trainer processes, i.e. torchrun's children.
set -euo pipefail
: "${MEGAQWEN_NNODES:?set by train.sbatch}" "${MEGAQWEN_RDZV_HOST:?set by train.sbatch}"

PY=${MEGAQWEN_PYTHON:-python3}
TRAIN=$(dirname "$(command -v "$PY" || echo "$PY")")/megaqwen-train
if [ ! -x "$TRAIN" ] && command -v megaqwen-train >/dev/null 2>&1; then TRAIN=$(command -v megaqwen-train); fi

# GPUs on this node: SLURM's count (it may read "8" or "h100:8"), GPUS_PER_NODE, else nvidia-smi.
GPN=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-}}
GPN=${GPN##*:}
if [ -z "$GPN" ]; then GPN=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if ! [[ "$GPN" =~ ^[1-9][0-9]*$ ]]; then
  echo "node.sh: GPUs per node unknown (got '$GPN'); set SLURM_GPUS_ON_NODE or GPUS_PER_NODE" >&2
  exit 2
fi
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  THREADS=$(( ${SLURM_CPUS_ON_NODE:-${SLURM_CPUS_PER_TASK:-$GPN}} / GPN )); [ "$THREADS" -ge 1 ] || THREADS=1
  export OMP_NUM_THREADS=$THREADS
fi

EXTRA=("parallel.backend=nccl")  # as torchrun.sh: a parallel.backend=... override wins
for o in "$@"; do case "$o" in parallel.backend=*) EXTRA=() ;; esac; done

CMD=("$PY" -m torch.distributed.run
     --nnodes="$MEGAQWEN_NNODES" --nproc-per-node="$GPN"
     --rdzv-backend=c10d --rdzv-endpoint="$MEGAQWEN_RDZV_HOST:${MASTER_PORT:-29500}"
     --rdzv-id="${MEGAQWEN_RDZV_ID:-megaqwen}" --max-restarts=0
     --shutdown-timeout="${MEGAQWEN_SHUTDOWN_TIMEOUT:-600}"  # ranks saving after a signal (as torchrun.sh)
     --no-python "$TRAIN" "${EXTRA[@]+"${EXTRA[@]}"}" "$@")

if [ "${MEGAQWEN_DRY_RUN:-0}" = 1 ]; then
  printf ' OMP_NUM_THREADS=%q' "$OMP_NUM_THREADS"; printf ' %q' "${CMD[@]}"; printf '\n'
  exit 0
fi

echo "node.sh: node ${SLURM_NODEID:-?} ($(hostname)), $GPN process(es), rendezvous $MEGAQWEN_RDZV_HOST" >&2
# shellcheck disable=SC2317  # called by the trap
forward_usr1() {
  echo "node.sh: SIGUSR1 -> trainer processes of torchrun $TR_PID" >&2
  pkill -USR1 -P "$TR_PID" || true
}
trap forward_usr1 USR1
"${CMD[@]}" &
TR_PID=$!
rc=0
while :; do
  wait "$TR_PID" && rc=0 || rc=$?
  kill -0 "$TR_PID" 2>/dev/null || break
done
exit "$rc"
