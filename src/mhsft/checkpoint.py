"""Run directories and checkpoints: layout, atomic writes, rotation, resume lookup, and self-description.

Layout (ms-swift's): `output_dir/vN-YYYYMMDD-HHMMSS/{args.json, logging.jsonl, checkpoint-STEP/}`. Each
checkpoint holds the PEFT adapter (or full weights), the tokenizer, `args.json` naming the base model under
`model` (as ms-swift does, so our checkpoints and ms-swift's are read the same way), and the training
state needed to resume bit-for-bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

from mhsft.utils import UserError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
VERSION_RE = re.compile(r"^v(\d+)-\d{8}-\d{6}$")
STATE_FILE = "trainer_state.json"


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


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. A checkpoint counts only once its state file exists,
    and it is the last file written before the atomic rename."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def find_resume_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """`--resume_from_checkpoint auto`: the newest complete checkpoint of the newest run in output_dir that has
    one; a path: that checkpoint (checked)."""
    if spec == "auto":
        out = Path(output_dir)
        if not out.is_dir():
            return None
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
    any moment leaves either the complete checkpoint or none (a stale `.tmp-*` folder is ignored and cleaned)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=run_dir))
    try:
        write(tmp)
        _fsync_dir_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. final == last periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rotate_checkpoints(run_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`; never the newest, never `keep` (the best or resumed one)."""
    for stale in run_dir.glob(".tmp-checkpoint-*"):
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


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint_args(path: str | Path) -> dict:
    """The training arguments a checkpoint (ours or ms-swift's) carries: its own args.json, else the run's."""
    p = Path(path)
    for cand in (p / "args.json", p.parent / "args.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{cand}: unreadable args.json ({e})") from None
    return {}


def base_model_of(adapter_dir: str | Path) -> str | None:
    """The base model an adapter was trained on: args.json `model` (mhsft and ms-swift), else PEFT's
    adapter_config.json `base_model_name_or_path`."""
    args = read_checkpoint_args(adapter_dir)
    if args.get("model"):
        return str(args["model"])
    cfg = Path(adapter_dir) / "adapter_config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(dirpath, name), "rb+") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        _fsync_dir(Path(dirpath))


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


def load_training_state(ckpt: Path, model, optimizer, scheduler, scaler, args) -> int:
    import torch
    from safetensors.torch import load_file

    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    if args.train_type == "lora":
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
    """On resume, drop log lines past the checkpoint so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def deepspeed_state_dict(run) -> dict | None:
    """The weights to save under DeepSpeed, on the main process (None elsewhere); every rank must call this.
    ZeRO-3 partitions the weights over ranks. LoRA: only the trainable adapter weights are gathered (the frozen
    base is never needed; gathering it would copy a 32B model to one process). Full fine-tuning: accelerate's
    consolidated 16-bit state dict."""
    accelerator = run.accelerator
    if run.args.train_type == "lora":
        import deepspeed

        named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
        # a no-op for ZeRO-1/2, whose parameters are whole on every rank
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if not accelerator.is_main_process:
                return None
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    full = accelerator.get_state_dict(run.wrapped)
    return {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None


def save_checkpoint(run, step: int) -> Path:
    """Write `checkpoint-STEP` of a training run atomically (rank 0), then rotate old ones."""
    import torch

    args, accelerator, run_dir, config = run.args, run.accelerator, run.run_dir, run.config
    accelerator.wait_for_everyone()
    path = run_dir / f"checkpoint-{step}"
    state_dict = None
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        state_dict = deepspeed_state_dict(run)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)

        def write(tmp: Path):
            unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            run.tokenizer.save_pretrained(tmp)
            torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
            if run.scaler is not None:
                torch.save(run.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(save_rng_state(), tmp / "rng_state.pt")
            write_json(tmp / "args.json", config)
            # Written last: a checkpoint is complete exactly when this file exists.
            state = {"global_step": step, "total_steps": config["total_steps"], "train_type": args.train_type,
                     "base_model": args.model}  # fmt: skip
            write_json(tmp / STATE_FILE, state)

        path = atomic_checkpoint(run_dir, step, write)
        rotate_checkpoints(run_dir, args.save_total_limit)
    accelerator.wait_for_everyone()
    return path
