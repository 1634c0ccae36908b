#!/usr/bin/env bash
# The users' first command (Qwen2.5-7B architecture, random weights, tiny tokenizer) on one GPU, packing without
# flash-attn. Run on the lent GPU machine: bash benchmarks/gpu_sft_7b.sh DATA.json [extra flags]
# Prints the step lines; writes sft.log and logging.jsonl under $OUT (or ./gpu_out).
set -euo pipefail
DATA=${1:?dataset path}; shift
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MHSFT_CACHE=/tmp/mhsft_cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 benchmarks/random_model.py qwen2.5-7b /tmp/qwen7b
python3 -m mhsft sft --model /tmp/qwen7b --train_type lora \
  --dataset "$DATA" --num_train_epochs 1 --per_device_train_batch_size 8 \
  --gradient_accumulation_steps 4 --learning_rate 2e-4 --max_length 3072 --packing true \
  --attn_impl flash_attn --bf16 true --gradient_checkpointing true --save_steps 200 --save_total_limit 3 \
  --logging_steps 20 --output_dir /tmp/output/mh-sft-7b-lora --report_to tensorboard "$@" 2>&1 | tee "$OUT/sft.log"
cp /tmp/output/mh-sft-7b-lora/v*/logging.jsonl "$OUT/" || true
ls -la /tmp/output/mh-sft-7b-lora/v*/checkpoint-* | head -20
