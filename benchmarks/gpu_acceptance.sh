#!/usr/bin/env bash
# One GPU acceptance run (issue 25): kernels vs references and the bandwidth limit, chunked CE,
# attention backends on packed documents, training-step MFU (bf16 / FP8, compile on / off), ring
# attention at 32K, MoE grouped GEMM; one JSON + one markdown table (runs/gpu_acceptance/).
#   bash benchmarks/gpu_acceptance.sh              # one H100: about 8 minutes
#   bash benchmarks/gpu_acceptance.sh --dry-run    # CPU: every step wired, tiny shapes
# Extra arguments go to benchmarks/gpu_acceptance.py (--out DIR, --steps ..., --peak-tflops N).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
# 9 minutes hard stop: the steps' budgets add up to 7; a hung collective or kernel must not eat the GPU lease
exec timeout 540 "$PY" benchmarks/gpu_acceptance.py "$@"
