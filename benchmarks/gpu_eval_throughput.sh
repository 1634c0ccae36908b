#!/usr/bin/env bash
# On the lent GPU machine (carry .whl and .bench_data): the engine and scoring tests on the GPU, then
# benchmarks/eval_throughput.py on Qwen2.5-7B's architecture with random weights and the CPsyExam train set.
#   .bench_data/cpsyexam_train: a copy of ../shared/data/eval/cpsyexam_train (ignored by git; the device gets the
#   working tree only). .whl: what the image lacks (ijson, fastapi + pydantic, uvicorn, openai, jieba,
#   rouge-chinese, lm-eval and its needs), downloaded for Python 3.12 as benchmarks/NOTES.md says.
# Writes $OUT/eval_throughput.json and $OUT/tests.log.
set -uo pipefail
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD/src}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -z "${NO_TESTS:-}" ]; then
  MHSFT_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/serve/test_scoring.py \
    tests/serve/test_engine.py 2>&1 | tail -5 | tee "$OUT/tests.log"
fi
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/eval_throughput.py --workdir /tmp/eb \
  --data .bench_data/cpsyexam_train --out "$OUT/eval_throughput.json" "$@"
cp /tmp/eb/mcq.log "$OUT/" 2>/dev/null; tail -c 20000 /tmp/eb/lm_eval.log > "$OUT/lm_eval.log" 2>/dev/null
true
