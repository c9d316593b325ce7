#!/usr/bin/env bash
# The accelerator check in one command (under 10 minutes on one H100): plain-loop training and bare
# decode of `small` and `paper` in bf16, against the peak measured in the same run. Torch and this
# repository are all it needs (no Ray). Without a GPU it runs its CPU dry mode.
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # figures also in OUT_DIR/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi: CPU dry mode"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python benchmarks/gpu_check.py --json "$out/gpu_check.json"
