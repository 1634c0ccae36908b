"""The numeric check of `mhsft export --verify`: logits of base + adapter through PEFT (the reference) against the
merged model loaded by transformers alone, on a few packaged demo dialogues.

The two models are loaded one after the other, never together, so the check needs memory for one model: in
float32 when that fits (the cleanest comparison: only the merge and its storage dtype differ), else in half
precision (bfloat16 on a CPU, the merge dtype on a GPU), else on the first layers that fit (the model is truncated with `num_hidden_layers`, which checks the
embeddings, those layers, the final norm and the head; a notice says so).
"""

from __future__ import annotations

import gc
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from mhsft.builtin import demo_corpus_path
from mhsft.data.readers import iter_file
from mhsft.data.schema import Dialogue
from mhsft.utils import UserError

# Verification tolerance on the max |logit difference|: atol + rtol * max|reference logit| (doubled when the
# passes run in half precision, see `tolerance`). In float32 only summation order differs (~1e-7 relative per
# operation). Storing W + dW in half precision rounds every merged weight afresh (up to 2^-11 relative in float16,
# 2^-8 in bfloat16), the same error as casting a float32 model to that dtype. Measured here on random-weight Qwen2
# models (the tiny one and a 0.5B-shaped one, logits in float32): 2e-4 (float16) and 1.7e-3 (bfloat16) of the
# logit scale; the limits leave 4-25x headroom for deeper, trained models whose activation outliers amplify
# rounding (not measured here: no trained 7B is reachable from this machine). A merge bug (a missed module, a
# wrong scale, a transposed delta) moves logits by the adapter's whole effect, which is reported beside the
# difference so that the two can be compared.
TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (1e-4, 5e-3), "bfloat16": (1e-3, 3e-2)}


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
    """The limit for the coarser of the two dtypes, doubled when the forward passes themselves run in half
    precision (activations are rounded too: measured 1.1e-2 of the scale in bfloat16 vs 1.7e-3 in float32)."""
    coarse = max((merge_dtype, compute_dtype), key=lambda d: TOLERANCES[d][1])
    atol, rtol = TOLERANCES[coarse]
    k = 1 if compute_dtype == "float32" else 2
    return k * (atol + rtol * scale)


def verification_prompts(tokenizer, n: int = 3, max_tokens: int = 96) -> list[list[int]]:
    """The first `n` packaged demo dialogues, chat-templated and cut to `max_tokens` tokens."""
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
    sizes: dict[str, int], merge_dtype: str, num_layers: int, want_layers: int, device
) -> tuple[str, int, str | None]:
    """(compute dtype, layers to check, notice) so that ONE model fits in memory (the two passes run one after
    the other). float32 when it fits (the cleanest comparison), else half precision, else fewer layers."""
    import torch

    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        avail = psutil.virtual_memory().available
    budget = 0.8 * avail - 1e9  # activations, logits, the allocator's slack
    # numbers of parameters: one decoder layer, and everything outside the layers (embeddings, norm, head)
    per_layer = sum(n for name, n in sizes.items() if _layer_of(name) == 0)
    other = sum(n for name, n in sizes.items() if _layer_of(name) is None)
    layers = min(want_layers or num_layers, num_layers)
    # Half precision when float32 does not fit: bfloat16 on a CPU, whose float16 matmuls are ~6x slower (no
    # native kernels; 95 s vs 16 s on a 0.5B model), else the merge dtype.
    half = merge_dtype if device.type == "cuda" and merge_dtype != "float32" else "bfloat16"
    for dtype in ("float32", half):
        size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        if (other + layers * per_layer) * size <= budget:
            return dtype, layers, None
    size = torch.empty(0, dtype=getattr(torch, half)).element_size()
    fit = int((budget / size - other) // max(per_layer, 1))
    if fit < 1:
        return half, 0, None
    return (
        half,
        fit,
        f"verify: the model does not fit in memory ({avail / 1e9:.1f} GB free); checking its first {fit} of "
        f"{num_layers} layers",
    )


def _load_for_check(path: str, config, dtype, device):
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
    if device.type == "cuda":  # straight onto the GPU instead of through host memory
        kw["device_map"] = {"": str(device)}
    verbosity, bar = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # a layer subset leaves "unused weights" warnings: expected
    transformers.logging.disable_progress_bar()  # two loading bars would interleave with our log lines
    try:
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kw).to(device).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.logging.enable_progress_bar()


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

    device = device or torch.device("cpu")
    dtype = getattr(torch, compute_dtype)
    prompts = _check_prompts(merged_dir)
    refs, effect, scale, num_layers = _reference_logits(base_dir, adapter_dir, prompts, layers, dtype, device)
    diff = _merged_difference(merged_dir, prompts, refs, layers, dtype, device)
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


def _check_prompts(merged_dir: Path) -> list[list[int]]:
    """The demo dialogues in the merged model's own tokenizer and chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(merged_dir))
    except Exception as e:  # OSError (no tokenizer files), ValueError (unknown class)
        raise UserError(
            f"verify: the merged model has no usable tokenizer ({str(e).splitlines()[0]}); --verify false skips "
            "the check"
        ) from None
    prompts = verification_prompts(tok)
    if not prompts:
        raise UserError("verify: no prompt to check with (the packaged demo dialogues are missing)")
    return prompts


def _layer_config(path: Path, layers: int):
    """(the model's config cut to its first `layers` decoder layers, its own number of layers)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    num = cfg.num_hidden_layers
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    return cfg, num


def _reference_logits(
    base_dir: Path, adapter_dir: Path, prompts: list[list[int]], layers: int, dtype, device
):
    """(logits of base + adapter per prompt on the CPU, max |adapter effect|, max |logit|, the base's number of
    layers); the model is freed before returning, so that the merged one can take its memory."""
    import torch
    from peft import PeftModel

    cfg, num_layers = _layer_config(base_dir, layers)
    model = _load_for_check(str(base_dir), cfg, dtype, device)
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
    return refs, effect, scale, num_layers


def _merged_difference(
    merged_dir: Path, prompts: list[list[int]], refs: list, layers: int, dtype, device
) -> float:
    """Max |merged logit - reference logit| over the prompts (not finite when any difference is not)."""
    import torch

    cfg, _ = _layer_config(merged_dir, layers)
    merged = _load_for_check(str(merged_dir), cfg, dtype, device)
    diff = 0.0
    with torch.no_grad():
        for ids, ref in zip(prompts, refs):
            got = merged(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()
            d = float((got - ref).abs().max())
            diff = d if not math.isfinite(d) else max(diff, d)
    del merged
    gc.collect()
    return diff
