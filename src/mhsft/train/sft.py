"""`mhsft sft`: LoRA (or full) supervised fine-tuning with ms-swift's flags.

Reads top to bottom: arguments -> checks that must fail before anything heavy -> run folder -> data -> model and
optimizer -> the loop (step, log, validate, save). The loop is our own (not transformers' Trainer) so that the loss
is the token-level mean over a whole optimizer step, packing uses kernels that need no flash-attn package, and
resume is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mhsft import __version__
from mhsft.args import (
    DataArguments,
    ModelArguments,
    QuantArguments,
    args_to_dict,
    command_line,
    parse_args,
)
from mhsft.checkpoint import STATE_FILE, base_model_of
from mhsft.data.loader import load_datasets
from mhsft.data.render import IGNORE_INDEX, render_dialogue
from mhsft.files import write_json
from mhsft.folder_lock import LOCK_NAME, hold
from mhsft.model import load_model, load_tokenizer, parameter_count, quant_spec, resolve_model_dir
from mhsft.packed_attention import choose_attention
from mhsft.train import fp8, plan
from mhsft.train.batches import (
    batch_to_device,
    collate,
    collate_padded,
    count_label_tokens,
    epoch_plan,
    real_tokens,
)
from mhsft.train.checkpointing import (
    END_KEY,
    find_resume_checkpoint,
    load_training_state,
    new_run_dir,
    read_trainer_state,
    save_checkpoint,
    sync_best_file,
    truncate_log,
)
from mhsft.train.distributed import deepspeed_plugin, zero3_enabled
from mhsft.train.early_stopping import BestTracker, check_best_flags
from mhsft.train.loss import ChunkedLMLoss
from mhsft.train.plan import decoder_layers, set_recompute
from mhsft.train.progress import format_line, log_metrics
from mhsft.train.speedups import speedups
from mhsft.train.tracking import Tracker, TrackingArguments, check_tracking, login_swanlab
from mhsft.utils import UserError, get_logger

log = get_logger()


@dataclass
class SftArguments(ModelArguments, QuantArguments, DataArguments, TrackingArguments):
    train_type: str = field(default="lora", metadata={"help": "lora | full (ms-swift 4: --tuner_type)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules to adapt; all-linear excludes lm_head."},
    )
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "Start from this LoRA checkpoint (ours or ms-swift's)."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training set."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimizer steps (overrides epochs)."}
    )
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Rows (packed) or samples per micro-batch."}
    )
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Micro-batch for validation."})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per optimizer step (default: 16 / batch / GPUs, as ms-swift)."},
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak LR (default 1e-4 LoRA, 1e-5 full)."}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine | linear | constant."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming the LR up."})
    warmup_steps: int = field(
        default=0, metadata={"help": "Warm-up steps (overrides warmup_ratio when > 0)."}
    )
    packing: bool = field(default=False, metadata={"help": "Pack whole samples into rows of max_length."})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations to save memory."}
    )
    gradient_checkpointing_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Share of decoder layers that recompute (with --gradient_checkpointing); the rest keep "
            "their activations: faster, more memory."
        },
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "Train in bfloat16 (fp16 fallback on older GPUs)."}
    )
    fp16: bool | None = field(default=None, metadata={"help": "Train in float16 with loss scaling."})
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps."})
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most N checkpoints (never the newest)."}
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Validate every N steps (default: save_steps)."}
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "Validation metric that picks the best checkpoint (best.json): eval_loss (default; `loss` "
            "is the same) or eval_token_acc. The best is tracked whenever there is a validation set."
        },
    )
    greater_is_better: bool | None = field(
        default=None,
        metadata={"help": "Whether a larger metric is better (default: false for *loss, else true)."},
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={"help": "The run's final adapter is its best checkpoint, not its last (said in the log)."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after N evaluations in a row without improvement (transformers' semantics)."},
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={"help": "An improvement must exceed this to reset the early-stopping patience counter."},
    )
    logging_steps: int = field(default=5, metadata={"help": "One log line every N steps."})
    output_dir: str = field(default="output", metadata={"help": "Runs go to OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/."})
    add_version: bool = field(
        default=True, metadata={"help": "Put the run in a new vN-... folder of output_dir."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint dir, or auto (the newest in output_dir)."}
    )
    deepspeed: str | None = field(default=None, metadata={"help": "zero2 | zero3 | a DeepSpeed JSON config."})
    loss_chunk_size: int = field(
        default=2048,
        metadata={
            "help": "Tokens per LM-head + loss chunk; one chunk's float32 logits exist at a time (smaller: "
            "less memory, more launches)."
        },
    )
    use_liger_kernel: bool | None = field(
        default=None,
        metadata={
            "help": "Liger's fused RMSNorm / SwiGLU / RoPE kernels (default: on where CUDA, Triton and "
            "liger-kernel are there; false turns them off)."
        },
    )
    fp8: bool = field(
        default=False,
        metadata={
            "help": "FP8 (e4m3, one scale per row) matmuls for the frozen base weights of LoRA, on Hopper GPUs: "
            "faster, slightly less exact (the measured cost is in the README); LoRA stays bf16."
        },
    )
    auto_plan: bool = field(
        default=True,
        metadata={
            "help": "Choose how to run this configuration fastest on this card: the same rows per optimizer "
            "step, loss and schedule, split into micro-batches and recomputing layers as measured memory "
            "allows (false: run exactly as given)."
        },
    )
    plan_memory_gib: float | None = field(
        default=None,
        metadata={
            "help": "GPU memory the plan may use, enforced (default: what is free, less a margin); e.g. 78 "
            "picks and runs the plan of an 80 GB card."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each decoder layer (measured slower than --use_liger_kernel: "
            "benchmarks/NOTES.md)."
        },
    )
    system: str | None = field(
        default=None,
        metadata={"help": "System prompt for dialogues that have none (else the template's default)."},
    )
    dataloader_num_workers: int | None = field(
        default=None, metadata={"help": "Accepted for ms-swift compatibility; batches are built in-process."}
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Accepted for ms-swift compatibility; tokenization runs in one process."},
    )

    def __post_init__(self):
        if self.train_type not in ("lora", "full"):
            raise UserError(f"--train_type must be lora or full, not {self.train_type!r}")
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.train_type == "lora" else 1e-5
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        if self.max_length is None:
            self.max_length = 2048
        for name in ("per_device_train_batch_size", "logging_steps", "save_steps", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if self.fp8 and self.train_type != "lora":
            raise UserError("--fp8 quantizes frozen base weights: it needs --train_type lora")
        if self.fp8 and self.torch_compile:
            raise UserError(
                "--fp8 runs in mhsft's fused LoRA layers, which --torch_compile replaces: drop one"
            )
        if quant_spec(self) is not None:
            if self.train_type != "lora":
                raise UserError(
                    "--quant_bits trains LoRA on a frozen quantized base: it needs --train_type lora"
                )
            if self.fp8:
                raise UserError("--fp8 and --quant_bits both replace the base weights' matmuls: choose one")


# ----------------------------------------------------------------------------------------------- data
def render_samples(
    dialogues, tokenizer, max_length: int, system: str | None = None
) -> tuple[list[dict], dict]:
    """Chat-template each dialogue with assistant-only labels; count what truncation did."""
    samples, counts = [], {"dialogues": len(dialogues), "dropped_turn_pairs": 0, "cut": 0, "no_labels": 0}
    for d in dialogues:
        if system and not d.system:
            d = dataclasses.replace(d, system=system)
        r = render_dialogue(tokenizer, d, max_length)
        counts["dropped_turn_pairs"] += r.num_dropped_turns
        counts["cut"] += bool(r.truncated)
        if all(x == IGNORE_INDEX for x in r.labels):
            counts["no_labels"] += 1
            continue
        samples.append({"input_ids": r.input_ids, "labels": r.labels, "source": d.source.where()})
    return samples, counts


# ----------------------------------------------------------------------------------------------- model
def choose_dtype(args: SftArguments, device) -> tuple[object, list[str]]:
    """The base model's dtype (its weights and compute). A half precision asked for on the CPU is honoured, with
    a line saying so: args.json records it and the dtype of the trained weights, which is what checkpoints hold."""
    notices = []
    if args.fp16:
        dtype = torch.float16
    elif args.bf16:
        dtype = torch.bfloat16
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notices.append("this GPU has no bfloat16: training in float16 with loss scaling instead")
            return torch.float16, notices
    elif args.torch_dtype not in ("auto", None):
        dtype = getattr(torch, args.torch_dtype)
    elif device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), notices
    else:
        return torch.float32, notices
    if device.type == "cpu" and dtype != torch.float32:
        notices.append(
            f"no GPU: training on the CPU in {str(dtype).removeprefix('torch.')} as asked (the base model's "
            "weights and compute; usually many times slower than float32 on a CPU: leave --bf16 / --fp16 / "
            "--torch_dtype out for float32)"
        )
    return dtype, notices


def build_model(args: SftArguments, model_path: str, dtype, attn_impl: str, notices: list[str], device):
    # under ZeRO-3 the weights are partitioned onto each rank's GPU as they load (deepspeed.zero.Init), which a
    # device_map or a move would contradict
    device = None if zero3_enabled() else str(device)
    quant = quant_spec(args)
    if quant and zero3_enabled():
        raise UserError(
            "--quant_bits with --deepspeed zero3: ZeRO-3 cannot shard bitsandbytes weights (use DDP)"
        )
    model = load_model(model_path, dtype=dtype, attn_impl=attn_impl, device=device, quant=quant)
    if quant:
        model = prepare_kbit(model, dtype)
        kind = f"{quant['quant_type']}, double quantization" if quant["bits"] == 4 else "LLM.int8"
        name = str(dtype).removeprefix("torch.")
        notices.append(f"base model loaded in {quant['bits']} bits by bitsandbytes ({kind}); LoRA in {name}")
    return prepare_model(model, args, notices)


def prepare_kbit(model, dtype):
    """PEFT's k-bit preparation (frozen base, gradients through the quantized layers), then every parameter it
    upcast to float32 back in the training dtype unless that is float16: the float32 copies keep float16 training
    from overflowing, and under bfloat16 they only cost memory and speed (Qwen2.5-7B's embeddings and LM head: 4.4 GB
    more, and float32 activations after every norm, whose float32 weight promotes them)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if dtype not in (torch.float16, torch.float32):
        for p in model.parameters():
            if p.dtype == torch.float32:
                p.data = p.data.to(dtype)
    return model


def prepare_model(model, args: SftArguments, notices: list[str]):
    """Checkpointing and the LoRA (or full) trainable setup on a loaded model (the benchmark calls this too)."""
    model.config.use_cache = False
    if args.gradient_checkpointing:
        layers = len(decoder_layers(model))
        set_recompute(model, round(max(0.0, min(1.0, args.gradient_checkpointing_ratio)) * layers))
    if args.train_type == "full":
        return speedups(model, args, notices)
    from peft import LoraConfig, PeftModel, get_peft_model

    if args.adapters:
        adapter = resolve_adapter(args.adapters)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        notices.append(f"continuing from the LoRA adapter in {adapter}")
        return speedups(model, args, notices)
    targets = args.target_modules
    target = "all-linear" if targets in (["all-linear"], ["all_linear"], ["ALL"]) else targets
    cfg = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
    )
    return speedups(get_peft_model(model, cfg), args, notices)


def resolve_adapter(adapters: list[str]) -> str:
    if len(adapters) != 1:
        raise UserError("sft takes one --adapters checkpoint to continue from")
    p = Path(adapters[0])
    if not (p / "adapter_config.json").is_file():
        raise UserError(f"--adapters {p}: no adapter_config.json there (not a LoRA checkpoint)")
    return str(p)


def lr_lambda(args: SftArguments, total_steps: int):
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


OOM_ADVICE = (
    "CUDA out of memory. Unless --auto_plan false, the execution plan already tried this configuration with fewer "
    "rows per micro-batch and with every layer recomputing; what is left: a lower --max_length, --deepspeed "
    "zero3 on several GPUs, or another process's memory freed (nvidia-smi). With --auto_plan false: a smaller "
    "--per_device_train_batch_size with a larger --gradient_accumulation_steps, --gradient_checkpointing true."
)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    # expandable segments keep reserved memory close to allocated memory when micro-batches vary in length, which
    # is what lets the execution plan trust its measured peaks; set before CUDA starts, unless the user chose
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = parse_args(SftArguments, argv, prog="mhsft sft")
    train(args)
    return 0


def train(args: SftArguments) -> Path:
    """Run training; returns the final checkpoint directory (the best one with --load_best_model_at_end)."""
    with contextlib.ExitStack() as held:  # the run folder's lock, released however training ends
        return _train(args, held)


def _train(args: SftArguments, held: contextlib.ExitStack) -> Path:
    notices, resume_ckpt = preflight(args)
    accelerator = make_accelerator(args, notices)
    if accelerator.is_main_process:
        login_swanlab(args)
    if args.fp8 and (why := fp8.supported(accelerator.device)):  # before minutes of loading data and model
        raise UserError(why)
    dtype, dtype_notes = choose_dtype(args, accelerator.device)
    notices += dtype_notes
    # the model's download may fail (an id, the network): before a run folder exists
    model_path = resolve_model_dir(args.model, use_hf=args.use_hf, token=args.hub_token)
    run_dir = prepare_run_dir(args, resume_ckpt, accelerator, held)
    tokenizer = load_tokenizer(model_path)
    train_samples, val_samples, data_counts = load_samples(args, tokenizer, run_dir, accelerator, notices)
    attn_impl, attn_notice = choose_attention(accelerator.device, args.packing, args.attn_impl)
    if attn_notice:
        notices.append(attn_notice)
    model = build_model(args, model_path, dtype, attn_impl, notices, accelerator.device)
    if not zero3_enabled() and quant_spec(args) is None:  # bitsandbytes placed a quantized model as it loaded
        model.to(accelerator.device)
    first_epoch = epoch_plan(train_samples, 0, args)
    chosen, plan_line = decide_plan(args, model, train_samples, first_epoch, pad_id_of(tokenizer), accelerator,
                                    notices)  # fmt: skip
    world = accelerator.num_processes
    per_epoch = math.ceil(len(first_epoch) / (args.gradient_accumulation_steps * world))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
    wrapped, optimizer, scheduler, scaler = make_optimization(args, model, accelerator, dtype, total_steps)
    step = 0
    if (
        resume_ckpt is not None
    ):  # weights, optimizer, scheduler, RNG, and (through `step`) the place in the data
        step = load_training_state(resume_ckpt, model, optimizer, scheduler, scaler, args.train_type)
        notices.append(f"resumed from {resume_ckpt} at step {step}")
    config = describe_run(args, model, model_path, run_dir, dtype, attn_impl, world, total_steps, data_counts)
    config["plan"] = chosen.as_dict() | {"line": plan_line}
    tracker = start_logging(args, accelerator, run_dir, config, step, notices)
    try:
        return run_loop(
            args, accelerator, step, model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, tokenizer=tokenizer, train_samples=train_samples, val_samples=val_samples,
            run_dir=run_dir, tracker=tracker, total_steps=total_steps, per_epoch=per_epoch, config=config,
            chosen=chosen, may_retreat=args.auto_plan and world == 1 and not (args.deepspeed or args.torch_compile),
        )  # fmt: skip
    except torch.OutOfMemoryError:
        raise UserError(OOM_ADVICE) from None
    finally:
        if tracker is not None:
            tracker.finish()


# ----------------------------------------------------------------------------------------------- setup
def preflight(args: SftArguments) -> tuple[list[str], Path | None]:
    """Checks that must fail before anything heavy happens; returns the notices so far and the checkpoint to
    resume from (None: a fresh run). Fills in --model from the checkpoint when it was left out."""
    if not args.model and not args.adapters and not args.resume_from_checkpoint:
        raise UserError("give --model (a hub id, a local directory, or builtin:tiny)")
    if not args.dataset:
        raise UserError("give --dataset (files, folders or hub ids; `#N` samples N records)")
    notices = check_tracking(args)
    notices += check_best_flags(args, bool(args.val_dataset) or (args.split_dataset_ratio or 0) > 0)
    for name in ("dataloader_num_workers", "dataset_num_proc"):
        if getattr(args, name) is not None:
            notices.append(f"--{name} has no effect in mhsft (accepted for ms-swift compatibility)")
    resume_ckpt = None
    if args.resume_from_checkpoint:
        resume_ckpt = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, args.add_version)
        if resume_ckpt is None:
            notices.append(
                f"--resume_from_checkpoint auto: no checkpoint in {args.output_dir} yet, starting fresh"
            )
    if not args.model:
        args.model = base_model_of(resume_ckpt or args.adapters[0])
        if not args.model:
            raise UserError("cannot tell the base model from the checkpoint: give --model")
    return notices, resume_ckpt


def make_accelerator(args: SftArguments, notices: list[str]):
    """The accelerate process group (DDP or DeepSpeed), the default accumulation steps, and the seed."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # cpu=True lets torchrun on a machine without GPUs run DDP over gloo (accelerate needs to be told)
    accelerator = Accelerator(deepspeed_plugin=deepspeed_plugin(args), cpu=not torch.cuda.is_available())
    if args.deepspeed and accelerator.device.type != "cuda":
        notices.append(
            f"--deepspeed {args.deepspeed} needs CUDA GPUs: on {accelerator.device.type} this runs as plain DDP"
        )
    if args.gradient_accumulation_steps is None:
        world = accelerator.num_processes
        args.gradient_accumulation_steps = max(1, math.ceil(16 / args.per_device_train_batch_size / world))
    set_seed(args.seed)
    return accelerator


def prepare_run_dir(
    args: SftArguments, resume_ckpt: Path | None, accelerator, held: contextlib.ExitStack
) -> Path:
    """Resuming continues the checkpoint's own run, so that its logs stay in one place; else a new vN-... folder
    (made by the main process, its name sent to the others) or --output_dir itself with --add_version false.
    The main process locks the folder (mhsft.folder_lock) before anything is written into it: a second run into
    it stops there, naming this one."""
    if resume_ckpt is not None:
        run_dir = resume_ckpt.parent
    elif not args.add_version:
        run_dir = Path(args.output_dir)
    else:
        run_dir = new_run_dir(args.output_dir) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    if accelerator.is_main_process:
        if (
            resume_ckpt is None and args.add_version
        ):  # a new folder: gone again if the run ends before writing to it
            held.callback(
                _remove_if_unused, run_dir
            )  # after the lock's release (the stack unwinds last-in first)
        held.enter_context(hold(run_dir / LOCK_NAME, f"the run folder {run_dir}"))
        if resume_ckpt is not None and not (resume_ckpt / STATE_FILE).is_file():
            raise UserError(
                f"{resume_ckpt} was removed (by the run that held the folder?): run the command again"
            )
    return run_dir


def _remove_if_unused(run_dir: Path) -> None:
    """A run that failed before writing anything (a dataset that could not be fetched, an interrupt while the model
    loads) leaves no empty vN folder behind; one with rejected records or args.json stays, to be read."""
    if not run_dir.is_dir():
        return
    files = list(run_dir.iterdir())
    if all(p.name == LOCK_NAME or (p.name == "rejects.jsonl" and p.stat().st_size == 0) for p in files):
        for p in files:
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def load_samples(args: SftArguments, tokenizer, run_dir: Path, accelerator, notices: list[str]):
    """(training samples, validation samples, counts for args.json): read, validated (rejects to
    RUN/rejects.jsonl) and chat-templated."""
    data = load_datasets(
        args.dataset,
        fmt=args.dataset_format,
        use_hf=args.use_hf,
        seed=args.seed,
        strict=args.strict,
        val_specs=args.val_dataset,
        split_ratio=args.split_dataset_ratio,
        rejects_path=run_dir / "rejects.jsonl" if accelerator.is_main_process else None,
    )
    train_samples, tcounts = render_samples(data.train, tokenizer, args.max_length, args.system)
    val_samples, _ = render_samples(data.val, tokenizer, args.max_length, args.system)
    if not train_samples:
        raise UserError(
            "no trainable sample: every dialogue was rejected or lost its assistant turns to truncation"
        )
    if tcounts["no_labels"]:
        notices.append(
            f"{tcounts['no_labels']} dialogue(s) kept no assistant token within --max_length and are skipped"
        )
    counts = {"train_samples": len(train_samples), "val_samples": len(val_samples), "truncation": tcounts,
              "rejected_records": data.num_rejected}  # fmt: skip
    return train_samples, val_samples, counts


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def decide_plan(
    args: SftArguments, model, samples: list, epoch: list, pad_id: int, accelerator, notices: list[str]
):
    """The execution plan (mhsft.train.plan): probed on the fullest rows of the first epoch (no later micro-batch
    holds more tokens), agreed by every rank, applied to the model (its recomputing layers); returns (plan, the
    line that says it)."""
    device, world = accelerator.device, accelerator.num_processes
    rows = sorted((row for mb in epoch for row in mb),
                  key=lambda row: -sum(len(samples[i]["input_ids"]) for i in row))  # fmt: skip

    def fullest(b: int) -> dict:
        return batch_to_device(collate(samples, rows[:b], args, pad_id), device)

    def agree(peak: int | None) -> int | None:
        if world == 1:
            return peak
        import torch.distributed as dist

        t = torch.tensor([-1.0 if peak is None else float(peak)], dtype=torch.float64, device=device)
        worst = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(worst, op=dist.ReduceOp.MIN)  # -1 anywhere: a rank ran out of memory
        return None if worst.item() < 0 else int(t.item())

    trainable = [p for p in model.parameters() if p.requires_grad]
    # AdamW's two states per trainable parameter, and DDP's gradient buckets, exist only from the first real step
    extra = sum(p.numel() * p.element_size() for p in trainable) * (2 + (world > 1))
    model.train()
    chosen, why = plan.choose(args, model, fullest, training_loss(model, args), device, agree, extra)
    kernels = " + ".join(getattr(model, "mhsft_kernels", [])) or "no fused kernels"
    asked = plan.as_written(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                            args.gradient_checkpointing, args.gradient_checkpointing_ratio, chosen.layers)  # fmt: skip
    line = plan.describe(chosen, asked, world, args.max_length, kernels) + f"; {why}"
    notices.append(line)
    return chosen, line


def training_loss(model, args: SftArguments) -> ChunkedLMLoss:
    """The model inside its loss: chunked, or Liger's fused loss where speedups() chose it."""
    return ChunkedLMLoss(model, args.loss_chunk_size, getattr(model, "mhsft_fused_loss", None))


def make_optimization(args: SftArguments, model, accelerator, dtype, total_steps: int):
    """(model inside its loss module, optimizer, LR scheduler, fp16 loss scaler or None), prepared by accelerate."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=accelerator.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps))
    use_ds = accelerator.state.deepspeed_plugin is not None
    # DeepSpeed scales fp16 losses itself (its config's fp16 section)
    scaler = torch.amp.GradScaler(accelerator.device.type) if dtype == torch.float16 and not use_ds else None
    wrapped = training_loss(model, args)
    wrapped.config = model.config  # accelerate sizes DeepSpeed's "auto" buckets from model.config.hidden_size
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    return wrapped, optimizer, scheduler, scaler


def describe_run(args, model, model_path, run_dir, dtype, attn_impl, world, total_steps, data_counts) -> dict:
    """args.json: every argument (secrets masked) and what the run decided, written before the first step."""

    return args_to_dict(args) | {
        "command": command_line(),
        "model_dir": model_path,
        "run_dir": str(run_dir),
        "trainable_parameters": sum(parameter_count(p) for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(parameter_count(p) for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        # what the checkpoints store: LoRA weights stay float32 under a half-precision base (PEFT's mixed precision)
        "trainable_dtype": ",".join(
            sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
        ),
        "attention": attn_impl,
        "world_size": world,
        "total_steps": total_steps,
        **data_counts,
        "mhsft_version": __version__,
    }


def start_logging(
    args, accelerator, run_dir: Path, config: dict, step: int, notices: list[str]
) -> Tracker | None:
    """On the main process: args.json, the log cut back to the resumed step, the trackers, and what the run is
    about to do. Returns the tracker (None on the other ranks)."""
    if not accelerator.is_main_process:
        return None
    write_json(run_dir / "args.json", config)
    truncate_log(run_dir / "logging.jsonl", step)
    tracker = Tracker(run_dir, args, config)
    for n in notices:
        log.info(n)
    log.info(f"run directory: {run_dir}")
    log.info(
        f"precision: the base model in {config['dtype']}, the trained weights in {config['trainable_dtype']} "
        "(as each checkpoint saves them)"
    )
    n_train, n_total = config["trainable_parameters"], config["total_parameters"]
    log.info(
        f"{config['train_samples']:,} training samples, {config['val_samples']:,} validation; {n_train:,} trainable "
        f"of {n_total:,} parameters ({100 * n_train / n_total:.3f}%); {config['total_steps']:,} steps of "
        f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x {config['world_size']} "
        f"{'packed rows' if args.packing else 'samples'}"
    )
    return tracker


# ----------------------------------------------------------------------------------------------- the loop
def run_loop(
    args: SftArguments, accelerator, step: int, *, model, wrapped, optimizer, scheduler, scaler, tokenizer,
    train_samples: list, val_samples: list, run_dir: Path, tracker, total_steps: int, per_epoch: int, config: dict,
    chosen: plan.Plan, may_retreat: bool,
) -> Path:  # fmt: skip
    """Optimizer steps from `step` to `total_steps` (or an early stop): a logging line every --logging_steps,
    validation every --eval_steps, a checkpoint every --save_steps and at the end. Returns the final checkpoint
    (the best with --load_best_model_at_end)."""
    from tqdm import tqdm

    is_main = accelerator.is_main_process
    pad_id = pad_id_of(tokenizer)
    # the step lines carry the progress in logs; the bar is for a terminal
    quiet = not is_main or not sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", file=sys.stderr, disable=quiet)
    window = _new_window()
    t_start, step_at_start = time.perf_counter(), step
    last_ckpt, grad_norm = (run_dir / f"checkpoint-{step}" if step else None), float("nan")
    best = resume_best(args, run_dir, last_ckpt, is_main)
    flops_per_token = (6 if args.train_type == "full" else 4) * config["total_parameters"]
    model.train()
    plans: dict[int, list] = {}  # the epoch's plan, computed once (packing a large dataset takes a while)
    while step < total_steps and not best.should_stop:
        epoch, in_epoch = divmod(step, per_epoch)
        if epoch not in plans:
            plans = {epoch: epoch_plan(train_samples, epoch, args)}

        def split(b: int, group=plans[epoch], i=in_epoch) -> list[dict]:
            return step_batches(group, i, train_samples, args, accelerator, pad_id, b)

        (step_loss, n_label, n_tokens), chosen = guarded_step(
            split, chosen, may_retreat, model=model, accelerator=accelerator, wrapped=wrapped, scaler=scaler,
            step=step + 1, config=config, run_dir=run_dir, seq_len=args.max_length,
        )  # fmt: skip
        grad_norm = optimizer_step(
            model, optimizer, scheduler, scaler, accelerator, args.max_grad_norm, grad_norm
        )
        step += 1
        window["loss"] += step_loss
        window["label_tokens"] += n_label
        window["tokens"] += n_tokens
        window["steps"] += 1
        bar.update(1)
        if step % args.logging_steps == 0 or step == total_steps:
            window["loss"] = float(window["loss"])
            metrics = log_metrics(accelerator, window, step, total_steps=total_steps, per_epoch=per_epoch,
                                  lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                                  flops_per_token=flops_per_token, t_start=t_start, step_at_start=step_at_start)  # fmt: skip
            if is_main:
                bar.write(format_line(metrics, total_steps))
                tracker.log(metrics, step)
            window = _new_window()
        evals = None
        if val_samples and (step % args.eval_steps == 0 or step == total_steps):
            evals = evaluate(args, wrapped, model, val_samples, pad_id, accelerator)
            best.observe(evals[best.metric])
            if is_main:
                bar.write(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in evals.items()))
                tracker.log({**evals, "step": step, "epoch": round(step / per_epoch, 4)}, step)
            model.train()
        if step % args.save_steps == 0 or step == total_steps or best.should_stop:
            if evals is not None:  # an evaluation at a save competes for the best checkpoint
                best.consider(evals[best.metric], step)
            keep = run_dir / best.best_checkpoint if best.best_checkpoint else None
            last_ckpt = save_checkpoint(accelerator, run_dir, step, model=model, wrapped=wrapped, tokenizer=tokenizer,
                                        optimizer=optimizer, scheduler=scheduler, scaler=scaler, config=config,
                                        save_total_limit=args.save_total_limit, progress=best.state(), keep=keep)  # fmt: skip
            if is_main:
                sync_best_file(run_dir, best.record())  # after the checkpoint it names exists
                bar.write(f"saved {last_ckpt}")
    bar.close()
    return finish_run(args, run_dir, step, total_steps, last_ckpt, best, tracker if is_main else None)


def resume_best(args: SftArguments, run_dir: Path, resumed: Path | None, is_main: bool) -> BestTracker:
    """The best checkpoint and early-stopping counter as the resumed checkpoint saved them (fresh otherwise), and
    best.json rewritten to match: a kill between a checkpoint and its best.json, or a resume from an older
    checkpoint, must not leave best.json naming another state."""
    best = BestTracker.from_args(args)
    if resumed is not None:
        best.restore(read_trainer_state(resumed))
        if best.best_checkpoint and not (run_dir / best.best_checkpoint / STATE_FILE).is_file():
            log.info(f"the best checkpoint so far, {best.best_checkpoint}, is gone: the best starts afresh")
            best.best_value = best.best_step = None
    if is_main:
        sync_best_file(run_dir, best.record())
    return best


def finish_run(args: SftArguments, run_dir: Path, step: int, total_steps: int, last_ckpt: Path | None,
               best: BestTracker, tracker) -> Path | None:  # fmt: skip
    """The run's final adapter (the best with --load_best_model_at_end), said in the log, and logging.jsonl's
    end line naming the last, best and final checkpoints (`tracker` None: not the main process)."""
    final = (
        run_dir / best.best_checkpoint if args.load_best_model_at_end and best.best_checkpoint else last_ckpt
    )
    if tracker is None:
        return final
    if best.should_stop:
        log.info(
            f"early stopping: {best.metric} did not improve by more than {args.early_stopping_threshold} for "
            f"{best.patience} evaluations in a row; stopped at step {step} of {total_steps}"
        )
    if best.best_checkpoint:
        said = f"{best.best_checkpoint} ({best.metric} {best.best_value:.6g} at step {best.best_step}; best.json)"
        if not args.load_best_model_at_end:
            log.info(f"best checkpoint: {said}")
        elif final != last_ckpt:
            log.info(f"load_best_model_at_end: the final adapter is the best checkpoint, {said}, not the last one, "
                     f"{last_ckpt.name}")  # fmt: skip
        else:
            log.info(f"load_best_model_at_end: the last checkpoint is also the best, {said}")
    elif args.load_best_model_at_end:
        log.info("load_best_model_at_end: no checkpoint was evaluated (an empty validation set?): the final adapter "
                 "is the last checkpoint")  # fmt: skip
    tracker.log({END_KEY: last_ckpt.name if last_ckpt else None, "best_checkpoint": best.best_checkpoint,
                 "best_metric": best.best_value, "metric_for_best_model": best.metric if best.best_step else None,
                 "final_checkpoint": final.name if final else None, "early_stopped": best.should_stop}, step)  # fmt: skip
    log.info(f"done: {step} steps; final checkpoint {final}")
    return final


def _new_window() -> dict:
    """What one logging step sums: the loss (a device tensor, read back only when logged) and token counts."""
    return {"loss": 0.0, "tokens": 0, "label_tokens": 0, "t0": time.perf_counter(), "steps": 0}


def step_batches(
    plan: list, in_epoch: int, samples: list, args, accelerator, pad_id: int, micro_batch: int
) -> list[dict]:
    """This rank's collated micro-batches of the optimizer step `in_epoch` of the epoch `plan`, `micro_batch` rows
    each: the execution plan may split a step's rows more finely than the user's micro-batch, never differently
    (the same rows, in the same order, on the same rank)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = args.gradient_accumulation_steps * world
    group = plan[in_epoch * per_step : (in_epoch + 1) * per_step]
    if len(group) < per_step and world > 1:  # every rank needs the same number of micro-batches
        group = group + plan[: per_step - len(group)]
    rows = [row for mb in group[rank::world] for row in mb]
    return [
        collate(samples, rows[i : i + micro_batch], args, pad_id) for i in range(0, len(rows), micro_batch)
    ]


def guarded_step(
    split, current: plan.Plan, may_retreat: bool, *, model, accelerator, wrapped, scaler, step: int, config: dict,
    run_dir: Path, seq_len: int,
) -> tuple[tuple, plan.Plan]:  # fmt: skip
    """backward_step over this optimizer step's micro-batches (`split(rows per micro-batch)`) under the plan. The plan
    was measured on the fullest rows, yet the allocator's cache can outgrow its margin: on CUDA out of memory in a
    single-process planned run, the step's gradients are dropped, the RNG put back and the same rows run again
    under a plan that holds less (plan.retreat), said in one line and in args.json, kept for the rest of the run.
    Returns ((loss, labelled tokens, tokens), the plan now)."""
    while True:
        rng = plan.rng_state(accelerator.device)
        try:
            return backward_step(split(current.micro_batch), accelerator, wrapped, scaler), current
        except torch.OutOfMemoryError:
            if not may_retreat or plan.retreat(current) is None:
                raise
        # out of the except block: its traceback held the failed step's tensors
        plan.undo_step(model, accelerator.device, rng)
        new = plan.retreat(current)
        set_recompute(model, new.recompute_layers, new.remake_swiglu, new.mlp_layers)
        said = (
            f"plan: out of memory in step {step} under {current.split_text(seq_len)}; the step runs again, and the "
            f"rest of the run, as {new.split_text(seq_len)} (the same {new.rows_per_rank_step} rows per step)"
        )
        log.info(said)
        config["plan"] = new.as_dict() | {
            "line": f"{said}; before: {config['plan']['line']}",
            "retreated_at": step,
        }
        if accelerator.is_main_process:
            write_json(run_dir / "args.json", config)
        current = new


def backward_step(batches: list[dict], accelerator, wrapped, scaler) -> tuple:
    """Forward and backward over one optimizer step's micro-batches, with the loss of each token divided by the
    labelled tokens of the whole step on every rank: the token-level mean that accumulation must preserve.
    Returns (this rank's summed loss as a device tensor, its labelled tokens, its real tokens)."""
    world = accelerator.num_processes
    use_ds = accelerator.state.deepspeed_plugin is not None
    n_label = sum(count_label_tokens(b["labels"]) for b in batches)
    # real tokens only: padding (unpacked batches) does not count towards tokens/s
    n_tokens = sum(real_tokens(b) for b in batches)
    n_label_all = n_label
    if world > 1:
        t = torch.tensor([n_label], device=accelerator.device)
        n_label_all = int(accelerator.reduce(t, reduction="sum").item())
    step_loss = torch.zeros(
        (), dtype=torch.float64, device=accelerator.device
    )  # read back once per logging step
    for i, b in enumerate(batches):
        b = batch_to_device(b, accelerator.device)
        sync = i == len(batches) - 1
        ctx = accelerator.no_sync(wrapped) if not sync and world > 1 else contextlib.nullcontext()
        with ctx:
            loss_sum = wrapped(**b)
            # DDP averages gradients over ranks, so scale by world to get the global token mean.
            loss = loss_sum * world / max(n_label_all, 1)
            if scaler is not None:
                scaler.scale(loss).backward()
            elif use_ds:
                # DeepSpeed steps inside backward when told this is the step's last micro-batch; the loss is
                # already the step's token mean, so DeepSpeed must not divide it by the accumulation steps.
                accelerator.gradient_state._set_sync_gradients(sync)
                accelerator.backward(loss, scale_wrt_gas=False)
            else:
                accelerator.backward(loss)
        step_loss += loss_sum.detach().double()
    return step_loss, n_label, n_tokens


def optimizer_step(model, optimizer, scheduler, scaler, accelerator, max_grad_norm: float, grad_norm):
    """Clip, step, schedule, zero. Returns the gradient norm before clipping (a device tensor, read back at the
    logging step), or the previous one when not clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        # DeepSpeed clips inside its own step and hands back no norm
        grad_norm = (
            norm.detach() if isinstance(norm, torch.Tensor) else float("nan" if norm is None else norm)
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def evaluate(args, wrapped, model, val_samples, pad_id, accelerator) -> dict[str, float]:
    """Validation over every rank's share: eval_loss (the token mean) and eval_token_acc (the share of labelled
    tokens whose most likely prediction is the label; ms-swift's metric)."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, hits, labelled tokens
    bs = args.per_device_eval_batch_size
    mine = list(range(len(val_samples)))[rank::world]
    with torch.no_grad():
        for i in range(0, len(mine), bs):
            b = collate_padded([val_samples[j] for j in mine[i : i + bs]], pad_id)
            total[2] += count_label_tokens(b["labels"])
            b = batch_to_device(b, accelerator.device)
            total[:2] += wrapped(**b, count_hits=True).double()
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    n = max(float(total[2]), 1.0)
    return {"eval_loss": float(total[0]) / n, "eval_token_acc": float(total[1]) / n}
