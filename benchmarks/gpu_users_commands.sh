#!/usr/bin/env bash
# On the lent GPU machine: install carried wheels (.whl: ijson, liger-kernel), optionally run the GPU tests named in
# $TESTS, then benchmarks/users_commands.py with the given flags. Copy EmoLLM's data to .gpu/ and carry .whl and .gpu.
#   bash benchmarks/gpu_users_commands.sh --models 7b --out $OUT/users_commands_7b.json
set -euo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MHSFT_CACHE=/tmp/mhsft_cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ -n "${TESTS:-}" ]; then
  MHSFT_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tail -25 || true
fi
python3 benchmarks/users_commands.py --data .gpu/emollm_data.json --workdir /tmp/users_commands "$@"
