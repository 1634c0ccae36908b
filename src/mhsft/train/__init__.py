"""`mhsft sft`: LoRA (or full) supervised fine-tuning with ms-swift's flags.

sft.py              the verb: arguments, setup, the loop (step, log, validate, save)
batches.py          each epoch's plan of micro-batches and the packed / padded collators
loss.py             the chunked LM-head + cross-entropy (full logits never built)
speedups.py         the measured speed paths switched on per run (LoRA update, Liger, compile, partial recompute)
fused_lora.py       Triton kernels: LoRA dropout whose mask is regenerated, not stored
checkpointing.py    run folders, atomic checkpoints, rotation, exact resume
tracking.py         SwanLab / TensorBoard / logging.jsonl, secrets kept out
progress.py         the one-line-per-logging-step numbers: tokens/s, memory, MFU, ETA
distributed.py      DDP and DeepSpeed ZeRO settings
"""
