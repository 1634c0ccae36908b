"""Find and load a model and its tokenizer: `builtin:tiny`, a local folder, or a hub id (ModelScope by
default, Hugging Face with `use_hf=True`). Every failure a user can cause (a typo in the id, no network,
a folder that is not a model) becomes a one-line UserError."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from types import SimpleNamespace

from mhsft.builtin import is_builtin, resolve_model
from mhsft.checkpoint import base_model_of, quantization_of, resolve_run_folder
from mhsft.utils import UserError, get_logger, hub_reachable, scrub

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float32": "float32",
}
BASE = None  # the adapter name that means "the base model, adapters off"
# A folder with a config, a tokenizer and this file but no weights: the weights are drawn at load time, seeded, on
# the target device (benchmarks/random_model.py writes such folders for speed work: a 32B model's 65 GB of random
# weights need neither a disk nor a copy through host memory).
RANDOM_INIT = "mhsft_random_init.json"
# ms-swift's --attn_impl names -> transformers' attn_implementation.
ATTN_IMPLS = {
    "flash_attn": "flash_attention_2",
    "flash_attention_2": "flash_attention_2",
    "sdpa": "sdpa",
    "eager": "eager",
    "flex_attention": "flex_attention",
}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return scrub(lines[0] if lines else type(e).__name__)


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith((".", "/", "~"))
        or "\\" in s
        or s.count("/") > 1
        or re.match(r"[A-Za-z]:", s) is not None
    )


def resolve_model_dir(model: str | None, use_hf: bool = False, token: str | None = None) -> str:
    """A local folder for `model`, downloading hub ids into the hub's own cache."""
    if not model:
        raise UserError("no model given: pass --model (a hub id, a local folder, or builtin:tiny)")
    if is_builtin(model):
        return resolve_model(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"--model {model} is a file; pass the folder that holds config.json")
    if _looks_like_path(model) or not HUB_ID_RE.match(model):
        raise UserError(f"--model {model}: no such folder, and not a hub id like Qwen/Qwen2.5-7B-Instruct")
    return _download(model, use_hf, token)


def _download(model_id: str, use_hf: bool, token: str | None) -> str:
    hub = "Hugging Face" if use_hf else "ModelScope"
    # no network: answer from the client's cache, or fail in seconds instead of after its retries
    cached_only = not hub_reachable(use_hf)
    if not cached_only:
        get_logger().info(f"fetching {model_id} from {hub} (cached after the first time)")
    try:
        if use_hf:
            from huggingface_hub import snapshot_download

            return snapshot_download(model_id, token=token or None, local_files_only=cached_only)
        from modelscope import snapshot_download

        return snapshot_download(
            model_id,
            token=token or os.environ.get("MODELSCOPE_API_TOKEN") or None,
            local_files_only=cached_only,
        )
    except Exception as e:  # network, auth, not-found: each hub raises its own types
        other = "ModelScope (drop --use_hf)" if use_hf else "Hugging Face (--use_hf true)"
        raise UserError(
            f"cannot fetch model {model_id} from {hub}: {_first_line(e)} "
            f"(check the id and your network, try {other}, or pass a local folder)"
        ) from e


def load_tokenizer(model: str, use_hf: bool = False, token: str | None = None):
    """The model's tokenizer, with a pad token (the eos token when the model defines none)."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(model, use_hf, token)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError (missing files), ValueError (unknown class), json errors, ...
        raise UserError(f"cannot load a tokenizer from {path}: {_first_line(e)}") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str | None):
    """`auto` (the checkpoint's own dtype) or a torch dtype from a name like bfloat16 / fp16."""
    import torch

    if name in (None, "", "auto"):
        return "auto"
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"unknown --torch_dtype {name!r}: use auto, bfloat16, float16 or float32")
    return getattr(torch, DTYPES[key])


def attn_implementation(name: str | None) -> str | None:
    """transformers' attn_implementation for an ms-swift --attn_impl value (flash_attn falls back to sdpa
    with a notice when the flash-attn package is not installed)."""
    if name in (None, "", "auto"):
        return None
    if name.startswith("mhsft_packed_"):  # registered by mhsft.packing for packed rows
        return name
    impl = ATTN_IMPLS.get(name)
    if impl is None:
        raise UserError(
            f"unknown --attn_impl {name!r}: use one of {', '.join(sorted(set(ATTN_IMPLS) - {'flash_attention_2'}))}"
        )
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        get_logger().info("--attn_impl flash_attn: the flash-attn package is not installed; using sdpa")
        return "sdpa"
    return impl


def load_model(
    model: str,
    dtype: str | None = "auto",
    attn_impl: str | None = None,
    device: str | None = None,
    use_hf: bool = False,
    token: str | None = None,
    quant: dict | None = None,
):
    """A causal LM from `model` (builtin:tiny, folder or hub id), in `dtype`, optionally moved to `device`;
    `quant` (args.quant_spec) loads it quantized by bitsandbytes, placed on `device` as it loads."""
    import transformers
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(model, use_hf, token)
    kwargs: dict = {}
    # transformers renamed torch_dtype to dtype in 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype(dtype)
    impl = attn_implementation(attn_impl)
    if impl:
        kwargs["attn_implementation"] = impl
    if device and str(device).startswith("cuda"):
        # straight onto the GPU: a 7B model would otherwise pass through 15 GB of host memory first
        kwargs["device_map"] = {"": device}
    if quant:
        kwargs["quantization_config"] = bnb_config(quant, torch_dtype(dtype))
        kwargs["device_map"] = {"": device or "cpu"}  # bitsandbytes quantizes each weight where it lands
    try:
        if (Path(path) / RANDOM_INIT).is_file():
            m = _random_init(path, kwargs, device)
            if quant:
                _quantize_random(m, quant, kwargs["quantization_config"], device)
        else:
            m = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except UserError:
        raise
    except Exception as e:  # OSError (no weights), ValueError (unknown architecture), ImportError (kernels)
        hint = ""
        if quant:
            hint = f" (bitsandbytes {quant['bits']}-bit on {device or 'cpu'}: `python -m bitsandbytes` diagnoses it)"
        raise UserError(f"cannot load a causal LM from {path}: {_first_line(e)}{hint}") from e
    if quant:
        return m  # placed by bitsandbytes; an 8-bit model refuses `.to`
    if device:
        try:
            m = m.to(device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"cannot move the model to {device}: {_first_line(e)}") from e
    return m


def parameter_count(p) -> int:
    """A parameter's real size: a ZeRO-3 partitioned one holds only its shard (ds_numel is its full size), a
    bitsandbytes 4-bit one packs two weights a byte (its quant_state has the real shape)."""
    if getattr(p, "quant_state", None) is not None:
        import math

        return math.prod(p.quant_state.shape)
    return getattr(p, "ds_numel", p.numel())


def quant_spec(args) -> dict | None:
    """The quantization `args` ask for, checked and normalized (None: not quantized): {method, bits, quant_type,
    double_quant, compute_dtype}. `--quant_bits` alone means bitsandbytes, the only method there is (the flags: args.QuantArguments)."""
    method, bits = getattr(args, "quant_method", None), getattr(args, "quant_bits", None)
    if method is None and not bits:
        return None
    if method not in (None, "bnb", "bitsandbytes"):
        raise UserError(
            f"--quant_method {method}: mhsft quantizes through bitsandbytes only (--quant_method bnb)"
        )
    if bits not in (4, 8):
        raise UserError(f"--quant_method bnb needs --quant_bits 4 or 8 (got {bits})")
    if args.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise UserError(f"--bnb_4bit_quant_type must be nf4 or fp4, not {args.bnb_4bit_quant_type!r}")
    return {"method": "bnb", "bits": bits, "quant_type": args.bnb_4bit_quant_type,
            "double_quant": bool(args.bnb_4bit_use_double_quant), "compute_dtype": args.bnb_4bit_compute_dtype}  # fmt: skip


def bnb_config(quant: dict, dtype):
    """transformers' BitsAndBytesConfig for a quant_spec; the 4-bit matmuls run in --bnb_4bit_compute_dtype, else in
    the model's dtype (bfloat16 when that is auto)."""
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--quant_method bnb needs the bitsandbytes package: pip install bitsandbytes")
    if quant["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype(quant["compute_dtype"]) if quant["compute_dtype"] else dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant["quant_type"],
        bnb_4bit_use_double_quant=quant["double_quant"],
        bnb_4bit_compute_dtype=torch.bfloat16 if compute == "auto" else compute,
    )


def _random_init(path: str, kwargs: dict, device: str | None):
    """The model of a RANDOM_INIT folder with weights drawn from its seed on `device`, leaving the caller's RNG
    as it was (a trainer seeds its dropout before loading)."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    seed = json.loads((Path(path) / RANDOM_INIT).read_text(encoding="utf-8")).get("seed", 0)
    config = AutoConfig.from_pretrained(path)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("device_map", "quantization_config")}
    if kwargs.get("dtype", kwargs.get("torch_dtype")) == "auto":
        kwargs["dtype" if "dtype" in kwargs else "torch_dtype"] = (
            getattr(config, "torch_dtype", None) or "float32"
        )
    devices = [torch.device(device)] if device and str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, **kwargs).eval()  # as from_pretrained returns it


def _quantize_random(model, quant: dict, config, device: str | None) -> None:
    """A random-weight model (benchmarks only) made 4-bit as from_pretrained would: each decoder Linear becomes
    bitsandbytes' Linear4bit holding the drawn weight quantized by Params4bit, the LM head stays as it is, and the
    model carries transformers' quantization attributes (PEFT's k-bit preparation and LoRA dispatch read them).
    The bf16 model was held whole for this (61 GiB at 32B); a saved checkpoint's load never holds more than one
    bf16 tensor, so the peak counter restarts here and the run's logged peak is its own."""
    import bitsandbytes as bnb
    import torch

    if quant["bits"] != 4:
        raise UserError("a random-weight folder loads quantized in 4 bits only (--quant_bits 4)")
    dev = torch.device(device or "cpu")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is model.get_output_embeddings():
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=config.bnb_4bit_compute_dtype, compress_statistics=quant["double_quant"],
                                  quant_type=quant["quant_type"], device="meta")  # fmt: skip
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=quant["double_quant"],
                                         quant_type=quant["quant_type"], module=q).to(dev)  # fmt: skip
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q.train(child.training))
            del child
    model.config.quantization_config = config
    model.is_quantized = model.is_loaded_in_4bit = True
    model.quantization_method = config.quant_method
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def parse_adapters(adapters: list[str] | None) -> dict[str, str]:
    """`--adapters ckpt` or `--adapters name1=ckpt1 name2=ckpt2` -> {name: path}. An unnamed adapter is called
    `default` (PEFT's name), or after its folder when several are given. A training run's folder stands for its
    best checkpoint (best.json), else its newest, said in one line."""
    out: dict[str, str] = {}
    for spec in adapters or []:
        name, eq, path = spec.partition("=")
        if not eq:
            path = spec
            name = "default" if len(adapters) == 1 else Path(spec.rstrip("/")).name
        p, note = resolve_run_folder(Path(path).expanduser())
        if note:
            _say_once(note)
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"--adapters {spec}: no adapter_config.json in {p} (not a LoRA checkpoint)")
        if name in out:
            raise UserError(f"--adapters: the name {name!r} is used twice")
        out[name] = str(p)
    return out


@functools.cache
def _say_once(line: str) -> None:
    """A stage parses its --adapters more than once (names, base model, loading): the choice is said once."""
    get_logger().info(line)


def base_model_for(model: str | None, adapters: dict[str, str]) -> str:
    """`--model`, or the base model the (first) adapter names in its args.json (ours and ms-swift's)."""
    if model:
        return model
    for path in adapters.values():
        base = base_model_of(path)
        if base:
            return base
    raise UserError(
        "give --model, or --adapters pointing at a checkpoint whose args.json names its base model"
    )


def model_ids(model: str, adapters: list[str], served_model_name: str | None) -> dict[str, str | None]:
    """The names clients (and evaluations) use: model id -> adapter name (BASE: the base model). A single unnamed
    adapter is served as --served_model_name (default: its folder name) and the base model beside it under its
    own name; named adapters are served by name and the base as --served_model_name (default: the model's
    name)."""
    named = parse_adapters(adapters)
    base_name = Path(model.removeprefix("builtin:").rstrip("/")).name or model
    unnamed = len(adapters) == 1 and "=" not in adapters[0]
    out: dict[str, str | None] = {}
    if unnamed:
        ((name, path),) = named.items()
        out[served_model_name or Path(path.rstrip("/")).name] = name
    else:
        out.update({n: n for n in named})
    base_id = base_name if unnamed or not served_model_name else served_model_name
    if base_id in out:
        base_id += "-base"
    return {base_id: BASE, **out}


def inference_quant(args, adapters: dict[str, str]) -> dict | None:
    """How infer, deploy and eval load the base: as --quant_bits says when given (0: not quantized), else as the
    (first) adapter was trained, said in one line."""
    bits = getattr(args, "quant_bits", None)
    if bits == 0:
        return None
    if bits is not None or getattr(args, "quant_method", None):
        return quant_spec(args)
    for path in adapters.values():
        trained = quantization_of(path)
        if trained:
            defaults = {
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": None,
            }
            spec = quant_spec(SimpleNamespace(**(defaults | trained)))
            get_logger().info(
                f"loading the base model in {spec['bits']} bits, as {path} was trained (--quant_bits 0: unquantized)"
            )
            return spec
    return None


def load_for_inference(
    model: str | None,
    adapters: list[str] | None = None,
    dtype: str | None = "auto",
    attn_impl: str | None = None,
    device: str | None = None,
    use_hf: bool = False,
    token: str | None = None,
    quant: dict | None = None,
):
    """(model, tokenizer, adapter names) ready for generation: the base model with every adapter loaded under its
    name (PEFT), in eval mode. The tokenizer comes from the first adapter's checkpoint when it saved one (the chat
    template it was trained with), else from the base model."""
    import torch

    named = parse_adapters(adapters)
    base = base_model_for(model, named)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype in (None, "auto") and device == "cpu":
        dtype = "float32"  # half precision on a CPU is slow and imprecise
    m = load_model(
        base, dtype=dtype, attn_impl=attn_impl, device=device, use_hf=use_hf, token=token, quant=quant
    )
    tok_src = next((p for p in named.values() if (Path(p) / "tokenizer_config.json").is_file()), None)
    tok = load_tokenizer(tok_src or base, use_hf=use_hf, token=token)
    if named:
        from peft import PeftModel

        items = list(named.items())
        try:
            m = PeftModel.from_pretrained(m, items[0][1], adapter_name=items[0][0])
            for name, path in items[1:]:
                m.load_adapter(path, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(
                f"cannot load adapter onto {base}: {_first_line(e)} (is it the right base model?)"
            ) from e
    m.eval()
    return m, tok, list(named)
