#!/usr/bin/env bash
# One node, N processes of `megaqwen-train` under torchrun. Everything after the options is passed
# to the trainer as Hydra overrides (`megaqwen-train --help` lists them all).
#
#   launch/torchrun.sh --nproc-per-node 4 model=qwen2.5-0.5b parallel.tp=2 parallel.dp=2
#   launch/torchrun.sh --nproc-per-node=8 model=qwen2.5-7b parallel=tp4_zero1 train.global_batch_size=64
#   launch/torchrun.sh --nproc-per-node 2 train.engine=deepspeed parallel.zero_stage=3   # CPU is fine
#
# N defaults to the number of visible GPUs (or 2 on CPU). The backend is nccl when PyTorch sees CUDA
# and gloo otherwise (a parallel.backend=... override wins). On CPU each rank gets
# OMP_NUM_THREADS = cores / N unless set, and DeepSpeed is told to use its CPU accelerator.
# Only rank 0 writes the run folder (metrics.jsonl, run.json, W&B, Hydra config and log).
# Relative paths (train.out_dir, data.path, ...) are relative to the folder you call this from.
# Before any rank starts, `megaqwen-train --check` checks the overrides, data, layout and run folder
# once, so a mistake is one message rather than one traceback per rank.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
BIN_DIR=$(dirname "$(command -v "$PY")")
TRAIN=${TRAIN:-$BIN_DIR/megaqwen-train}
if [ ! -x "$TRAIN" ]; then
  TRAIN=$(command -v megaqwen-train || true)
fi
if [ -z "$TRAIN" ]; then
  echo "torchrun.sh: megaqwen-train not found next to $PY or on PATH; pip install -e . first" >&2
  exit 2
fi

NPROC=""
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node)
      [ $# -ge 2 ] || { echo "torchrun.sh: $1 needs a value" >&2; exit 2; }
      NPROC=$2; shift 2 ;;
    --nproc-per-node=*|--nproc_per_node=*) NPROC=${1#*=}; shift ;;
    -h|--help) sed -n '/^set -e/q; 2,$p' "$0"; exit 0 ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done

# GPUs torch would see; without an NVIDIA, ROCm (/dev/kfd) or WSL (/dev/dxg) device node there are
# none, and that is known without importing torch (2 s of every launch on a CPU machine)
if compgen -G "/dev/nvidia[0-9]*" >/dev/null || [ -e /dev/kfd ] || [ -e /dev/dxg ]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
else
  NGPU=0
fi
if [ -z "$NPROC" ]; then
  if [ "$NGPU" -gt 0 ]; then NPROC=$NGPU; else NPROC=2; fi
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "torchrun.sh: --nproc-per-node must be a positive integer, got '$NPROC'" >&2
  exit 2
fi

if [ "$NGPU" -gt 0 ]; then
  BACKEND=nccl
  if [ "$NPROC" -gt "$NGPU" ]; then
    echo "torchrun.sh: --nproc-per-node=$NPROC but only $NGPU GPU(s) visible" >&2
    exit 2
  fi
else
  BACKEND=gloo
  CORES=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))")
  THREADS=$(( CORES / NPROC )); [ "$THREADS" -ge 1 ] || THREADS=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
EXTRA=("parallel.backend=$BACKEND")
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  case "$o" in parallel.backend=*) BACKEND=${o#parallel.backend=}; EXTRA=() ;; esac
done

WORLD_SIZE=$NPROC "$TRAIN" --check "${EXTRA[@]+"${EXTRA[@]}"}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}" || exit $?
echo "torchrun.sh: $NPROC process(es), backend $BACKEND, trainer $TRAIN" >&2
# Ctrl-C reaches every rank from the terminal: each finishes its step, saves and exits 0, and the
# agent (megaqwen.train.torchrun: torchrun that leaves SIGINT to the ranks) then exits 0 too. SIGTERM
# is forwarded by torchrun; ranks still running --shutdown-timeout s later are SIGKILLed (torchrun's
# own default, 30 s, is shorter than a large model's checkpoint write).
exec "$PY" -m megaqwen.train.torchrun --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  --signals-to-handle=SIGTERM,SIGHUP,SIGQUIT --shutdown-timeout="${MEGAQWEN_SHUTDOWN_TIMEOUT:-600}" --no-python "$TRAIN" "${EXTRA[@]+"${EXTRA[@]}"}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
