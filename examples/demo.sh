#!/usr/bin/env bash
# `make demo`: the main job on the embedded default. A tiny Qwen2-architecture model is built locally (no
# download), the demo dialogues are checked, and a short LoRA run trains on them with packing.
set -euo pipefail
cd "$(dirname "$0")/.."
MHSFT=.venv/bin/mhsft
OUT=output/demo
echo "== 1/3  the demo dialogues: format check and statistics (tokens counted with the tiny model)"
$MHSFT data validate examples/data/demo_sharegpt.jsonl --rejects "$OUT/demo.rejects.jsonl"
$MHSFT data inspect examples/data/demo_sharegpt.jsonl --model builtin:tiny --max_length 1024
echo
echo "== 2/3  a short LoRA fine-tune (builtin:tiny, packing, 30 steps, CPU)"
$MHSFT sft --model builtin:tiny --train_type lora --dataset examples/data/demo_sharegpt.jsonl \
  --num_train_epochs 1 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --learning_rate 1e-3 \
  --max_length 1024 --packing true --attn_impl flash_attn --gradient_checkpointing true \
  --max_steps 30 --save_steps 10 --save_total_limit 2 --logging_steps 5 --split_dataset_ratio 0.1 \
  --output_dir "$OUT" --report_to tensorboard
RUN=$(ls -d "$OUT"/v*/ | sort -V | tail -1)
echo
echo "== 3/3  what the run left behind"
echo "run directory:      $RUN"
echo "  args.json         the run's settings (secrets masked)"
echo "  logging.jsonl     one line per logging step (loss, lr, grad_norm, tokens/s, memory)"
echo "  checkpoint-30/    LoRA adapter + tokenizer + args.json: infer/export/eval need only this path"
ls "$RUN"
echo
echo "Note: builtin:tiny is a 0.25M-parameter model with random weights. Its loss falls, but what it"
echo "generates is meaningless text; the demo shows the workflow, not a counseling model."
