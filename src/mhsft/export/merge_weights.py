"""The weight-level half of `mhsft export`: plan the merged model from the base's safetensors headers, then
write it shard by shard, W' = W + scale * B @ A for every weight the LoRA adapter changes.

Why not PEFT's `merge_and_unload`: it needs the whole base model in memory (15 GB for a 7B in bf16, 64 GB for a
32B) while the merge itself is one line per weight. Here each output shard is built one tensor at a time from the
base files and written before the next shard begins, so peak memory is about one output shard (max_shard_size)
plus the adapter plus one weight in float32, whatever the model's size. Every output tensor, shape and name is
known (and checked against the adapter) before the first byte is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mhsft.checkpoint import adapter_weights_file
from mhsft.files import read_json, write_json
from mhsft.model import DTYPES
from mhsft.utils import UserError, get_logger, release_freed_memory

log = get_logger()

PEFT_PREFIX = "base_model.model."
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# Adapter options whose weights cannot be merged as W + scale * B @ A onto the unmodified base.
UNMERGEABLE = {
    "use_dora": "DoRA (use_dora) rescales each merged column by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) stores weights transposed",
    "layer_replication": "layer_replication changes the model's layers",
    "trainable_token_indices": "trainable_token_indices trains embedding rows separately",
    "target_parameters": "target_parameters adapts raw parameters (MoE experts)",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA is merged into a quantized model",
    "use_bdlora": "BD-LoRA stores block-diagonal factors",
}


# ------------------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB. On Linux from /proc (VmHWM): getrusage's ru_maxrss
    carries the parent's peak across fork + exec, so a child of a big process would report its parent's."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB elsewhere
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 1e6


def reset_peak_rss() -> None:
    """Restart the kernel's peak-memory count at the current size (Linux), so that the peak an export reports
    is its own even inside a long-running process (the deploy stage merges in its server process)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


# ------------------------------------------------------------------------------------------- base model
@dataclass
class BaseTensor:
    file: Path
    dtype: str  # torch dtype name
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_base_tensors(base_dir: Path) -> dict[str, BaseTensor]:
    """Every tensor of the base model (name -> file, dtype, shape) from the safetensors headers alone."""
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: unreadable safetensors index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = any(base_dir.glob("*.bin"))
        hint = " (only PyTorch .bin weights: convert them to safetensors first)" if bins else ""
        raise UserError(f"{base_dir}: no model.safetensors or model.safetensors.index.json{hint}")
    out: dict[str, BaseTensor] = {}
    bad: list[str] = []
    for name in files:
        path = base_dir / name
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                    s = f.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(s.get_dtype())
                    if dtype is None:
                        bad.append(f"{key} ({s.get_dtype()})")
                    out[key] = BaseTensor(path, dtype or "", tuple(s.get_shape()))
        except Exception as e:  # OSError, or safetensors' own SafetensorError for a damaged header
            raise UserError(f"{path}: cannot read the safetensors file ({str(e).splitlines()[0]})") from None
    if bad:
        raise UserError(f"{base_dir}: tensors of unsupported dtypes: {', '.join(bad[:3])}")
    return out


def base_dtype(config: dict, tensors: dict[str, BaseTensor]) -> str:
    """The dtype the base model declares (config.json), else the one its weights are stored in."""
    for key in ("dtype", "torch_dtype"):
        name = str(config.get(key) or "").removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    floats = [t.dtype for t in tensors.values() if t.dtype in ("float32", "float16", "bfloat16")]
    return max(set(floats), key=floats.count) if floats else "float32"


# ------------------------------------------------------------------------------------------- adapter
@dataclass
class LoraDelta:
    a: object  # torch.Tensor (r, in) or (r, num_embeddings) for embeddings
    b: object  # torch.Tensor (out, r) or (dim, r) for embeddings
    scale: float
    embedding: bool

    def delta(self):
        """scale * B @ A in float32, in the base weight's layout (PEFT's get_delta_weight)."""
        d = self.b.float() @ self.a.float()
        return (d.T if self.embedding else d) * self.scale


@dataclass
class Adapter:
    path: Path
    config: dict
    deltas: dict[str, LoraDelta]  # base weight name -> low-rank delta
    replacements: dict[str, object]  # base tensor name -> full tensor (PEFT modules_to_save)
    nbytes: int


def load_adapter(path: Path) -> Adapter:
    """A PEFT LoRA adapter (ours or ms-swift's) as low-rank deltas keyed by the base weight they change."""
    cfg = _mergeable_config(path)
    wfile = adapter_weights_file(path)
    state = _read_adapter_state(wfile)
    factors, replacements = _split_state(state, path, wfile)
    deltas = _lora_deltas(factors, cfg, path, wfile)
    if not deltas and not replacements:
        raise UserError(f"{wfile}: the adapter holds no LoRA weights")
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return Adapter(path, cfg, deltas, replacements, nbytes)


def _mergeable_config(path: Path) -> dict:
    """adapter_config.json, refused when it describes an adapter that W + scale * B @ A does not merge."""
    cfg = read_json(path / "adapter_config.json")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"{path}: a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged")
    for key, why in UNMERGEABLE.items():
        if cfg.get(key):
            raise UserError(f"{path}: cannot merge this adapter: {why} (not supported by mhsft export)")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "olora", "loftq", "corda")):
        raise UserError(
            f"{path}: init_lora_weights={init} changed the base weights at initialisation; convert the adapter "
            "to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    return cfg


def _read_adapter_state(wfile: Path) -> dict:
    import torch

    try:
        if wfile.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(wfile))
        return torch.load(wfile, map_location="cpu", weights_only=True)
    except Exception as e:  # SafetensorError, pickle errors, truncated files
        raise UserError(f"{wfile}: cannot read the adapter weights ({str(e).splitlines()[0]})") from None


def _split_state(
    state: dict, path: Path, wfile: Path
) -> tuple[dict[str, dict[str, object]], dict[str, object]]:
    """(module -> its lora A and B factors and whether it is an embedding, base tensor name -> replacement)."""
    factors: dict[str, dict[str, object]] = {}
    replacements: dict[str, object] = {}
    for key, t in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise UserError(f"{wfile}: unexpected tensor {key} (not a PEFT LoRA adapter for a causal LM)")
        k = key[len(PEFT_PREFIX) :]
        if m := re.fullmatch(r"(.+)\.lora_(A|B)\.weight", k):
            factors.setdefault(m.group(1), {})[m.group(2)] = t
            factors[m.group(1)]["embedding"] = False
        elif m := re.fullmatch(r"(.+)\.lora_embedding_(A|B)", k):
            factors.setdefault(m.group(1), {})[m.group(2)] = t
            factors[m.group(1)]["embedding"] = True
        elif m := re.fullmatch(r"(.+)\.base_layer\.(weight|bias)", k):
            # save_embedding_layers: PEFT saved the adapted layer's base weight (the vocabulary may have been
            # resized); it replaces the base model's, and the delta goes on top of it.
            replacements[f"{m.group(1)}.{m.group(2)}"] = t
        elif "lora_magnitude_vector" in k:
            raise UserError(f"{path}: a DoRA adapter (lora_magnitude_vector): not supported by mhsft export")
        elif ".lora_" in k or "modules_to_save" in k or "trainable_tokens" in k:
            raise UserError(
                f"{wfile}: cannot merge tensor {key} (an adapter kind mhsft export does not handle)"
            )
        else:  # modules_to_save: PEFT saves the trained copy under the original module's name
            replacements[k] = t
    return factors, replacements


def _lora_deltas(
    factors: dict[str, dict[str, object]], cfg: dict, path: Path, wfile: Path
) -> dict[str, LoraDelta]:
    """Each module's factors with the scale its config gives it (rank and alpha patterns, rsLoRA), checked."""
    from peft.utils.other import get_pattern_key

    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    deltas: dict[str, LoraDelta] = {}
    for module, f in factors.items():
        if "A" not in f or "B" not in f:
            raise UserError(f"{wfile}: {module} has only one of lora_A / lora_B (damaged adapter)")
        a, b = f["A"], f["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(
                f"{wfile}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} don't chain"
            )
        r = a.shape[0]
        expected_r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r_default)
        if r != expected_r:
            raise UserError(f"{path}: {module} has rank {r} but adapter_config.json says {expected_r}")
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[f"{module}.weight"] = LoraDelta(a, b, float(scale), bool(f["embedding"]))
    return deltas


# ------------------------------------------------------------------------------------------- plan + write
@dataclass
class OutTensor:
    name: str  # name in the merged model
    source: str  # base tensor it starts from
    delta: LoraDelta | None = None
    replacement: object | None = None  # a modules_to_save tensor, used instead of the base one


def plan_merge(base: dict[str, BaseTensor], adapter: Adapter, config: dict) -> tuple[list[OutTensor], bool]:
    """The merged model's tensors in base order, and whether tied embeddings must be untied.

    Tied embeddings (Qwen2.5 up to 3B, the tiny model): the base stores only embed_tokens and lm_head reads the
    same matrix. A LoRA on either side changes only that side in PEFT's forward, so the merged model gets its own
    lm_head.weight and tie_word_embeddings=false; otherwise the tie (and the file size) is kept."""
    touched = set(adapter.deltas) | set(adapter.replacements)
    tied = bool(config.get("tie_word_embeddings", False))
    embed_keys = [k for k in base if k.endswith("embed_tokens.weight")]
    untie = False
    if tied and "lm_head.weight" not in base and len(embed_keys) == 1:
        pair = {"lm_head.weight", embed_keys[0]}
        if touched & pair:
            if adapter.config.get("ensure_weight_tying"):
                raise UserError(
                    f"{adapter.path}: ensure_weight_tying with an adapted embedding is not supported by "
                    "mhsft export"
                )
            untie = True
    plan = [OutTensor(k, k) for k in base]
    if untie:
        plan.append(OutTensor("lm_head.weight", embed_keys[0]))
    by_name = {t.name: t for t in plan}
    for name in sorted(touched):
        t = by_name.get(name)
        if t is None:
            raise UserError(
                f"{adapter.path}: the adapter changes {name.removesuffix('.weight')}, which the base model "
                "does not have (is it the right base model? --model overrides the one the checkpoint names)"
            )
        shape = base[t.source].shape
        if name in adapter.replacements:
            t.replacement = adapter.replacements[name]
            if tuple(t.replacement.shape) != shape:
                raise UserError(
                    f"{adapter.path}: {name} is {tuple(shape)} in the base model but {tuple(t.replacement.shape)} "
                    "in the adapter (a resized vocabulary, or another base model)"
                )
        if name in adapter.deltas:
            d = t.delta = adapter.deltas[name]
            got = (d.a.shape[1], d.b.shape[0]) if d.embedding else (d.b.shape[0], d.a.shape[1])
            if got != shape:
                raise UserError(
                    f"{adapter.path}: {name} is {tuple(shape)} in the base model but {got} in the adapter "
                    "(is it the right base model?)"
                )
    return plan, untie


def out_dtype(src_dtype: str, merge_dtype: str) -> str:
    """Floating tensors take the merge dtype; integer buffers (rare) keep theirs."""
    return merge_dtype if src_dtype in ("float64", "float32", "float16", "bfloat16") else src_dtype


def read_tensor(file: Path, key: str):
    """One tensor, its file opened for just this read: safetensors maps the file, and pages read through a
    mapping count as our memory until it is closed, so a handle kept open would hold a whole shard."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def write_weights(
    plan: list[OutTensor], base: dict[str, BaseTensor], out: Path, merge_dtype: str, max_shard_size: str
) -> dict:
    """Write the merged weights as safetensors shards, one shard in memory at a time."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    # Plan the shards from shapes alone (meta tensors hold no memory), with the same naming as transformers.
    meta = {
        t.name: torch.empty(base[t.source].shape, dtype=getattr(torch, out_dtype(base[t.source].dtype, merge_dtype)),
                            device="meta")
        for t in plan
    }  # fmt: skip
    try:
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    except ValueError as e:
        raise UserError(f"--max_shard_size {max_shard_size}: {e}") from None
    by_name = {t.name: t for t in plan}
    merged = 0
    for i, (filename, names) in enumerate(split.filename_to_tensors.items(), 1):
        tensors = {}
        for name in names:
            t = by_name[name]
            src = base[t.source]
            dtype = getattr(torch, out_dtype(src.dtype, merge_dtype))
            w = t.replacement if t.replacement is not None else read_tensor(src.file, t.source)
            if t.delta is not None:
                w = w.float()  # a copy when the base is half precision; in place below either way
                w = w.clone() if w is t.replacement else w
                w += t.delta.delta()
                x = w.to(dtype)
                del w
                merged += 1
                release_freed_memory(collect=False)  # the float32 copies just freed
            else:
                x = w.to(dtype)
            if dtype == torch.float16 and not torch.isfinite(x).all():
                raise UserError(
                    f"{name} overflows float16 once merged (values beyond +-65504): use --merge_dtype bfloat16"
                )
            tensors[name] = x.contiguous()
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        os.chmod(out / filename, 0o666 & ~_umask())  # safetensors creates its files private (0600)
        del tensors
        release_freed_memory()
        if split.is_sharded:
            log.info(f"wrote shard {i}/{len(split.filename_to_tensors)} {filename}")
    if split.is_sharded:
        write_json(
            out / "model.safetensors.index.json",
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename},
        )
    return {
        "shards": len(split.filename_to_tensors),
        "total_size": int(split.metadata["total_size"]),
        "merged_modules": merged,
        "replaced_modules": sum(t.replacement is not None for t in plan),
    }
