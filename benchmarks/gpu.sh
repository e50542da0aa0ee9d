#!/usr/bin/env bash
# bz against a hand-written loop on one GPU at 32, bf16-mixed and 16-mixed precision:
# per-step ratio, host syncs per batch (and a full epoch under sync debug mode "error"),
# peak memory, pinned/non_blocking copies. Finishes within 5 minutes (it is stopped at
# 290 s). Extra arguments go to benchmarks/gpu.py (--rounds, --precision, --dry-run).
#
#   benchmarks/gpu.sh                     # the report on stdout
#   benchmarks/gpu.sh --json gpu.json     # and the results as JSON
#   benchmarks/gpu.sh --dry-run           # anywhere: the CPU-checkable parts (~30 s)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
exec timeout 290 "$python" benchmarks/gpu.py "$@"
