#!/usr/bin/env bash
# Here, before a device call: what gpu_speed_issue.sh (and gpu_sft_7b.sh, gpu_train_throughput.sh) need carried to
# the lent GPU machine, which reaches no package index: .whl/ with the wheels its image lacks (Liger's kernels and
# ijson, for the GPU image's Python 3.12 on x86_64) and .gpu/ with EmoLLM's dialogues from the shared data. Both
# folders are git-ignored, so the device tool copies them only when named: run(..., carry=[".whl", ".gpu"]).
#   bash benchmarks/gpu_carry.sh
#   EXTRA="torchao bitsandbytes" bash benchmarks/gpu_carry.sh   # more wheels, for the QLoRA or FP8 A/B steps
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl .gpu
"$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d .whl liger-kernel==0.8.5 ijson==3.3.0 ${EXTRA:-}
DATA=${SHARED_DATA:-../shared/data}/train/emollm_data.json
if [ -f "$DATA" ]; then cp "$DATA" .gpu/emollm_data.json; else echo "no $DATA: .gpu/ left without EmoLLM's data" >&2; fi
du -sh .whl .gpu
ls .whl
