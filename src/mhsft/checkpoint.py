"""What a run, a checkpoint and an export folder hold, read by every stage that takes one as input.

Layout (ms-swift's): `output_dir/vN-YYYYMMDD-HHMMSS/{args.json, logging.jsonl, checkpoint-STEP/}`. Each
checkpoint holds the PEFT adapter (or full weights), the tokenizer, `args.json` naming the base model under
`model` (as ms-swift does, so our checkpoints and ms-swift's are read the same way), and the training
state needed to resume bit-for-bit; `trainer_state.json` is written last and marks it complete. A run that
validated also names its best checkpoint in `best.json` (`{"best_checkpoint": "checkpoint-N", "metric": ...,
"value": ...}`), which later stages take by default when given the run folder. An export
(`mhsft export`) is a plain transformers model folder whose `mhsft_export.json`, written last, says what was
merged. Writing checkpoints is the trainer's (mhsft.train.checkpointing); this module only reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from mhsft.files import read_json
from mhsft.utils import UserError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
VERSION_RE = re.compile(r"^v(\d+)-\d{8}-\d{6}$")
STATE_FILE = "trainer_state.json"  # a checkpoint's completion marker
EXPORT_META = "mhsft_export.json"  # an export's completion marker and description
BEST_FILE = "best.json"  # a run's best checkpoint by its validation metric


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. A checkpoint counts only once its state file exists,
    and it is the last file written before the atomic rename."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def read_best(run_dir: Path) -> dict | None:
    """The run's best.json (None when the run recorded no best: no validation set, or an older run)."""
    p = Path(run_dir) / BEST_FILE
    if not p.is_file():
        return None
    best = read_json(p)
    if not isinstance(best, dict) or not CKPT_RE.match(str(best.get("best_checkpoint"))):
        raise UserError(f"{p}: not a best-checkpoint record (no best_checkpoint: checkpoint-N)")
    return best


def choose_checkpoint(run_dir: Path) -> tuple[Path, str]:
    """The checkpoint a later stage takes from a run folder, and one line saying which and why: the best by the
    run's validation metric (best.json) when it recorded one, else the newest complete checkpoint."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"{run_dir}: no complete checkpoint in this run folder")
    best = read_best(run_dir)
    if best is not None:
        p = run_dir / best["best_checkpoint"]
        if p in ckpts:
            value = best.get("value")
            shown = f"{value:.6g}" if isinstance(value, (int, float)) else value
            return (
                p,
                f"{run_dir}: taking its best checkpoint, {p.name} ({best.get('metric')} {shown}, best.json)",
            )
        return ckpts[-1], (
            f"{run_dir}: best.json names {p.name}, which is not a complete checkpoint here: taking the newest, "
            f"{ckpts[-1].name}"
        )
    return ckpts[
        -1
    ], f"{run_dir}: no best checkpoint recorded (no validation): taking the newest, {ckpts[-1].name}"


def resolve_run_folder(path: Path) -> tuple[Path, str | None]:
    """A checkpoint as given, or a run folder's chosen checkpoint (choose_checkpoint) with its line. An output
    folder of runs (vN-...) is a one-line error naming the newest: which run is meant is the user's call."""
    path = Path(path)
    if not path.is_dir() or (path / "adapter_config.json").is_file() or (path / STATE_FILE).is_file():
        return path, None
    if any(CKPT_RE.match(c.name) for c in path.iterdir()):
        return choose_checkpoint(path)
    runs = sorted(
        (c for c in path.iterdir() if VERSION_RE.match(c.name)), key=lambda c: int(c.name[1:].split("-")[0])
    )
    if runs:
        raise UserError(f"{path} is an output folder of training runs: pass one of them, e.g. {runs[-1]}")
    return path, None


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


QUANT_KEYS = ("quant_method", "quant_bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
              "bnb_4bit_compute_dtype")  # fmt: skip


def quantization_of(adapter_dir: str | Path) -> dict:
    """The quantization flags an adapter's base was trained with (args.json; ms-swift writes the same names), or {}
    when its base was not quantized."""
    args = read_checkpoint_args(adapter_dir)
    if not args.get("quant_bits") and not args.get("quant_method"):
        return {}
    return {k: args[k] for k in QUANT_KEYS if args.get(k) is not None}


def adapter_weights_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise UserError(f"{path}: no adapter_model.safetensors (the adapter's weights are missing)")


def adapter_sha256(path: Path) -> str:
    """The identity of an adapter: its config and weights, byte for byte (an export records it)."""
    h = hashlib.sha256()
    for f in (path / "adapter_config.json", adapter_weights_file(path)):
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def export_matches(out: Path, adapter: Path, merge_dtype: str | None, base: str | None) -> bool:
    """Whether `out` is a complete export of exactly this adapter, in `merge_dtype` (None: any) and onto `base`
    (None: whichever base the checkpoint names), so that it can be reused instead of merged again."""
    if not (out / EXPORT_META).is_file():
        return False
    meta = read_json(out / EXPORT_META)
    return (
        meta.get("adapter_sha256") == adapter_sha256(adapter)
        and (merge_dtype is None or meta.get("merge_dtype") == merge_dtype)
        and (base is None or meta.get("base_model") == base)
    )
