"""Attention for packed rows: each token attends only to the earlier tokens of its own sample. The trainer packs
its batches (mhsft.train.batches) and the serving engine packs the questions it scores (mhsft.serve.scoring), so
both stages use it.

`register_packed_attention(backend)` registers a function in transformers' `AttentionInterface`
that reads the boundaries from the `cu_seq_lens_q`/`max_length_q` kwargs the collator emits (the names
transformers' own flash-attn path uses, which the model forwards to every attention layer), or failing
that derives them once per forward from position ids that restart at 0. Kernels, best first:
flash-attn's varlen kernel when the package is installed, torch's `varlen_attn` on CUDA (torch >= 2.10),
flex_attention with a document mask (CUDA), and on the CPU one causal SDPA call per sample. The flash
kernels take only half precision, so a float32 model on CUDA gets flex (or SDPA) instead.
Measured on an H100 (torch 2.11, transformers 5.17): varlen, flex and SDPA all match the per-sample run
(float32 logits to 1e-6, bf16 to bf16 noise).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ATTN_NAME_PREFIX = "mhsft_packed_"
log = logging.getLogger(__name__)
BACKENDS = ("flash_attn", "varlen", "flex", "sdpa")
BACKEND_LABELS = {
    "flash_attn": "flash-attn varlen",
    "varlen": "torch varlen_attn",
    "flex": "flex_attention with a document mask",
    "sdpa": "sdpa, one causal call per sample",
}


@functools.cache
def _flash_attn_varlen() -> Callable | None:
    try:
        return importlib.import_module("flash_attn").flash_attn_varlen_func
    except Exception:  # not installed, or built against another torch/CUDA: either way unusable
        return None


def _torch_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def _cuda_supports_varlen(device: torch.device) -> bool:
    # torch's varlen_attn runs its bundled flash kernel, which needs sm80 (Ampere) or newer
    return _torch_varlen_attn() is not None and torch.cuda.get_device_capability(device) >= (8, 0)


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def select_attn_backend(device: torch.device | str, requested: str | None = None) -> tuple[str, str | None]:
    """Pick the kernel for packed rows on `device`; `requested` is --attn_impl (None for the default).

    Returns (backend, notice): backend is one of BACKENDS, notice a one-line message for the trainer to
    print when the request could not be honoured as asked (None otherwise). Never raises on a missing
    kernel: packing always has the SDPA fallback."""
    device = torch.device(device)
    req = (requested or "").strip().lower()
    wants_flash = req.startswith("flash")
    if device.type == "cuda":
        if _flash_attn_varlen() is not None:
            best = "flash_attn"
        elif _cuda_supports_varlen(device):
            best = "varlen"
        elif _flex_available():
            best = "flex"
        else:
            best = "sdpa"
    else:
        best = "sdpa"
    backend = "flex" if req == "flex_attention" and best != "sdpa" and _flex_available() else best
    label = BACKEND_LABELS[backend]
    notice = None
    if wants_flash and backend != "flash_attn":
        why = "is not installed" if _flash_attn_varlen() is None else f"needs CUDA (device is {device.type})"
        notice = f"flash_attn {why}; packing uses {label}"
    elif req == "flex_attention" and backend != "flex":
        notice = f"flex_attention needs CUDA for packed rows; packing uses {label}"
    elif req in ("sdpa", "eager") and backend != "sdpa":
        notice = f"--attn_impl {req} cannot keep packed samples apart efficiently; packing uses {label}"
    return backend, notice


# ----------------------------------------------------------------------------------------------------------
# Per-forward cache: every layer gets the same cu_seq_lens / position_ids tensor object, so whatever is
# derived from it (boundaries, masks) is built by the first layer and reused by the rest. Keyed on the
# tensor's identity through a weak reference, so a freed tensor whose id is reused never hits.

_cache: dict[tuple, tuple[weakref.ref, Any]] = {}


def _per_forward(kind: str, key: torch.Tensor, device: torch.device, build: Callable[[], Any]) -> Any:
    slot = (kind, str(device))
    hit = _cache.get(slot)
    if hit is not None and hit[0]() is key:
        return hit[1]
    value = build()
    _cache[slot] = (weakref.ref(key), value)
    return value


def _boundaries_from_positions(position_ids: torch.Tensor, batch: int, device: torch.device):
    """(cu_seqlens int32, max length) over the flattened [batch * T] tokens when the positions restart at
    0 inside a row (packing), else None. Mirrors transformers' `prepare_fa_kwargs_from_position_ids`."""
    pos = position_ids.expand(batch, -1).reshape(-1)
    starts = (pos == 0).nonzero().view(-1)
    if starts.numel() <= batch or int(starts[0]) != 0:
        return None
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(device=device, dtype=torch.int32)
    return cu, int(cu.diff().max())


def _resolve_boundaries(query: torch.Tensor, key: torch.Tensor, kwargs: dict):
    """(cu_seqlens, max_len) for this forward, or None when the input is not a packed row."""
    batch, _, q_len, _ = query.shape
    if q_len != key.shape[2]:  # decoding against a cache: not a training row
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if int(cu.shape[0]) < 2:
            raise ValueError("cu_seq_lens_q needs at least 2 entries")
        max_len = kwargs.get("max_length_q")

        def build():
            if cu.device.type == "cpu":  # checked on the host for free, once per forward
                if int(cu[-1]) != batch * q_len:
                    raise ValueError(
                        f"cu_seq_lens_q ends at {int(cu[-1])} but the batch has {batch * q_len} tokens"
                    )
                c = cu.to(device=query.device, dtype=torch.int32)
            else:  # already on the GPU: reading it back would synchronize every micro-batch; assert on the device
                c = cu.to(device=query.device, dtype=torch.int32)
                torch._assert_async(
                    c[-1] == batch * q_len, "cu_seq_lens_q does not end at the batch's tokens"
                )
            # max_length_q comes from the collator as an int; deriving it syncs (the fallback only)
            return c, int(max_len) if max_len is not None else int(c.diff().max())

        return _per_forward("cu", cu, query.device, build)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    return _per_forward(
        "pos",
        position_ids,
        query.device,
        lambda: _boundaries_from_positions(position_ids, batch, query.device),
    )


# ----------------------------------------------------------------------------------------------------------
# Kernels. All take q [N, Hq, D], k/v [N, Hkv, D] (N = all tokens of the batch, flattened) and return [N, Hq, D].


def _flash_attn_forward(q, k, v, cu, max_len, scaling, dropout):
    fn = _flash_attn_varlen()
    return fn(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=True)


@functools.cache
def _varlen_call_kwargs() -> tuple[dict, bool]:
    """Version-proof extra kwargs for torch's varlen_attn: torch 2.10 took `is_causal`, later versions
    express causality as `window_size=(-1, 0)`; `enable_gqa` is not in every version."""
    params = inspect.signature(_torch_varlen_attn()).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


# Grouped-query attention without copies. Versions of varlen_attn without `enable_gqa` (torch 2.10, 2.11: the
# GPU image's) check no head counts and hand k/v to ATen's flash kernel, which reads a k/v head for every
# group of query heads itself (FlashAttention-2's MQA/GQA path). Expanding k/v first cost a copy of both per
# layer (11 ms of a 1.39 s 7B step at 8 x 3072 on an H200) and kept the expanded copies for the backward:
# 7x the bytes of k and v at 7B (~300 MB a layer at 24k tokens), 5x at 32B. Should a version refuse the
# unexpanded heads, the first call says so and every later call expands. Measured on an H100 80GB (session 13,
# benchmarks/NOTES.md): the grouped-head test passes on the card; the 7B 3 x 3072 step at equal speed (+0.1%, within
# the noise) and 2.9 GiB less (55.1 -> 52.2); so on.
_gqa_native = [True]


def _varlen_forward(q, k, v, cu, max_len, scaling, dropout):
    causal, has_gqa = _varlen_call_kwargs()
    extra = dict(causal, enable_gqa=True) if has_gqa and q.shape[1] != k.shape[1] else causal

    def call(k, v):
        return _torch_varlen_attn()(q, k, v, cu, cu, max_len, max_len, scale=scaling, **extra)

    if q.shape[1] == k.shape[1] or has_gqa:
        return call(k, v)
    if _gqa_native[0]:
        try:
            return call(k, v)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a head-count check: expand from now on
            _gqa_native[0] = False
            log.info("varlen_attn refused %d query heads over %d k/v heads (%s); k/v are expanded", q.shape[1],
                     k.shape[1], str(e).splitlines()[0])  # fmt: skip
    rep = q.shape[1] // k.shape[1]
    return call(k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))


@functools.cache
def _compiled_flex() -> Callable:
    # Uncompiled flex_attention runs a dense reference implementation; compiled it is a sparse kernel
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _document_block_mask(cu: torch.Tensor, total: int, compile_mask: bool = True):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().long())

    def causal_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(
        causal_document, None, None, total, total, device=cu.device, _compile=compile_mask
    )


def _flex_forward(q, k, v, cu, max_len, scaling, dropout, compiled: bool = True):
    total = q.shape[0]
    block_mask = _per_forward("flex", cu, q.device, lambda: _document_block_mask(cu, total, compiled))
    flex = (
        _compiled_flex()
        if compiled
        else importlib.import_module("torch.nn.attention.flex_attention").flex_attention
    )
    out = flex(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _sdpa_forward(q, k, v, cu, max_len, scaling, dropout):
    # One causal SDPA call per sample instead of one dense block-diagonal mask over the whole row: exact, and
    # its cost is the sum of each sample's squared length rather than the square of the row (a [1, 24576]
    # packed batch would need a 600M-entry mask). Boundaries go to the host once per forward.
    bounds = _per_forward("sdpa_bounds", cu, q.device, lambda: cu.tolist())
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, N, D]
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            outs.append(
                F.scaled_dot_product_attention(
                    qh[None, :, s:e],
                    kh[None, :, s:e],
                    vh[None, :, s:e],
                    is_causal=True,
                    dropout_p=dropout,
                    scale=scaling,
                    enable_gqa=gqa,
                )[0]
            )
    return torch.cat(outs, dim=1).transpose(0, 1)


_KERNELS = {
    "flash_attn": _flash_attn_forward,
    "varlen": _varlen_forward,
    "flex": _flex_forward,
    "sdpa": _sdpa_forward,
}


def _effective_backend(backend: str, query: torch.Tensor) -> str:
    if query.device.type != "cuda":
        return "sdpa"
    if backend in ("flash_attn", "varlen") and query.dtype not in (torch.float16, torch.bfloat16):
        # The flash kernels only take half precision; a float32 model gets an exact kernel instead
        return "flex" if _flex_available() else "sdpa"
    return backend


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    backend: str = "sdpa",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: q [B, Hq, T, D], k/v [B, Hkv, T, D] -> ([B, T, Hq, D], None).

    Packed rows (cu_seq_lens_q kwargs, or position ids restarting at 0) get causal attention inside each
    sample only; anything else (padded batches, generation with a cache) goes to transformers' SDPA with
    the mask it was given. Sliding windows are ignored (Qwen2.5 trains with full attention); dropout is
    applied by the flash-attn and SDPA kernels only (Qwen2.5's attention_dropout is 0)."""
    bounds = _resolve_boundaries(query, key, kwargs)
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu, max_len = bounds
    batch, heads, seq, dim = query.shape
    total = batch * seq
    q = query.transpose(1, 2).reshape(total, heads, dim)
    k = key.transpose(1, 2).reshape(total, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(total, value.shape[1], dim)
    kernel = _KERNELS[_effective_backend(backend, query)]
    out = kernel(q, k, v, cu, max_len, scaling, dropout)
    return out.reshape(batch, seq, heads, dim), None


def _padding_mask_only(*args, **kwargs):
    """Mask function for our attention names: packed rows need no dense mask from transformers (the
    attention builds what its kernel needs), but padded batches still get SDPA's usual mask."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_packed_attention(backend: str) -> str:
    """Register the packed attention for `backend` with transformers; returns the attn_implementation
    name to load the model with (`attn_implementation=name`) or to set on a loaded one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown packing backend {backend!r} (one of {', '.join(BACKENDS)})")
    from transformers import AttentionInterface

    name = ATTN_NAME_PREFIX + backend
    AttentionInterface.register(name, functools.partial(packed_attention_forward, backend=backend))
    try:  # transformers >= 4.53 builds masks through this interface; older versions build an eager mask
        from transformers import AttentionMaskInterface
    except ImportError:
        return name
    AttentionMaskInterface.register(name, _padding_mask_only)
    return name


def choose_attention(device, packing: bool, attn_impl: str | None) -> tuple[str, str | None]:
    """The attention implementation to load a training model with, and a one-line notice when the request
    changes. Packed rows need a kernel that respects sample boundaries; none of them needs the flash-attn
    package."""
    if packing:
        backend, notice = select_attn_backend(device, attn_impl)
        return register_packed_attention(backend), notice
    if attn_impl in ("flash_attn", "flash_attention_2"):
        if importlib.util.find_spec("flash_attn") is None:
            return "sdpa", "flash_attn is not installed; using PyTorch sdpa attention"
        return "flash_attention_2", None
    return (attn_impl or "sdpa"), None


def packed_mask_mapping(config):
    """For a packed row under mhsft's packed attention (the trainer's batches, the engine's scoring): the
    per-layer-type mask mapping transformers would build, given ready-made, which is all None (the attention reads
    the cu_seq_lens kwargs). Building it costs a
    synchronization: transformers (>= 4.53) detects packing from the position ids with a `.all()` read back from
    the GPU. None (let transformers build it) for other attentions or older transformers."""
    if not str(getattr(config, "_attn_implementation", "")).startswith(ATTN_NAME_PREFIX):
        return None
    try:
        import transformers.masking_utils  # noqa: F401  (the dict-of-masks interface came with it)
    except ImportError:
        return None
    types = set(getattr(config, "layer_types", None) or ()) | {"full_attention", "sliding_attention"}
    return dict.fromkeys(types)
