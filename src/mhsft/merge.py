"""`mhsft export`: merge a LoRA adapter into its base model, shard by shard, and check the result numerically.

    mhsft export --ckpt_dir output/v0-.../checkpoint-508 --merge_lora true --merge_dtype float16 \
        --output_dir export/qwen-sft-7b

Why not PEFT's `merge_and_unload`: it needs the whole base model in memory (15 GB for a 7B in bf16, 64 GB for a
32B) while the merge itself is one line per weight, W' = W + scale * B @ A. Here the output is planned from the
base's safetensors headers alone, then each output shard is built one tensor at a time from the base files and
written before the next shard begins: peak memory is about one output shard (--max_shard_size) plus the adapter
plus one weight in float32, whatever the model's size. PEFT stays the reference: `--verify` loads base + adapter
through PEFT and compares its logits with those of the merged model loaded by transformers alone.

The output is a plain transformers model (loadable by vLLM, LMDeploy, ...): safetensors shards with their
index, config.json (dtype set, embeddings untied when the adapter changed one side of a tied pair),
generation_config.json, the tokenizer and chat template the adapter was trained with, the base model's LICENSE,
and `mhsft_export.json` describing the export (base, adapter, dtype, check, training arguments without secrets)
for `mhsft upload`'s model card. It is written into a hidden temporary folder beside the output and renamed into
place only once complete and verified, so an interrupted or failed export never leaves a folder that looks done.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.args import ModelArguments, parse_args
from mhsft.checkpoint import read_checkpoint_args, write_json
from mhsft.model import DTYPES, parse_adapters, resolve_model_dir
from mhsft.utils import UserError, get_logger

log = get_logger()

EXPORT_META = "mhsft_export.json"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# ModelScope expects this file in a model repo; ms-swift writes the same.
MODELSCOPE_CONFIGURATION = {"framework": "pytorch", "task": "text-generation", "allow_remote": True}
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
# Verification tolerance on the max |logit difference|: atol + rtol * max|reference logit|. Float32 differs only
# by summation order (~1e-7 relative per operation). Storing W + dW in half precision rounds every merged weight
# afresh (up to 2^-11 relative in float16, 2^-8 in bfloat16); over a 28-layer model these errors add up like a
# random walk to ~1e-3 (float16) / ~1e-2 (bfloat16) of the logit scale, and the max over 150k vocabulary entries
# and every position is a few times that. A merge bug (a missed module, a wrong scale, a transposed delta) moves
# logits by the adapter's whole effect, which is reported beside the difference so that the two can be compared.
TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (1e-3, 1e-2), "bfloat16": (1e-2, 5e-2)}
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


@dataclass
class ExportArguments(ModelArguments):
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "The LoRA checkpoint to merge (ours or ms-swift's); --ckpt_dir is the same flag."},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "Merge the adapter into the base model (the only export mhsft does)."}
    )
    merge_dtype: str | None = field(
        default=None,
        metadata={
            "help": "float16 | bfloat16 | float32 for the merged weights (default: --torch_dtype, else the "
            "base model's own dtype)."
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the merged model goes (default: CKPT_DIR-merged, as ms-swift)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    verify: bool = field(
        default=True,
        metadata={"help": "Compare logits of base + adapter (PEFT) and the merged model; fail above tolerance."},
    )
    verify_layers: int = field(
        default=0,
        metadata={
            "help": "Check only the first N decoder layers (0: all of them when the model fits in memory "
            "once, else as many as fit)."
        },
    )
    max_shard_size: str = field(
        default="5GB", metadata={"help": "Largest output shard; peak memory is about one shard."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the merged model afterwards (as `mhsft upload`)."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "ORG/NAME for --push_to_hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository private."})
    commit_message: str = field(default="upload with mhsft", metadata={"help": "Commit message for the upload."})


# ------------------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB elsewhere
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 1e6


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


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
        hint = " (only PyTorch .bin weights: convert them to safetensors first)" if any(
            base_dir.glob("*.bin")
        ) else ""
        raise UserError(f"{base_dir}: no model.safetensors or model.safetensors.index.json{hint}")
    out: dict[str, BaseTensor] = {}
    for name in files:
        path = base_dir / name
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(s.get_dtype())
                    if dtype is None:
                        raise UserError(f"{path}: tensor {key} has unsupported dtype {s.get_dtype()}")
                    out[key] = BaseTensor(path, dtype, tuple(s.get_shape()))
        except (OSError, RuntimeError, Exception) as e:  # safetensors raises its own SafetensorError
            if isinstance(e, UserError):
                raise
            raise UserError(f"{path}: cannot read the safetensors file ({str(e).splitlines()[0]})") from None
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from None


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


def adapter_weights_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise UserError(f"{path}: no adapter_model.safetensors (the adapter's weights are missing)")


def load_adapter(path: Path) -> Adapter:
    """A PEFT LoRA adapter (ours or ms-swift's) as low-rank deltas keyed by the base weight they change."""
    import torch
    from peft.utils.other import get_pattern_key

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
    wfile = adapter_weights_file(path)
    try:
        if wfile.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(wfile))
        else:
            state = torch.load(wfile, map_location="cpu", weights_only=True)
    except Exception as e:  # SafetensorError, pickle errors, truncated files
        raise UserError(f"{wfile}: cannot read the adapter weights ({str(e).splitlines()[0]})") from None

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
        elif "lora_magnitude_vector" in k:
            raise UserError(f"{path}: a DoRA adapter (lora_magnitude_vector): not supported by mhsft export")
        elif ".lora_" in k or "modules_to_save" in k or "trainable_tokens" in k:
            raise UserError(f"{wfile}: cannot merge tensor {key} (an adapter kind mhsft export does not handle)")
        else:  # modules_to_save: PEFT saves the trained copy under the original module's name
            replacements[k] = t

    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    deltas: dict[str, LoraDelta] = {}
    for module, f in factors.items():
        if "A" not in f or "B" not in f:
            raise UserError(f"{wfile}: {module} has only one of lora_A / lora_B (damaged adapter)")
        a, b = f["A"], f["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{wfile}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} don't chain")
        r = a.shape[0]
        expected_r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r_default)
        if r != expected_r:
            raise UserError(f"{path}: {module} has rank {r} but adapter_config.json says {expected_r}")
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[f"{module}.weight"] = LoraDelta(a, b, float(scale), bool(f["embedding"]))
    if not deltas and not replacements:
        raise UserError(f"{wfile}: the adapter holds no LoRA weights")
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return Adapter(path, cfg, deltas, replacements, nbytes)


def adapter_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in (path / "adapter_config.json", adapter_weights_file(path)):
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


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
        if name in adapter.deltas:
            d = adapter.deltas[name]
            got = (d.a.shape[1], d.b.shape[0]) if d.embedding else (d.b.shape[0], d.a.shape[1])
            t.delta = d
        else:
            t.replacement = adapter.replacements[name]
            got = tuple(t.replacement.shape)
        if tuple(got) != shape:
            raise UserError(
                f"{adapter.path}: {name} is {tuple(shape)} in the base model but {tuple(got)} in the adapter "
                "(is it the right base model?)"
            )
    return plan, untie


def out_dtype(src_dtype: str, merge_dtype: str) -> str:
    """Floating tensors take the merge dtype; integer buffers (rare) keep theirs."""
    return merge_dtype if src_dtype in ("float64", "float32", "float16", "bfloat16") else src_dtype


def write_weights(
    plan: list[OutTensor], base: dict[str, BaseTensor], out: Path, merge_dtype: str, max_shard_size: str
) -> dict:
    """Write the merged weights as safetensors shards, one shard in memory at a time."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open
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
        # Base files are opened per output shard and closed after it, so their mapped pages leave our memory.
        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}
            for name in names:
                t = by_name[name]
                src = base[t.source]
                if src.file not in handles:
                    handles[src.file] = stack.enter_context(safe_open(str(src.file), framework="pt"))
                dtype = getattr(torch, out_dtype(src.dtype, merge_dtype))
                if t.replacement is not None:
                    x = t.replacement.to(dtype)
                elif t.delta is not None:
                    w = handles[src.file].get_tensor(t.source).float()
                    w += t.delta.delta()
                    x = w.to(dtype)
                    del w
                    merged += 1
                else:
                    x = handles[src.file].get_tensor(t.source).to(dtype)
                if dtype == torch.float16 and not torch.isfinite(x).all():
                    raise UserError(
                        f"{name} overflows float16 once merged (values beyond +-65504): use --merge_dtype bfloat16"
                    )
                tensors[name] = x.contiguous()
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
        gc.collect()
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


def write_side_files(base_dir: Path, adapter_dir: Path, out: Path, merge_dtype: str, untie: bool) -> str:
    """config.json (dtype, tie), generation config, tokenizer + chat template, license. Returns where the
    tokenizer came from."""
    config = read_json(base_dir / "config.json")
    keys = [k for k in ("dtype", "torch_dtype") if k in config]
    if not keys:  # neither: write the name the installed transformers reads natively
        import transformers

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        keys = ["dtype" if (major, minor) >= (4, 56) else "torch_dtype"]
    for k in keys:
        config[k] = merge_dtype
    if untie:
        config["tie_word_embeddings"] = False
    config.pop("_name_or_path", None)
    write_json(out / "config.json", config)
    # The tokenizer the adapter was trained with (its checkpoint saved one), else the base model's.
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, out / name)
    if tok_src is adapter_dir and not (out / "tokenizer_config.json").is_file():
        raise UserError(f"{adapter_dir}: tokenizer files are incomplete")
    for p in base_dir.iterdir():
        if p.name == "generation_config.json" or (p.is_file() and p.name.upper().startswith(("LICENSE", "NOTICE"))):
            shutil.copy2(p, out / p.name)
    if (base_dir / "configuration.json").is_file():
        shutil.copy2(base_dir / "configuration.json", out / "configuration.json")
    else:
        write_json(out / "configuration.json", MODELSCOPE_CONFIGURATION)
    return str(tok_src)


# ------------------------------------------------------------------------------------------- verification
@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    logit_scale: float  # max |reference logit|
    adapter_effect: float  # max |logits with the adapter - logits without|
    compute_dtype: str
    layers_checked: int
    num_layers: int
    prompts: int
    tokens: int
    device: str

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance


def tolerance(merge_dtype: str, compute_dtype: str, scale: float) -> float:
    coarse = max((merge_dtype, compute_dtype), key=lambda d: TOLERANCES[d][1])
    atol, rtol = TOLERANCES[coarse]
    return atol + rtol * scale


def verification_prompts(tokenizer, n: int = 3, max_tokens: int = 96) -> list[list[int]]:
    """The first `n` packaged demo dialogues, chat-templated and cut to `max_tokens` tokens."""
    from mhsft.builtin import demo_corpus_path
    from mhsft.data.readers import iter_file
    from mhsft.data.schema import Dialogue

    out = []
    for d in iter_file(demo_corpus_path()):
        if not isinstance(d, Dialogue):
            continue
        text = tokenizer.apply_chat_template(d.to_messages(), tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
        if len(out) == n:
            break
    return out


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def verify_budget(
    plan: list[OutTensor], base: dict[str, BaseTensor], merge_dtype: str, num_layers: int, want_layers: int, device
) -> tuple[str, int, str | None]:
    """(compute dtype, layers to check, notice) so that ONE model fits in memory (the two passes run one after
    the other). float32 when it fits (the cleanest comparison), else the merge dtype, else fewer layers."""
    import torch

    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        avail = psutil.virtual_memory().available
    budget = 0.8 * avail - 1e9  # activations, logits, the allocator's slack
    per_layer = sum(base[t.source].numel for t in plan if _layer_of(t.name) == 0)
    other = sum(base[t.source].numel for t in plan if _layer_of(t.name) is None)
    layers = min(want_layers or num_layers, num_layers)
    for dtype in dict.fromkeys(("float32", merge_dtype)):
        size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        if (other + layers * per_layer) * size <= budget:
            return dtype, layers, None
    size = torch.empty(0, dtype=getattr(torch, merge_dtype)).element_size()
    fit = int((budget / size - other) // max(per_layer, 1))
    if fit < 1:
        return merge_dtype, 0, None
    return (
        merge_dtype,
        fit,
        f"verify: the model does not fit in memory ({avail / 1e9:.1f} GB free); checking its first {fit} of "
        f"{num_layers} layers",
    )


def _load_for_check(path: str, config, dtype, device):
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a layer subset leaves "unused weights" warnings: expected
    try:
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kw).to(device).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


def verify_merge(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    merge_dtype: str,
    compute_dtype: str,
    layers: int,
    device=None,
) -> VerifyResult:
    """Logits of base + adapter (PEFT) vs the merged model on the demo dialogues. The two models are loaded one
    after the other, so peak memory is one model in `compute_dtype`."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    device = device or torch.device("cpu")
    dtype = getattr(torch, compute_dtype)
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    prompts = verification_prompts(tok)
    if not prompts:
        raise UserError("verify: no prompt to check with (the packaged demo dialogues are missing)")

    def config_of(path: Path):
        cfg = AutoConfig.from_pretrained(str(path))
        num = cfg.num_hidden_layers
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:layers]
        return cfg, num

    cfg, num_layers = config_of(base_dir)
    model = _load_for_check(str(base_dir), cfg, dtype, device)
    verbosity = __import__("transformers").logging.get_verbosity()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about adapter weights of layers left out of a subset
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device).eval()
    refs, effect, scale = [], 0.0, 0.0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            ref = model(input_ids=x).logits.float()
            with model.disable_adapter():
                plain = model(input_ids=x).logits.float()
            effect = max(effect, float((ref - plain).abs().max()))
            scale = max(scale, float(ref.abs().max()))
            refs.append(ref.cpu())
            del plain
    del model
    gc.collect()

    cfg, _ = config_of(merged_dir)
    merged = _load_for_check(str(merged_dir), cfg, dtype, device)
    diff = 0.0
    with torch.no_grad():
        for ids, ref in zip(prompts, refs):
            got = merged(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()
            d = float((got - ref).abs().max())
            diff = d if not math.isfinite(d) else max(diff, d)
    del merged, refs
    gc.collect()
    __import__("transformers").logging.set_verbosity(verbosity)
    return VerifyResult(
        max_abs_diff=diff,
        tolerance=tolerance(merge_dtype, compute_dtype, scale),
        logit_scale=scale,
        adapter_effect=effect,
        compute_dtype=compute_dtype,
        layers_checked=layers,
        num_layers=num_layers,
        prompts=len(prompts),
        tokens=sum(len(p) for p in prompts),
        device=str(device),
    )


# ------------------------------------------------------------------------------------------- the export
@dataclass
class ExportResult:
    path: Path
    meta: dict


def _check_output(out: Path, overwrite: bool, sources: list[Path]) -> None:
    out_r = out.resolve()
    for s in sources:
        s_r = s.resolve()
        if out_r == s_r or out_r in s_r.parents:
            raise UserError(f"--output_dir {out} would replace {s}, which the export reads: choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} is not empty: pass --overwrite true to replace it")


def _clean_stale(out: Path) -> None:
    """Temp folders a killed export left beside the output (hidden, never mistaken for a model)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        log.info(f"removing {p}, left by an interrupted export")
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in [*root.iterdir(), root]:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder onto the output; an existing output is moved aside first."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_merged(
    base: str | None,
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    *,
    verify: bool = True,
    verify_layers: int = 0,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    use_hf: bool = False,
    token: str | None = None,
) -> ExportResult:
    """Merge `adapter` into `base` (None: the base the checkpoint names) and write a plain model to `out_dir`."""
    import torch

    t0 = time.perf_counter()
    adapter_dir = Path(adapter).expanduser()
    base_spec = base or _base_of(adapter_dir)
    base_dir = Path(resolve_model_dir(base_spec, use_hf=use_hf, token=token))
    out = Path(out_dir).expanduser()
    _check_output(out, overwrite, [adapter_dir, base_dir])
    config = read_json(base_dir / "config.json")
    base_tensors = read_base_tensors(base_dir)
    merge_dtype = DTYPES.get(str(dtype).lower().removeprefix("torch.")) if dtype else base_dtype(config, base_tensors)
    if merge_dtype is None:
        raise UserError(f"unknown --merge_dtype {dtype!r}: use float16, bfloat16 or float32")
    ad = load_adapter(adapter_dir)
    plan, untie = plan_merge(base_tensors, ad, config)
    base_bytes = sum(t.numel * torch.empty(0, dtype=getattr(torch, t.dtype)).element_size()
                     for t in base_tensors.values())  # fmt: skip
    log.info(
        f"merging {adapter_dir} into {base_spec} ({base_bytes / 1e9:.2f} GB, {len(ad.deltas)} LoRA modules"
        f"{f', {len(ad.replacements)} saved modules' if ad.replacements else ''}) as {merge_dtype}"
        + (" (untying the embeddings the adapter changed)" if untie else "")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        stats = write_weights(plan, base_tensors, tmp, merge_dtype, max_shard_size)
        merge_peak = peak_rss_mb()
        tok_src = write_side_files(base_dir, adapter_dir, tmp, merge_dtype, untie)
        del ad, plan
        gc.collect()
        check = None
        if verify:
            check = _verify(base_dir, adapter_dir, tmp, merge_dtype, verify_layers, config, base_tensors)
        from mhsft import __version__
        from mhsft.modelcard import public_args

        meta = {
            "mhsft_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_model": base_spec,
            "base_model_dir": str(base_dir),
            "adapter": str(adapter_dir.resolve()),
            "adapter_sha256": adapter_sha256(adapter_dir),
            "merge_dtype": merge_dtype,
            "lora": {
                k: read_json(adapter_dir / "adapter_config.json").get(k)
                for k in ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save", "rank_pattern",
                          "alpha_pattern")
            },  # fmt: skip
            "untied_embeddings": untie,
            "tokenizer_from": tok_src,
            **stats,
            "verify": check.__dict__ if check else None,
            "peak_rss_mb": {"merge": round(merge_peak), "total": round(peak_rss_mb())},
            "seconds": round(time.perf_counter() - t0, 1),
            "training_args": public_args(read_checkpoint_args(adapter_dir)),
        }
        write_json(tmp / EXPORT_META, meta)  # last: its presence marks a complete export
        _fsync_tree(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        f"wrote {out} ({stats['shards']} shard(s), {stats['total_size'] / 1e9:.2f} GB {merge_dtype}); peak memory "
        f"{meta['peak_rss_mb']['merge']:,} MB while merging, {meta['peak_rss_mb']['total']:,} MB overall"
    )
    return ExportResult(out, meta)


def _base_of(adapter_dir: Path) -> str:
    from mhsft.checkpoint import base_model_of

    base = base_model_of(adapter_dir)
    if not base:
        raise UserError(f"{adapter_dir}: the checkpoint does not name its base model; give --model")
    return base


def _verify(base_dir, adapter_dir, tmp, merge_dtype, verify_layers, config, base_tensors) -> VerifyResult | None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    num_layers = int(config.get("num_hidden_layers") or 0)
    plan_sizes = [OutTensor(k, k) for k in base_tensors]
    compute, layers, notice = verify_budget(plan_sizes, base_tensors, merge_dtype, num_layers, verify_layers, device)
    if notice:
        log.info(notice)
    if layers < 1:
        log.info(
            "verify: skipped, not even one layer of the model fits in the free memory; the merged weights were "
            "written unchecked (run the check on a machine with more memory: --verify true)"
        )
        return None
    part = "" if layers == num_layers else f", first {layers} of {num_layers} layers"
    log.info(f"verify: comparing logits of base + adapter (PEFT) and the merged model ({compute} on {device}{part})")
    try:
        check = verify_merge(base_dir, adapter_dir, tmp, merge_dtype, compute, layers, device)
    except torch.OutOfMemoryError:
        raise UserError("verify: out of memory; pass --verify_layers 1 (or fewer layers) or --verify false") from None
    line = (
        f"verify: max |logit difference| {check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g} for "
        f"{merge_dtype}; logits up to {check.logit_scale:.3g}, the adapter moves them by up to "
        f"{check.adapter_effect:.3g}) over {check.tokens} tokens of {check.prompts} dialogues"
    )
    if not check.ok:
        raise UserError(f"{line}: FAILED, nothing was written")
    log.info(line + ": ok")
    if check.adapter_effect <= check.tolerance:
        log.info(
            "verify: the adapter changes logits less than the tolerance, so this check cannot tell a merged "
            "adapter from a missing one (an untrained adapter?); --merge_dtype float32 checks to 1e-5"
        )
    return check


def merge_lora(
    base: str | None,
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = "float16",
    verify: bool = True,
    *,
    overwrite: bool = False,
    reuse: bool = False,
    max_shard_size: str = "5GB",
    use_hf: bool = False,
    token: str | None = None,
) -> Path:
    """Merge a LoRA checkpoint into its base model and return the merged folder (for engines that cannot apply
    LoRA, e.g. LMDeploy). `base=None` takes the base the checkpoint names; `dtype=None` the base's own dtype.
    `reuse=True` returns an existing export of the same adapter, base and dtype instead of redoing it."""
    out = Path(out_dir).expanduser()
    if reuse and (out / EXPORT_META).is_file():
        meta = read_json(out / EXPORT_META)
        want = DTYPES.get(str(dtype).lower()) if dtype else meta.get("merge_dtype")
        if (
            meta.get("adapter_sha256") == adapter_sha256(Path(adapter).expanduser())
            and meta.get("merge_dtype") == want
            and (base is None or meta.get("base_model") == base)
        ):
            log.info(f"reusing the merged model in {out}")
            return out
        overwrite = True  # a stale export of another adapter: replace it
    return export_merged(
        base,
        adapter,
        out,
        dtype,
        verify=verify,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        use_hf=use_hf,
        token=token,
    ).path


# ------------------------------------------------------------------------------------------- CLI
def _checkpoint_dir(args: ExportArguments) -> Path:
    if not args.adapters:
        raise UserError("give --ckpt_dir (or --adapters): the LoRA checkpoint to merge")
    if len(args.adapters) > 1:
        raise UserError("mhsft export merges one adapter: give a single --ckpt_dir")
    p = Path(args.adapters[0].partition("=")[2] or args.adapters[0]).expanduser()
    if p.is_dir() and not (p / "adapter_config.json").is_file():
        ckpts = sorted(
            (c for c in p.glob("checkpoint-*") if c.name.split("-")[-1].isdigit()),
            key=lambda c: int(c.name.split("-")[-1]),
        )
        if ckpts:
            raise UserError(f"--ckpt_dir {p} is a run folder: pass one of its checkpoints, e.g. {ckpts[-1]}")
        if (p / "config.json").is_file():
            raise UserError(f"--ckpt_dir {p} holds full model weights, not a LoRA adapter: nothing to merge")
    return Path(next(iter(parse_adapters([str(p)]).values())))


def main(argv: list[str]) -> int:
    args = parse_args(ExportArguments, argv, prog="mhsft export")
    if not args.merge_lora:
        raise UserError("mhsft export only merges LoRA adapters: pass --merge_lora true (the default)")
    ckpt = _checkpoint_dir(args)
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub true needs --hub_model_id ORG/NAME")
    dtype = args.merge_dtype or (args.torch_dtype if args.torch_dtype not in (None, "", "auto") else None)
    out = Path(args.output_dir) if args.output_dir else ckpt.parent / f"{ckpt.name}-merged"
    result = export_merged(
        args.model,
        ckpt,
        out,
        dtype,
        verify=args.verify,
        verify_layers=args.verify_layers,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        use_hf=args.use_hf,
        token=args.hub_token,
    )
    print(result.path)
    if args.push_to_hub:
        from mhsft.upload import publish

        publish(
            result.path,
            hub="huggingface" if args.use_hf else "modelscope",
            model_id=args.hub_model_id,
            private=args.hub_private_repo,
            commit_message=args.commit_message,
            token=args.hub_token,
        )
    return 0
