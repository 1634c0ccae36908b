"""The MLP's SwiGLU product remade in the backward instead of kept, in the decoder layers that store their
activations; the execution plan (mhsft.train.plan) turns it on where memory is what limits the step.

The problem. A SwiGLU MLP keeps three [tokens, intermediate] tensors for its backward: gate and up (the SwiGLU's
inputs, for its gradient) and their product c = silu(gate) * up (the down projection's input, which its LoRA
needs for dA and the dropout mask). Of the ~116,000 values a Qwen2.5-32B layer keeps per token (~230 KB in bf16;
1 x 4096 without recompute peaked at 126 GiB, benchmarks/results/users_commands_h200.json), c is 27,648: 24% of
a stored layer. One elementwise pass over gate and up remakes it (~0.14 ms per 32B layer at 4096 tokens on an
H200 by bandwidth, ~2% of what recomputing the whole layer costs). Where the plan recomputes layers to fit the
card (the users' 32B command on an 80 GB card), a stored layer costing a quarter less lets a third more layers
store, each saving a recomputed forward. Where nothing recomputes, the pass is pure cost (~1% of a 7B step), so
the plan leaves it off there.

Why here: Liger's SwiGLU keeps gate and up and returns c, and the consumer (the down projection's LoRA) then keeps
c again; no library makes the consumer remake its input from the producer's. The down projection runs through
the fused LoRA path (`fused_lora.group_forward` / `group_backward`) with its own dropout seed drawn as that path
draws it, so a step gives the same loss and gradients with the product kept or remade.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from mhsft.train import fused_lora

_ATTR = (
    "_mhsft_remake_swiglu"  # per MLP: set by plan.set_recompute on the layers that store their activations
)


def _product(gate: torch.Tensor, up: torch.Tensor, liger: bool) -> torch.Tensor:
    """silu(gate) * up, by the same kernel as the MLP's own forward (Liger's, or the model's torch ops)."""
    if liger:
        from liger_kernel.ops.swiglu import swiglu_forward

        return swiglu_forward(gate, up)[2]
    return F.silu(gate) * up


def _product_grads(gate: torch.Tensor, up: torch.Tensor, dc: torch.Tensor, liger: bool):
    """(d gate, d up) of silu(gate) * up for the product's gradient dc."""
    if liger:
        from liger_kernel.ops.swiglu import swiglu_backward

        return swiglu_backward(gate, up, dc)  # in place into gate and up, as Liger's own backward does
    with torch.enable_grad():
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        return torch.autograd.grad(F.silu(g) * u, (g, u), dc)


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) through the down projection's fused LoRA path, keeping gate and up, not the product."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, p, seed, liger, a, bt):
        gate, up = gate.contiguous(), up.contiguous()
        c2 = _product(gate, up, liger).reshape(-1, gate.shape[-1])
        (out,), (h,), masks = fused_lora.group_forward(
            c2, (weight,), (bias,), p, (seed,), a[None], (bt,), True
        )
        ctx.save_for_backward(gate, up, a, bt, h, masks)
        ctx.weight, ctx.p, ctx.seed, ctx.liger = weight, p, seed, liger  # frozen: by reference
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        gate, up, a, bt, h, masks = ctx.saved_tensors
        c2 = _product(gate, up, ctx.liger).reshape(-1, gate.shape[-1])
        g2 = dout.reshape(-1, dout.shape[-1])
        dc, da, (dbt,) = fused_lora.group_backward(c2, [g2], (ctx.weight,), ctx.p, (ctx.seed,), a[None], (bt,),
                                                   (h,), masks, True, [ctx.needs_input_grad[8]])  # fmt: skip
        del c2
        dgate, dup = _product_grads(gate, up, dc.view(gate.shape), ctx.liger)
        return dgate, dup, None, None, None, None, None, da[0], dbt


def _down_is_fused(down: torch.nn.Module, x: torch.Tensor) -> bool:
    """The down projection is a LoRA linear switched to the fused path (mhsft.lora_forward) that serves x."""
    fused = getattr(down, "_mhsft_fused", None)
    if fused is None or down.disable_adapters or down.merged:
        return False
    return fused[0](down, x)


def _mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward: the product remade in the backward where the plan asked and the down projection is on the
    fused path, else the MLP's own forward (Liger's or the model's)."""
    if not (getattr(mlp, _ATTR, False) and mlp.training and torch.is_grad_enabled()):
        return mlp._mhsft_mlp_forward(x)
    if not _down_is_fused(mlp.down_proj, x):
        return mlp._mhsft_mlp_forward(x)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    weight, bias, a, bt, p = fused_lora._parts(mlp.down_proj, gate)
    seed = fused_lora.lora_seeds(1, p)[0]  # drawn where lora_linear draws it: the same masks as kept
    return _SwiGLUDown.apply(gate, up, weight, bias, p, seed, mlp._mhsft_liger, a, bt)


def install(model: torch.nn.Module, liger: bool) -> int:
    """Give every SwiGLU MLP of `model` (gate_proj, up_proj, down_proj, silu) the switchable forward, off until the
    plan turns it on (`set_remake`); `liger`: Liger's SwiGLU kernels run the MLP. Returns how many MLPs."""
    n = 0
    for mlp in model.modules():
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            continue
        if getattr(getattr(mlp, "config", None), "hidden_act", None) not in ("silu", "swish"):
            continue
        if not hasattr(mlp, "_mhsft_mlp_forward"):
            mlp._mhsft_mlp_forward = mlp.forward
        mlp._mhsft_liger = liger
        setattr(mlp, _ATTR, False)
        mlp.forward = types.MethodType(_mlp_forward, mlp)
        n += 1
    return n


def installed(model: torch.nn.Module) -> bool:
    return any(hasattr(m, _ATTR) for m in model.modules())


def set_remake(layer: torch.nn.Module, on: bool) -> None:
    """Remake (on) or keep (off) the SwiGLU product of the MLPs in this decoder layer."""
    for m in layer.modules():
        if hasattr(m, _ATTR):
            setattr(m, _ATTR, on)
