"""The LoRA forward paths mhsft patches into PEFT's LoRA linears, for training (mhsft.train) and for the
serving engine (mhsft.serve), each measured in benchmarks/ (notes in benchmarks/NOTES.md).

- `fast_lora_forward`: PEFT's LoRA forward casts the layer input to the adapter's float32 dtype and adds the
  update in float32, so every adapted linear materializes float32 copies of its input and of its whole output
  ([tokens, 18944] for gate/up: 1.9 GB each at 24k tokens). We compute the low-rank path in the activation dtype
  instead (the adapter weights stay float32 masters; only the rank-r matrices are cast, which is free) and add
  it with one addmm. Same maths as PEFT under autocast; only rounding differs. The trainer may hand in a fused
  implementation (mhsft.train.fused_lora: the dropout mask regenerated in the backward rather than stored),
  which a layer then runs wherever it is usable (CUDA with Triton).
- `fast_lora_inference`: the serving engine's LoRA path: A and (B * scaling)^T per adapter, cast to the layer's
  dtype once, so a layer costs its base matmul, one rank-r matmul and one addmm (a decode step is bound by
  kernel count: PEFT's casts, scale and add are 4 more launches in each of ~200 layers).

The update is added into the base layer's output in place (`_AddLowRankInPlace`); both paths share it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


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


def _lora_linear_types() -> tuple[type, ...]:
    """PEFT's LoRA linear, and its bitsandbytes versions (a 4- or 8-bit base: QLoRA) where bitsandbytes is there."""
    from peft.tuners.lora import Linear as LoraLinear

    types: list[type] = [LoraLinear]
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return tuple(types)
    return tuple(
        types + [getattr(peft_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(peft_bnb, n)]
    )


def _plain_lora_linears(model: torch.nn.Module):
    """PEFT LoRA linears without a LoRA variant (DoRA, ...) or bias: those keep PEFT's forward."""
    types = _lora_linear_types()
    for module in model.modules():
        if type(module) not in types or getattr(module, "lora_variant", None):
            continue
        if any(getattr(m, "bias", None) is not None for m in module.lora_B.values()):
            continue
        yield module


def _switch_forward(module: torch.nn.Module, update, fused=None) -> None:
    """Run `module` through `_lora_forward`, adding each active adapter's update with `update`, or through
    `fused.forward` wherever `fused.usable` says it applies."""
    # the fused path's two functions, not its module: a model must stay deep-copyable (modules are not)
    module._mhsft_fused = None if fused is None else (fused.usable, fused.forward)
    if not hasattr(module, "_mhsft_peft_forward"):
        module._mhsft_peft_forward = module.forward
    module._mhsft_update = types.MethodType(update, module)
    module.forward = types.MethodType(_lora_forward, module)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return self._mhsft_peft_forward(x, *args, **kwargs)
    fused = self._mhsft_fused
    if fused is not None and not args and not kwargs and fused[0](self, x):
        return fused[1](self, x)
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


def fast_lora_forward(model: torch.nn.Module, fused=None) -> int:
    """Switch every plain LoRA linear of `model` to the bf16 training update; returns how many were switched.
    Layers with a LoRA variant (DoRA, ...) or bias keep PEFT's forward. `fused` (mhsft.train.fused_lora, or any
    module with `usable(layer, x)` and `forward(layer, x)`) runs instead wherever it is usable; its
    `link_siblings(model, layers)`, where it has one, is told which layers were switched."""
    switched = list(_plain_lora_linears(model))
    for module in switched:
        _switch_forward(module, _train_update, fused)
    if fused is not None and hasattr(fused, "link_siblings"):
        fused.link_siblings(model, switched)
    return len(switched)


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
