"""`mhsft sft`: LoRA (or full) supervised fine-tuning with ms-swift's flags.

Reads top to bottom: arguments -> checks that must fail before anything heavy -> data -> model -> loop -> save.
The loop is our own (not transformers' Trainer) so that the loss is the token-level mean over a whole
optimizer step, packing uses kernels that need no flash-attn package, and resume is exact.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mhsft.args import DataArguments, ModelArguments, args_to_dict, command_line, parse_args
from mhsft.checkpoint import (
    base_model_of,
    find_resume_checkpoint,
    load_training_state,
    new_run_dir,
    save_checkpoint,
    truncate_log,
    write_json,
)
from mhsft.packing import batch_to_device, collate, epoch_plan  # noqa: F401  (epoch_plan: benchmarks)
from mhsft.progress import format_line, log_metrics
from mhsft.tracking import Tracker, TrackingArguments, check_tracking
from mhsft.utils import UserError, get_logger

log = get_logger()


@dataclass
class SftArguments(ModelArguments, DataArguments, TrackingArguments):
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
            "help": "Tokens per LM-head + loss chunk; one chunk's float32 logits exist at a time (7B, 4 x 3072, "
            "no checkpointing, H100: peak 71.3 / 73.1 / 75.5 GiB at 1024 / 2048 / 4096)."
        },
    )
    use_liger_kernel: bool = field(
        default=False,
        metadata={"help": "Liger's fused RMSNorm / SwiGLU / RoPE kernels (needs liger-kernel)."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each decoder layer. Measured on an H100 (benchmarks/NOTES.md): no gain with "
            "checkpointing, and 20x slower without it at 2 x 3072 (it kept recompiling); --use_liger_kernel is faster."
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


# ----------------------------------------------------------------------------------------------- data
def render_samples(
    dialogues, tokenizer, max_length: int, system: str | None = None
) -> tuple[list[dict], dict]:
    """Chat-template each dialogue with assistant-only labels; count what truncation did."""
    import dataclasses

    from mhsft.data.render import render_dialogue

    samples, counts = [], {"dialogues": len(dialogues), "dropped_turn_pairs": 0, "cut": 0, "no_labels": 0}
    for d in dialogues:
        if system and not d.system:
            d = dataclasses.replace(d, system=system)
        r = render_dialogue(tokenizer, d, max_length)
        counts["dropped_turn_pairs"] += r.num_dropped_turns
        counts["cut"] += bool(r.truncated)
        if all(x == -100 for x in r.labels):
            counts["no_labels"] += 1
            continue
        samples.append({"input_ids": r.input_ids, "labels": r.labels, "source": d.source.where()})
    return samples, counts


# ----------------------------------------------------------------------------------------------- model
def choose_dtype(args: SftArguments, device) -> tuple[object, list[str]]:
    import torch

    notices = []
    if args.fp16:
        return torch.float16, notices
    if args.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notices.append("this GPU has no bfloat16: training in float16 with loss scaling instead")
            return torch.float16, notices
        return torch.bfloat16, notices
    if args.torch_dtype not in ("auto", None):
        return getattr(torch, args.torch_dtype), notices
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), notices
    return torch.float32, notices


def build_model(args: SftArguments, model_path: str, dtype, attn_impl: str, notices: list[str], device):
    from mhsft.distributed import zero3_enabled
    from mhsft.model import load_model

    # under ZeRO-3 the weights are partitioned onto each rank's GPU as they load (deepspeed.zero.Init), which a
    # device_map or a move would contradict
    device = None if zero3_enabled() else str(device)
    model = load_model(model_path, dtype=dtype, attn_impl=attn_impl, device=device)
    return prepare_model(model, args, notices)


def prepare_model(model, args: SftArguments, notices: list[str]):
    """Checkpointing and the LoRA (or full) trainable setup on a loaded model (the benchmark calls this too)."""
    from mhsft.kernels import partial_checkpointing, speedups

    model.config.use_cache = False
    if args.gradient_checkpointing:
        # transformers 5.2x renamed the API; 5.17 (the GPU image) only has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        partial_checkpointing(model, args.gradient_checkpointing_ratio)
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
    "CUDA out of memory. Try, in this order: a smaller --per_device_train_batch_size with a larger "
    "--gradient_accumulation_steps (same tokens per step); --gradient_checkpointing true; --deepspeed zero3 "
    "on several GPUs; a lower --max_length."
)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    args = parse_args(SftArguments, argv, prog="mhsft sft")
    train(args)
    return 0


def train(args: SftArguments) -> Path:
    """Run training; returns the final checkpoint directory."""
    # 1. Checks that must fail before anything heavy happens.
    if not args.model and not args.adapters and not args.resume_from_checkpoint:
        raise UserError("give --model (a hub id, a local directory, or builtin:tiny)")
    if not args.dataset:
        raise UserError("give --dataset (files, folders or hub ids; `#N` samples N records)")
    notices = check_tracking(args)
    for name in ("dataloader_num_workers", "dataset_num_proc"):
        if getattr(args, name) is not None:
            notices.append(f"--{name} has no effect in mhsft (accepted for ms-swift compatibility)")
    resume_ckpt = None
    if args.resume_from_checkpoint:
        resume_ckpt = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if resume_ckpt is None:
            notices.append(
                f"--resume_from_checkpoint auto: no checkpoint in {args.output_dir} yet, starting fresh"
            )
    if not args.model:
        args.model = base_model_of(resume_ckpt or args.adapters[0])
        if not args.model:
            raise UserError("cannot tell the base model from the checkpoint: give --model")

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from mhsft.distributed import deepspeed_plugin, zero3_enabled
    from mhsft.packing import choose_attention

    # cpu=True lets torchrun on a machine without GPUs run DDP over gloo (accelerate needs to be told)
    accelerator = Accelerator(deepspeed_plugin=deepspeed_plugin(args), cpu=not torch.cuda.is_available())
    device, is_main, world = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    if args.deepspeed and device.type != "cuda":
        notices.append(
            f"--deepspeed {args.deepspeed} needs CUDA GPUs: on {device.type} this runs as plain DDP"
        )
    if args.gradient_accumulation_steps is None:
        args.gradient_accumulation_steps = max(1, math.ceil(16 / args.per_device_train_batch_size / world))
    set_seed(args.seed)
    dtype, dtype_notes = choose_dtype(args, device)
    notices += dtype_notes

    # 2. Run directory: resuming continues the checkpoint's own run so that logs stay in one place.
    if resume_ckpt is not None:
        run_dir = resume_ckpt.parent
    elif args.add_version:
        run_dir = new_run_dir(args.output_dir) if is_main else None
        if world > 1:
            from accelerate.utils import broadcast_object_list

            run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    else:
        run_dir = Path(args.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)

    # 3. Data.
    from mhsft.data.loader import load_datasets
    from mhsft.model import load_tokenizer, resolve_model_dir

    model_path = resolve_model_dir(args.model, use_hf=args.use_hf, token=args.hub_token)
    tokenizer = load_tokenizer(model_path)
    data = load_datasets(
        args.dataset,
        fmt=args.dataset_format,
        use_hf=args.use_hf,
        seed=args.seed,
        strict=args.strict,
        val_specs=args.val_dataset,
        split_ratio=args.split_dataset_ratio,
        rejects_path=run_dir / "rejects.jsonl" if is_main else None,
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

    # 4. Model.
    attn_impl, attn_notice = choose_attention(device, args.packing, args.attn_impl)
    if attn_notice:
        notices.append(attn_notice)
    model = build_model(args, model_path, dtype, attn_impl, notices, device)
    if not zero3_enabled():
        model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def numel(p) -> int:  # a ZeRO-3 partitioned parameter holds only its shard; ds_numel is its full size
        return getattr(p, "ds_numel", p.numel())

    n_train, n_total = sum(numel(p) for p in trainable), sum(numel(p) for p in model.parameters())
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=fused,
    )
    per_epoch = math.ceil(
        len(epoch_plan(train_samples, 0, args)) / (args.gradient_accumulation_steps * world)
    )
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps))
    use_ds = accelerator.state.deepspeed_plugin is not None
    # DeepSpeed scales fp16 losses itself (its config's fp16 section)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and not use_ds else None
    from mhsft.loss import ChunkedLMLoss

    wrapped = ChunkedLMLoss(model, args.loss_chunk_size)
    wrapped.config = model.config  # accelerate sizes DeepSpeed's "auto" buckets from model.config.hidden_size
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)

    # 5. Resume: weights, optimizer, scheduler, RNG, and the position in the data.
    step = 0
    if resume_ckpt is not None:
        step = load_training_state(resume_ckpt, model, optimizer, scheduler, scaler, args)
        notices.append(f"resumed from {resume_ckpt} at step {step}")

    # 6. Describe the run before the first step.
    config = args_to_dict(args) | {
        "command": command_line(),
        "model_dir": model_path,
        "run_dir": str(run_dir),
        "trainable_parameters": n_train,
        "total_parameters": n_total,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attn_impl,
        "world_size": world,
        "total_steps": total_steps,
        "train_samples": len(train_samples),
        "val_samples": len(val_samples),
        "truncation": tcounts,
        "rejected_records": data.num_rejected,
        "mhsft_version": __import__("mhsft").__version__,
    }
    tracker = None
    if is_main:
        write_json(run_dir / "args.json", config)
        truncate_log(run_dir / "logging.jsonl", step)
        tracker = Tracker(run_dir, args, config)
        for n in notices:
            log.info(n)
        log.info(f"run directory: {run_dir}")
        log.info(
            f"{len(train_samples):,} training samples, {len(val_samples):,} validation; {n_train:,} trainable of "
            f"{n_total:,} parameters ({100 * n_train / n_total:.3f}%); {total_steps:,} steps of "
            f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x {world} "
            f"{'packed rows' if args.packing else 'samples'}"
        )

    # 7. The loop.
    try:
        run = Run(args, accelerator, model, wrapped, optimizer, scheduler, scaler, tokenizer, train_samples,
                  val_samples, run_dir, tracker, total_steps, per_epoch, config)  # fmt: skip
        final = run_loop(run, step)
    except torch.OutOfMemoryError:
        raise UserError(OOM_ADVICE) from None
    finally:
        if tracker is not None:
            tracker.finish()
    return final


@dataclass
class Run:
    """What `train` sets up and the loop uses."""

    args: SftArguments
    accelerator: Any
    model: Any
    wrapped: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    tokenizer: Any
    train_samples: list
    val_samples: list
    run_dir: Path
    tracker: Any
    total_steps: int
    per_epoch: int
    config: dict


def run_loop(run: Run, step: int) -> Path:
    args, accelerator, model, wrapped = run.args, run.accelerator, run.model, run.wrapped
    optimizer, scheduler, scaler, tokenizer = run.optimizer, run.scheduler, run.scaler, run.tokenizer
    train_samples, val_samples, tracker = run.train_samples, run.val_samples, run.tracker
    total_steps, per_epoch = run.total_steps, run.per_epoch
    import torch
    from tqdm import tqdm

    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    use_ds = accelerator.state.deepspeed_plugin is not None
    ga = args.gradient_accumulation_steps
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="training",
        unit="step",
        file=sys.stderr,
        disable=not is_main or not sys.stderr.isatty(),  # the step lines carry the progress in logs
        dynamic_ncols=True,
    )
    window = {"loss": 0.0, "tokens": 0, "label_tokens": 0, "t0": time.perf_counter(), "steps": 0}
    t_start, step_at_start = time.perf_counter(), step
    last_ckpt, grad_norm = None, float("nan")
    model.train()
    plans: dict[int, list] = {}  # the epoch's plan, computed once (packing a large dataset takes a while)
    while step < total_steps:
        epoch, in_epoch = divmod(step, per_epoch)
        if epoch not in plans:
            plans = {epoch: epoch_plan(train_samples, epoch, args)}
        plan = plans[epoch]
        per_step = ga * world
        group = plan[in_epoch * per_step : (in_epoch + 1) * per_step]
        if len(group) < per_step and world > 1:  # every rank needs the same number of micro-batches
            group = group + plan[: per_step - len(group)]
        mine = group[rank::world]
        batches = [collate(train_samples, mb, args, pad_id) for mb in mine]
        n_label = sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches)
        if world > 1:
            t = torch.tensor([n_label], device=device)
            n_label_all = int(accelerator.reduce(t, reduction="sum").item())
        else:
            n_label_all = n_label
        step_loss = torch.zeros((), dtype=torch.float64, device=device)  # read back once per logging step
        for i, b in enumerate(batches):
            # real tokens only: padding (unpacked batches) does not count towards tokens/s
            mask = b.get("attention_mask")
            window["tokens"] += int(mask.sum()) if mask is not None else int(b["input_ids"].numel())
            b = batch_to_device(b, device)
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
        if scaler is not None:
            scaler.unscale_(optimizer)
        if args.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], args.max_grad_norm
            )
            # DeepSpeed clips inside its own step and hands back no norm; a tensor is read at the logging step
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
        step += 1
        window["loss"] += step_loss
        window["label_tokens"] += n_label
        window["steps"] += 1
        bar.update(1)

        if step % args.logging_steps == 0 or step == total_steps:
            window["loss"] = float(window["loss"])
            metrics = log_metrics(run, window, step, float(grad_norm), t_start, step_at_start)
            if is_main:
                bar.write(format_line(metrics, total_steps))
                tracker.log(metrics, step)
            window = {"loss": 0.0, "tokens": 0, "label_tokens": 0, "t0": time.perf_counter(), "steps": 0}
        if val_samples and (step % args.eval_steps == 0 or step == total_steps):
            eval_loss = evaluate(args, wrapped, model, val_samples, pad_id, accelerator)
            if is_main:
                bar.write(f"step {step}: eval_loss {eval_loss:.4f}")
                tracker.log({"eval_loss": eval_loss, "step": step, "epoch": round(step / per_epoch, 4)}, step)
            model.train()
        if step % args.save_steps == 0 or step == total_steps:
            last_ckpt = save_checkpoint(run, step)
            if is_main:
                bar.write(f"saved {last_ckpt}")
    bar.close()
    if is_main:
        log.info(f"done: {step} steps; final checkpoint {last_ckpt}")
    return last_ckpt


def evaluate(args, wrapped, model, val_samples, pad_id, accelerator) -> float:
    """Token-mean validation loss."""
    import torch

    from mhsft.packing import collate_padded

    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    bs = args.per_device_eval_batch_size
    mine = list(range(len(val_samples)))[rank::world]
    with torch.no_grad():
        for i in range(0, len(mine), bs):
            b = collate_padded([val_samples[j] for j in mine[i : i + bs]], pad_id)
            total[1] += int((b["labels"][..., 1:] != -100).sum())
            b = batch_to_device(b, accelerator.device)
            total[0] += wrapped(**b).double()
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / max(total[1], 1))
