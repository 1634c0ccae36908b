#!/usr/bin/env bash
# Multi-GPU scaling of the real `mhsft sft` CLI (`python3 -m torch.distributed.run --standalone ... -m mhsft sft`)
# on Qwen2.5 architectures with random weights (benchmarks/random_model.py; tiny tokenizer) at the users'
# configuration: LoRA r8 / alpha 32 / dropout 0.05 on all linear layers, packed rows, micro-batch 8 x 3072, no
# gradient accumulation, gradient checkpointing, bf16, --use_liger_kernel; 8 steps, one log line a step, no
# checkpoint but the final one (sft always saves the last step; LoRA: adapter + optimizer, seconds).
#
#   1. 7B, DDP on 1, 2, 4 GPUs              -> global tokens/s, per GPU, scaling vs 1 GPU (goals 1.9x / 3.7x)
#   2. 7B, --deepspeed zero2 on 2 GPUs      (when deepspeed imports; carried as a wheel in .whl/)
#   3. 32B, --deepspeed zero3 on 2 GPUs at 2 x 4096, only when the time budget allows: its random model (65 GB)
#      is built on the last GPU while run 2 goes, and the run is cut at the budget (steps logged so far count).
#
# On the lent 4-GPU machine (carry .whl and .gpu):   bash benchmarks/gpu_scaling.sh
# Results under $OUT (4 files): scaling.md (table), scaling.json (rows + every logged step + versions),
# runs.log (setup, each run's head and tail), gpu_monitor.csv (nvidia-smi each second: epoch s, GPU, MiB, util %).
# The summary is rewritten after every run, so a cut-off call still brings back what finished.
#
# CPU smoke test of the script's logic (builtin:tiny, gloo, 2 processes, no GPU, under a minute on 2 cores):
#   MHSFT_SCALING_SMOKE=1 OUT=/tmp/smoke_out bash benchmarks/gpu_scaling.sh
#   (EXTRA_PYTHONPATH=DIR with deepspeed installed there makes the --deepspeed runs happen too; on a CPU, accelerate
#   ignores DeepSpeed and they run as DDP.)
# Knobs: BUDGET_S (wall seconds for everything, default 520), STEPS (8), STEPS_32B (6), SKIP (2 warm-up steps),
# RUN_32B (auto | 0), DATA (.gpu/emollm_data.json), NS ("1 2 4"), PYTHON (python3).
# ONLY_32B=1: the 32B ZeRO-3 run alone (on the 2-GPU kind, a whole call): builds the 32B model in the foreground
# on GPU 0, then trains on GPUs 0-1; no 7B build, DDP or ZeRO-2 runs.
set -uo pipefail # no -e: one failing run must not stop the others

T0=$SECONDS
SMOKE=${MHSFT_SCALING_SMOKE:-0}
BUDGET=${BUDGET_S:-520}
STEPS=${STEPS:-8}
STEPS_32B=${STEPS_32B:-6}
SKIP=${SKIP:-2}
RUN_32B=${RUN_32B:-auto}
ONLY_32B=${ONLY_32B:-0}
DATA=${DATA:-.gpu/emollm_data.json}
OUT=${OUT:-gpu_out}
W=/tmp/mhsft_scaling
RESERVE=15     # seconds kept for the final summary
MIN_RUN=60     # a 7B run needs at least this much of the budget to start
NEED_32B=170   # seconds the 32B ZeRO-3 run needs (load ~60-90 s, 6 steps ~25 s, start-up ~30 s)
mkdir -p "$OUT"
rm -rf "$W" && mkdir -p "$W"
RUNLOG=$OUT/runs.log
MANIFEST=$W/runs.tsv
: >"$RUNLOG"
: >"$MANIFEST"

left() { echo $((BUDGET - (SECONDS - T0))); }
say() { echo "[$((SECONDS - T0))s] $*" | tee -a "$RUNLOG"; }

if [ "$SMOKE" = 1 ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  NS=${NS:-"1 2"}
  NGPU=3 # pretend, so that the 32B slot (2 processes of builtin:tiny) runs too
  export OMP_NUM_THREADS=1
else
  PY=${PYTHON:-python3}
  NS=${NS:-"1 2 4"}
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >>"$RUNLOG" 2>&1 || say "WARNING: installing the carried wheels failed (see runs.log)"
  fi
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  export OMP_NUM_THREADS=4
fi
export PYTHONPATH=/tmp/site:$PWD/src${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}
export PYTHONUNBUFFERED=1 MHSFT_CACHE=/tmp/mhsft_cache TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# NVLink multicast stays off on the lent machines (a program that uses it can take the host's GPUs down)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# ------------------------------------------------------------------------------------------- the machine
{
  echo "== machine"
  nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -8
  nvidia-smi topo -m 2>&1 | head -8
  "$PY" - <<'EOF'
import importlib, json, platform, traceback
v = {"python": platform.python_version()}
for m in ("torch", "transformers", "peft", "accelerate", "deepspeed", "liger_kernel", "triton"):
    try:
        v[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:  # report any import failure, with its traceback for deepspeed
        v[m] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if m == "deepspeed":
            traceback.print_exc()
try:
    import torch
    v["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception:
    pass
print(json.dumps(v))
json.dump(v, open("/tmp/mhsft_scaling/facts.json", "w"))
EOF
} >>"$RUNLOG" 2>&1
say "$(tail -n 1 "$RUNLOG")"
[ -f "$W/facts.json" ] || echo '{}' >"$W/facts.json"
if grep -q '"deepspeed": "[0-9]' "$W/facts.json"; then HAVE_DS=1; else
  HAVE_DS=0
  say "deepspeed does not import (see runs.log): the --deepspeed runs are skipped"
fi
if [ ! -f "$DATA" ]; then say "ERROR: no dataset at $DATA (carry .gpu)"; fi
say "GPUs: $NGPU; budget ${BUDGET}s; runs for N in: $NS"

MON_PID=
if [ "$SMOKE" != 1 ]; then
  (while :; do
    ts=$(date +%s.%N)
    nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader,nounits 2>/dev/null |
      sed "s/^/$ts, /"
    sleep 1
  done) >"$OUT/gpu_monitor.csv" &
  MON_PID=$!
fi

summarize() {
  "$PY" benchmarks/scaling_summary.py --manifest "$MANIFEST" --gpu_monitor "$OUT/gpu_monitor.csv" \
    --skip "$SKIP" --json "$OUT/scaling.json" --md "$OUT/scaling.md" --extra "$W/facts.json" "$@"
}

# A run's log in runs.log: progress bars dropped, the head (set-up, notices) and the tail (steps, tracebacks).
keep_log() {
  local name=$1 rc=$2 secs=$3 f=$4
  local clean=$W/$name.clean
  tr '\r' '\n' <"$f" | grep -v -E 'Loading weights|Writing model shards|it/s\]$|^[[:space:]]*$' >"$clean"
  {
    echo "===================== $name: rc $rc, ${secs}s ($(wc -l <"$clean") log lines)"
    if [ "$(wc -l <"$clean")" -le 160 ]; then cat "$clean"; else
      head -n 40 "$clean"
      echo "... ($(($(wc -l <"$clean") - 160)) lines left out) ..."
      tail -n 120 "$clean"
    fi
  } >>"$RUNLOG"
}

# skipped NAME GPUS KIND MODEL_TAG WHY: a manifest row for a run that did not happen, so the table says why.
skipped() {
  say "skip $1: $5"
  printf '%s\t%s\t%s\t%s\t\t\t-\t%s\t%s\n' "$1" "$2" "$3" "$4" "$W/$1" "$5" >>"$MANIFEST"
}

# run NAME GPUS KIND MODEL_TAG CAP_S SFT_ARGS...: one torchrun of `mhsft sft` on GPUs 0..GPUS-1, cut at CAP_S or at
# the budget; recorded in the manifest whatever happens (NOTE=... adds a note to its row).
run() {
  local name=$1 n=$2 kind=$3 tag=$4 cap=$5
  shift 5
  local dir=$W/$name lim
  lim=$(($(left) - RESERVE))
  [ "$lim" -gt "$cap" ] && lim=$cap
  if [ "$n" -gt "$NGPU" ]; then
    skipped "$name" "$n" "$kind" "$tag" "needs $n GPUs, $NGPU here"
    return
  fi
  if [ "$lim" -lt "$MIN_RUN" ]; then
    skipped "$name" "$n" "$kind" "$tag" "only $(left)s of the budget left"
    return
  fi
  say "run $name: $n GPU(s), cut after ${lim}s"
  local t0 t1 rc
  t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout -k 15 "$lim" \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" -m mhsft sft "$@" --output_dir "$dir" \
    >"$W/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local note=${NOTE:-} last err
  last=$(grep -E '^step ' "$W/$name.log" | tail -n 1)
  # the first error a worker printed (mhsft's one-line errors, Python exceptions, CUDA OOM)
  err=$(grep -m1 -E '\[mhsft\] error|Error: |out of memory' "$W/$name.log" | tr '\t' ' ' | cut -c1-240)
  case $rc in
  0) ;;
  124 | 137) [ -n "$err" ] && note="${note:+$note; }$err" ;;
  *) note="${note:+$note; }${err:-no error line; see runs.log}" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$n" "$kind" "$tag" "$t0" "$t1" "$rc" "$dir" "$note" >>"$MANIFEST"
  keep_log "$name" "$rc" "$(awk "BEGIN{printf \"%.0f\", $t1 - $t0}")" "$W/$name.log"
  say "$name: rc $rc; ${last:-no step logged}${err:+; $err}"
  summarize >/dev/null 2>>"$RUNLOG" || say "the summary failed (see runs.log)"
}

# ------------------------------------------------------------------------------------------- models and flags
COMMON=(--train_type lora --lora_rank 8 --lora_alpha 32 --lora_dropout 0.05 --target_modules all-linear
  --num_train_epochs 1 --gradient_accumulation_steps 1 --learning_rate 2e-4 --packing true
  --attn_impl flash_attn --gradient_checkpointing true --logging_steps 1 --save_steps 100000 --report_to none)
if [ "$SMOKE" = 1 ]; then
  M7=builtin:tiny
  M32=builtin:tiny
  TAG7=tiny
  TAG32=tiny-2nd # no one-GPU reference for it
  BAL=(--balance "$DATA#200" --max_length 512 --batch 2)
  ARGS7=(--model "$M7" --dataset "$DATA#200" --max_length 512 --per_device_train_batch_size 2 --max_steps "$STEPS")
  ARGS32=(--model "$M32" --dataset "$DATA#200" --max_length 512 --per_device_train_batch_size 1
    --max_steps "$STEPS_32B")
  BUILD7=(true)
  BUILD32=("$PY" -c "print('smoke: no 32B model to build')")
  BUILD32_GPU=0
else
  M7=$W/qwen7b
  M32=$W/qwen32b
  TAG7=7b
  TAG32=32b
  GPU_ARGS=(--bf16 true --use_liger_kernel true)
  BAL=(--balance "$DATA" --max_length 3072 --batch 8)
  ARGS7=(--model "$M7" --dataset "$DATA" --max_length 3072 --per_device_train_batch_size 8 --max_steps "$STEPS"
    "${GPU_ARGS[@]}")
  ARGS32=(--model "$M32" --dataset "$DATA" --max_length 4096 --per_device_train_batch_size 2
    --max_steps "$STEPS_32B" "${GPU_ARGS[@]}")
  BUILD7=("$PY" benchmarks/random_model.py qwen2.5-7b "$M7" cuda)
  BUILD32=("$PY" benchmarks/random_model.py qwen2.5-32b "$M32" cuda)
  BUILD32_GPU=$((NGPU - 1)) # the last GPU: runs 1-2 of the 7B use the first two while it builds
fi

# the 32B ZeRO-3 run once its model build ended with status $1
run_32b() {
  if [ "$1" != 0 ]; then
    skipped 32b-zero3-2 2 zero3 "$TAG32" "building the 32B model failed (rc $1, see runs.log)"
  elif [ "$(left)" -lt $((NEED_32B + RESERVE)) ]; then
    skipped 32b-zero3-2 2 zero3 "$TAG32" "only $(left)s left after the 32B build"
  else
    run 32b-zero3-2 2 zero3 "$TAG32" 600 "${ARGS32[@]}" "${COMMON[@]}" --deepspeed zero3
  fi
}

finish() {
  [ -n "$MON_PID" ] && kill "$MON_PID" 2>/dev/null
  say "summary"
  summarize 2>>"$RUNLOG" | tee -a "$RUNLOG"
  ls -la "$OUT" | tee -a "$RUNLOG"
  say "done in $((SECONDS - T0))s"
}

if [ "$ONLY_32B" = 1 ]; then
  if [ "$HAVE_DS" != 1 ]; then
    skipped 32b-zero3-2 2 zero3 "$TAG32" "deepspeed does not import"
  else
    say "building the 32B model (random weights) on GPU 0"
    t=$SECONDS
    CUDA_VISIBLE_DEVICES=0 timeout $(($(left) - NEED_32B)) "${BUILD32[@]}" >"$W/build32.log" 2>&1
    rc=$?
    keep_log build32 "$rc" $((SECONDS - t)) "$W/build32.log"
    run_32b "$rc"
  fi
  finish
  exit 0
fi

# how evenly the timed steps' tokens fall on the ranks (the data plan alone; seconds)
# shellcheck disable=SC2086 # NS is a list
"$PY" benchmarks/scaling_summary.py "${BAL[@]}" --ns $NS --steps "$STEPS" --skip "$SKIP" --extra "$W/facts.json" \
  >>"$RUNLOG" 2>&1 || say "WARNING: the rank token balance could not be computed (see runs.log)"

say "building the 7B model (random weights)"
t=$SECONDS
CUDA_VISIBLE_DEVICES=0 timeout 240 "${BUILD7[@]}" >"$W/build7.log" 2>&1
rc=$?
keep_log build7 "$rc" $((SECONDS - t)) "$W/build7.log"
[ "$rc" = 0 ] || say "ERROR: building the 7B model failed (rc $rc): its runs will fail; see runs.log"

# ------------------------------------------------------------------------------------------- 1. DDP 1, 2, 4
for n in $NS; do
  run "7b-ddp-$n" "$n" ddp "$TAG7" 180 "${ARGS7[@]}" "${COMMON[@]}"
done

# ------------------------------------------------------------------------------------------- 2. + 3. DeepSpeed
B32_PID=
if [ "$HAVE_DS" = 1 ] && [ "$RUN_32B" != 0 ] && [ "$NGPU" -ge 3 ] && [ "$(left)" -ge $((NEED_32B + 90 + RESERVE)) ]; then
  say "building the 32B model on GPU $BUILD32_GPU in the background (during the zero2 run)"
  (
    CUDA_VISIBLE_DEVICES=$BUILD32_GPU timeout $(($(left) - NEED_32B)) "${BUILD32[@]}" >"$W/build32.log" 2>&1
    echo $? >"$W/build32.rc"
  ) &
  B32_PID=$!
elif [ "$RUN_32B" != 0 ]; then
  skipped 32b-zero3-2 2 zero3 "$TAG32" \
    "deepspeed=$HAVE_DS, GPUs=$NGPU, $(left)s left (needs $((NEED_32B + 90 + RESERVE))s at this point)"
fi

if [ "$HAVE_DS" = 1 ]; then
  NOTE=
  [ -n "$B32_PID" ] && NOTE="ran while the 32B model was being built on another GPU"
  run 7b-zero2-2 2 zero2 "$TAG7" 200 "${ARGS7[@]}" "${COMMON[@]}" --deepspeed zero2
  NOTE=
else
  skipped 7b-zero2-2 2 zero2 "$TAG7" "deepspeed does not import"
fi

if [ -n "$B32_PID" ]; then
  t=$SECONDS
  wait "$B32_PID"
  rc=$(cat "$W/build32.rc" 2>/dev/null || echo 1)
  keep_log build32 "$rc" "waited $((SECONDS - t))" "$W/build32.log"
  run_32b "$rc"
fi

# ------------------------------------------------------------------------------------------- summary
finish
