"""Speed paths for the trainer's step, each measured in benchmarks/train_throughput.py (notes in
benchmarks/NOTES.md).

- `fast_lora_forward`: PEFT's LoRA forward casts the layer input to the adapter's float32 dtype and adds the
  update in float32, so every adapted linear materializes float32 copies of its input and of its whole output
  ([tokens, 18944] for gate/up: 1.9 GB each at 24k tokens). We compute the low-rank path in the activation dtype
  instead (the adapter weights stay float32 masters; only the rank-r matrices are cast, which is free) and add
  it with one addmm. Same maths as PEFT under autocast; only rounding differs. On a GPU with Triton, a layer
  with dropout runs `fused_lora` instead: the dropout mask is regenerated in the backward rather than stored.
- `fast_lora_inference`: the serving engine's LoRA path: A and (B * scaling)^T per adapter, cast to the layer's
  dtype once, so a layer costs its base matmul, one rank-r matmul and one addmm (a decode step is bound by
  kernel count: PEFT's casts, scale and add are 4 more launches in each of ~200 layers).
- `decode_attention_forward`: the serving engine's attention (registered with transformers as `mhsft_decode`).
- `apply_liger`: Liger's fused RMSNorm / SwiGLU / RoPE kernels on the model instance, when the package is there
  (`--use_liger_kernel`, ms-swift's flag). The loss stays ours (chunked, labelled tokens only).
- `compile_layers`: regional torch.compile of each decoder layer (`--torch_compile`).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from mhsft import fused_lora


class _AddLowRankInPlace(torch.autograd.Function):
    """result += h @ bt, written into `result`: an out-of-place addmm first copies `result` (the base layer's
    whole output, [tokens, 18944] for gate/up) into a new buffer, which the H200 profile put at 62 ms of a
    2.1 s 7B step. The base linear does not keep its output for its backward, so updating it in place is safe;
    autograd checks that through the version counter (`mark_dirty`)."""

    @staticmethod
    def forward(ctx, result, h, bt):
        ctx.save_for_backward(h, bt)
        result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), bt)
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        h, bt = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = (g @ bt.t()).view(h.shape) if ctx.needs_input_grad[1] else None
        grad_bt = h.reshape(-1, h.shape[-1]).t() @ g if ctx.needs_input_grad[2] else None
        return grad, grad_h, grad_bt


def _add_low_rank(result: torch.Tensor, h: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """result + h @ bt over the flattened tokens, as one addmm (in place when `result` allows it)."""
    shape = result.shape
    if result.dtype == bt.dtype and result.is_contiguous() and result._base is None:
        if torch.is_grad_enabled() and (result.requires_grad or h.requires_grad or bt.requires_grad):
            return _AddLowRankInPlace.apply(result, h, bt)
        result.view(-1, shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), bt)
        return result
    out = torch.addmm(result.reshape(-1, shape[-1]).to(bt.dtype), h.reshape(-1, h.shape[-1]), bt)
    return out.view(shape).to(result.dtype)


def _plain_lora_linears(model: torch.nn.Module):
    """PEFT LoRA linears without a LoRA variant (DoRA, ...) or bias: those keep PEFT's forward."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if type(module) is not LoraLinear or getattr(module, "lora_variant", None):
            continue
        if any(getattr(m, "bias", None) is not None for m in module.lora_B.values()):
            continue
        yield module


def _switch_forward(module: torch.nn.Module, update, fused: bool = False) -> None:
    """Run `module` through `_lora_forward`, adding each active adapter's update with `update` (or through
    `fused_lora` where it applies, when `fused`)."""
    module._mhsft_fused = fused
    if not hasattr(module, "_mhsft_peft_forward"):
        module._mhsft_peft_forward = module.forward
    module._mhsft_update = types.MethodType(update, module)
    module.forward = types.MethodType(_lora_forward, module)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return self._mhsft_peft_forward(x, *args, **kwargs)
    if self._mhsft_fused and not args and not kwargs and fused_lora.usable(self, x):
        return fused_lora.forward(self, x)
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name in self.lora_A:
            result = self._mhsft_update(result, x, name)
    return result


def _train_update(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    a = self.lora_A[name].weight
    b = self.lora_B[name].weight
    h = F.linear(self.lora_dropout[name](x), a.to(x.dtype))  # [..., r]
    return _add_low_rank(result, h, (b * self.scaling[name]).to(x.dtype).t())


def fast_lora_forward(model: torch.nn.Module, fused: bool = True) -> int:
    """Switch every plain LoRA linear of `model` to the bf16 training update; returns how many were switched. Layers with
    a LoRA variant (DoRA, ...) or bias keep PEFT's forward. With `fused`, a layer on CUDA with Triton at hand
    runs `fused_lora` instead: dropout regenerated in the backward rather than stored (see there)."""
    n = 0
    for module in _plain_lora_linears(model):
        _switch_forward(module, _train_update, fused)
        n += 1
    return n


def _infer_update(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    a, bt = self._mhsft_lora[name]
    return _add_low_rank(result, F.linear(x.to(a.dtype), a), bt)


@torch.no_grad()
def fast_lora_inference(model: torch.nn.Module) -> int:
    """Switch every plain LoRA linear of `model` to the inference update (inference only: the weights are copied
    once, later changes to them are not seen); returns how many were switched."""
    n = 0
    for module in _plain_lora_linears(model):
        dtype = module.base_layer.weight.dtype
        if not dtype.is_floating_point:  # quantized base weights: keep PEFT's path
            continue
        module._mhsft_lora = {
            name: (
                module.lora_A[name].weight.to(dtype).contiguous(),
                (module.lora_B[name].weight * module.scaling[name]).t().to(dtype).contiguous(),
            )
            for name in module.lora_A
        }
        _switch_forward(module, _infer_update)
        n += 1
    return n


def apply_liger(model: torch.nn.Module) -> str | None:
    """Liger's RMSNorm / SwiGLU / RoPE on this model instance. Returns a notice when it cannot."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return "--use_liger_kernel: the liger-kernel package is not installed (pip install liger-kernel); skipped"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        _apply_liger_kernel_to_instance(
            model=base,
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
    except (TypeError, ValueError, NotImplementedError) as e:
        return f"--use_liger_kernel: not applied to this model ({e})"
    return None


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer (regional compilation: short compile, shapes may vary per batch)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def speedups(model: torch.nn.Module, args, notices: list[str]) -> torch.nn.Module:
    """The trainer's measured speed paths (benchmarks/NOTES.md), as its arguments ask."""
    if args.train_type == "lora":
        # torch.compile cannot trace the fused layer's seed draw (a host int); compiled layers keep the other path
        fused = not args.torch_compile
        fast_lora_forward(model, fused=fused)
        on_gpu = next(model.parameters()).is_cuda
        if fused and args.lora_dropout > 0 and on_gpu and fused_lora.triton is not None:
            notices.append(
                "LoRA dropout runs in fused Triton kernels: its mask is regenerated in the backward, not stored"
            )
    if args.use_liger_kernel and (msg := apply_liger(model)):
        notices.append(msg)
    if args.torch_compile:
        compile_layers(model)
    return model


def partial_checkpointing(model: torch.nn.Module, ratio: float) -> None:
    """Recompute only `ratio` of the decoder layers, evenly spread; the others store their activations.
    Recomputation is a third of a checkpointed LoRA step's arithmetic, so memory left over buys speed."""
    if ratio >= 1.0:
        return
    layers = [m for m in model.get_decoder().layers if hasattr(m, "gradient_checkpointing")]
    n, k = len(layers), round(max(0.0, ratio) * len(layers))
    keep = {i * n // k for i in range(k)} if k else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep


DECODE_ATTN = "mhsft_decode"


def decode_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA, except that a one-token query under grouped-query attention runs on the KV heads directly: the
    query heads sharing a KV head become that head's query rows, so each cached K/V is read once instead of
    being repeated to every query head first (transformers before 5.2x copies it 7 times for Qwen2.5-7B's 28
    query / 4 KV heads, which at batch 64 costs more than reading the weights)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, t, d = query.shape
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    if t != 1 or groups == 1 or not shared_mask or key.shape[1] * groups != heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    q = query.reshape(b, key.shape[1], groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


def register_decode_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTN, decode_attention_forward)
    with contextlib.suppress(ImportError):  # transformers >= 4.53 builds masks per attention name
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(DECODE_ATTN, sdpa_mask)
    return DECODE_ATTN
