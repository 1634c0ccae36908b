"""Saving a training run's checkpoints and resuming from them: the run folder, atomic checkpoints, rotation, and
the training state (weights, optimizer, scheduler, loss scaler, RNG) that makes a resumed run log the same losses
as an uninterrupted one. The layout itself, which later stages read, is in mhsft.checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from mhsft.checkpoint import BEST_FILE, STATE_FILE, VERSION_RE, list_checkpoints
from mhsft.files import new_temp_dir, publish_dir, read_json, write_json, write_text
from mhsft.utils import UserError

END_KEY = "last_checkpoint"  # marks logging.jsonl's end-of-run line (which also names the best checkpoint)


def new_run_dir(output_dir: str | Path) -> Path:
    """`output_dir/vN-YYYYMMDD-HHMMSS` with N one past the highest existing version."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    versions = [int(m.group(1)) for p in out.iterdir() if (m := VERSION_RE.match(p.name))]
    n = max(versions, default=-1) + 1
    while True:
        run = out / f"v{n}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            run.mkdir()
            return run
        except FileExistsError:  # two runs started in the same second
            n += 1


def find_resume_checkpoint(spec: str, output_dir: str | Path, add_version: bool = True) -> Path | None:
    """`--resume_from_checkpoint auto`: the newest complete checkpoint of the newest run in output_dir that has
    one (with `--add_version false`, of output_dir itself, where such runs write); a path: that checkpoint
    (checked)."""
    if spec == "auto":
        out = Path(output_dir)
        if not out.is_dir():
            return None
        if not add_version:
            return (list_checkpoints(out) or [None])[-1]
        runs = sorted(
            (p for p in out.iterdir() if VERSION_RE.match(p.name)),
            key=lambda p: int(p.name[1:].split("-")[0]),
        )
        for run in reversed(runs):
            ckpts = list_checkpoints(run)
            if ckpts:
                return ckpts[-1]
        return None
    p = Path(spec)
    if not (p / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {spec}: not a complete mhsft checkpoint (no {STATE_FILE})")
    return p


def atomic_checkpoint(run_dir: Path, step: int, write) -> Path:
    """Call `write(tmp_dir)` then rename the temp folder to `checkpoint-STEP` in one step, so that a kill at
    any moment leaves either the complete checkpoint or none (a stale `.tmp-*` folder is ignored and cleaned).
    Re-saving a step (the final step after a periodic save of it) replaces the old folder the same way."""
    final = run_dir / f"checkpoint-{step}"
    tmp = new_temp_dir(final, prefix=f".tmp-checkpoint-{step}-")
    try:
        write(tmp)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rotate_checkpoints(run_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`; never the newest, never `keep` (the best one), so that
    `--save_total_limit 1` keeps two folders while the best is not the newest (as transformers does)."""
    for stale in [*run_dir.glob(".tmp-checkpoint-*"), *run_dir.glob(".checkpoint-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if not limit or limit < 1:
        return []
    ckpts = list_checkpoints(run_dir)
    removed = []
    excess = len(ckpts) - limit
    for p in ckpts[:-1]:
        if excess <= 0:
            break
        if keep is not None and p.resolve() == keep.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        excess -= 1
    return removed


def save_rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(ckpt: Path, model, optimizer, scheduler, scaler, train_type: str) -> int:
    """Restore a checkpoint's weights, optimizer, scheduler, scaler and RNG; returns its step."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    if train_type == "lora":
        from peft import set_peft_model_state_dict

        weights = load_file(str(ckpt / "adapter_model.safetensors"))
        res = set_peft_model_state_dict(model, weights)
        if getattr(res, "unexpected_keys", None):
            raise UserError(f"{ckpt}: adapter does not match this LoRA configuration")
    else:
        # full weights as save_pretrained wrote them (one file or shards), loaded one shard at a time
        shards = sorted(ckpt.glob("model*.safetensors"))
        if not shards:
            raise UserError(f"{ckpt}: no model*.safetensors to resume full fine-tuning from")
        for f in shards:
            model.load_state_dict(load_file(str(f)), strict=False)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=False))
    load_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=False))
    return int(state["global_step"])


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint, and the end line of a run that had finished, so the log
    reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and row.get("step", 0) <= step and END_KEY not in row:
            keep.append(line)
    write_text(path, "".join(line + "\n" for line in keep))


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json: its step, and what the run's best-checkpoint and early-stopping
    bookkeeping was at that step (restored on resume)."""
    return read_json(ckpt / STATE_FILE)


def sync_best_file(run_dir: Path, record: dict | None) -> None:
    """best.json as the trainer's state says (written atomically), or none when no checkpoint is best yet (a
    resumed run's earlier best.json may name a checkpoint it is about to overwrite)."""
    if record is None:
        (run_dir / BEST_FILE).unlink(missing_ok=True)
    else:
        write_json(run_dir / BEST_FILE, record)


def deepspeed_state_dict(accelerator, model, wrapped, train_type: str) -> dict | None:
    """The weights to save under DeepSpeed, on the main process (None elsewhere); every rank must call this.
    ZeRO-3 partitions the weights over ranks. LoRA: only the trainable adapter weights are gathered (the frozen
    base is never needed; gathering it would copy a 32B model to one process). Full fine-tuning: accelerate's
    consolidated 16-bit state dict of `wrapped` (the model inside its loss module)."""
    if train_type == "lora":
        import deepspeed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # a no-op for ZeRO-1/2, whose parameters are whole on every rank
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if not accelerator.is_main_process:
                return None
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    full = accelerator.get_state_dict(wrapped)
    return {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None


def save_checkpoint(
    accelerator, run_dir: Path, step: int, *, model, wrapped, tokenizer, optimizer, scheduler, scaler,
    config: dict, save_total_limit: int | None, progress: dict | None = None, keep: Path | None = None,
) -> Path:  # fmt: skip
    """Write `checkpoint-STEP` of a training run atomically (rank 0), then rotate old ones, never `keep` (the best).
    `config` is the run's args.json (it names the base model and the training type); `progress` goes into the
    state file (the best checkpoint and early-stopping counter so far)."""
    import torch

    accelerator.wait_for_everyone()
    path = run_dir / f"checkpoint-{step}"
    state_dict = None
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        state_dict = deepspeed_state_dict(accelerator, model, wrapped, config["train_type"])
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)

        def write(tmp: Path):
            unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            torch.save(save_rng_state(), tmp / "rng_state.pt")
            write_json(tmp / "args.json", config)
            # Written last: a checkpoint is complete exactly when this file exists.
            state = {"global_step": step, "total_steps": config["total_steps"], "train_type": config["train_type"],
                     "base_model": config["model"], **(progress or {})}  # fmt: skip
            write_json(tmp / STATE_FILE, state)

        path = atomic_checkpoint(run_dir, step, write)
        rotate_checkpoints(run_dir, save_total_limit, keep=keep)
    accelerator.wait_for_everyone()
    return path
