#!/usr/bin/env bash
# On the lent GPU machine: install carried wheels (ijson, liger-kernel), then run train_throughput.py.
# bash benchmarks/gpu_train_throughput.sh [train_throughput.py flags]
set -euo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MHSFT_CACHE=/tmp/mhsft_cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/train_throughput.py --workdir /tmp "$@"
