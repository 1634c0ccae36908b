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

from mhsft.train import fused_lora, remade_norms

# per MLP, set by plan.set_recompute: None (its own forward), "product" (the product remade: layers that store their
# activations), "mlp" (gate and up recomputed too: `_SwiGLUMLP`)
_ATTR = "_mhsft_remake_swiglu"
MODES = (None, "product", "mlp")


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


class _SwiGLUMLP(torch.autograd.Function):
    """down(silu(gate) * up) with gate and up made by their fused LoRA group from x, keeping neither: the backward
    runs gate/up's base GEMMs again (`fused_lora.group_outputs`, with the kept [tokens, r] LoRA hiddens: the same
    values bit for bit), so the MLP keeps only its input, or with `source` not even that (its norm remakes it,
    mhsft.train.remade_norms). The recompute is gate/up's two GEMMs, 58% of a Qwen2.5 layer's forward, where
    a recomputing layer runs all of it (plan.MLP_RECOMPUTE)."""

    @staticmethod
    def forward(
        ctx, x, gu_weights, gu_biases, p, seeds, down, liger, source, a_g, bt_g, a_u, bt_u, a_d, bt_d
    ):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        a_gu, bts = torch.stack((a_g, a_u)), (bt_g, bt_u)
        (gate, up), hs, masks = fused_lora.group_forward(
            x2, gu_weights, gu_biases, p, seeds[:2], a_gu, bts, True
        )
        c = _product(gate, up, liger)
        del gate, up
        (out,), (h,), masks_d = fused_lora.group_forward(
            c, down[:1], down[1:2], p, seeds[2:], a_d[None], (bt_d,), True
        )
        ctx.save_for_backward(
            x2 if source is None else source[0], a_gu, masks, *bts, *hs, a_d, bt_d, h, masks_d
        )
        ctx.frozen, ctx.p, ctx.seeds, ctx.liger, ctx.x_shape = (
            (gu_weights, gu_biases, down),
            p,
            seeds,
            liger,
            x.shape,
        )
        ctx.norm = None if source is None else source[1]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        x2, a_gu, masks, bt_g, bt_u, h_g, h_u, a_d, bt_d, h, masks_d = ctx.saved_tensors
        if ctx.norm is not None:
            x2 = remade_norms.remake((x2, ctx.norm)).reshape(-1, ctx.x_shape[-1])
        (gu_weights, gu_biases, down), need = ctx.frozen, ctx.needs_input_grad
        gate, up = fused_lora.group_outputs(x2, gu_weights, gu_biases, (h_g, h_u), (bt_g, bt_u))
        c = _product(gate, up, ctx.liger)
        g2 = dout.reshape(-1, dout.shape[-1])
        dc, da_d, (dbt_d,) = fused_lora.group_backward(c, [g2], down[:1], ctx.p, ctx.seeds[2:], a_d[None], (bt_d,),
                                                       (h,), masks_d, True, [need[13]])  # fmt: skip
        del c
        dgate, dup = _product_grads(gate, up, dc.view(gate.shape), ctx.liger)
        del gate, up, dc
        dx, da, (dbt_g, dbt_u) = fused_lora.group_backward(x2, [dgate, dup], gu_weights, ctx.p, ctx.seeds[:2], a_gu,
                                                           (bt_g, bt_u), (h_g, h_u), masks, need[0],
                                                           [need[9], need[11]])  # fmt: skip
        dx = None if dx is None else dx.view(ctx.x_shape)
        return dx, None, None, None, None, None, None, None, da[0], dbt_g, da[1], dbt_u, da_d[0], dbt_d


def _down_is_fused(down: torch.nn.Module, x: torch.Tensor) -> bool:
    """The down projection is a LoRA linear switched to the fused path (mhsft.lora_forward) that serves x."""
    fused = getattr(down, "_mhsft_fused", None)
    if fused is None or down.disable_adapters or down.merged:
        return False
    return fused[0](down, x)


def _mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward: the product remade in the backward where the plan asked and the down projection is on the
    fused path (gate and up recomputed too in mode "mlp", where they are), else the MLP's own forward (Liger's or
    the model's)."""
    mode = getattr(mlp, _ATTR, None)
    if not (mode and mlp.training and torch.is_grad_enabled()):
        return mlp._mhsft_mlp_forward(x)
    if not _down_is_fused(mlp.down_proj, x):
        return mlp._mhsft_mlp_forward(x)
    if mode == "mlp" and (out := _recomputed_mlp(mlp, x)) is not None:
        return out
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    weight, bias, a, bt, p = fused_lora._parts(mlp.down_proj, gate)
    seed = fused_lora.lora_seeds(1, p)[0]  # drawn where lora_linear draws it: the same masks as kept
    return _SwiGLUDown.apply(gate, up, weight, bias, p, seed, mlp._mhsft_liger, a, bt)


def _recomputed_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`_SwiGLUMLP` where gate and up are fused LoRA linears with the down projection's dropout, else None."""
    if not all(fused_lora.usable(m, x) for m in (mlp.gate_proj, mlp.up_proj)):
        return None
    (wg, bg, ag, btg, pg), (wu, bu, au, btu, pu) = (
        fused_lora._parts(m, x) for m in (mlp.gate_proj, mlp.up_proj)
    )
    wd, bd, ad, btd, pd = fused_lora._parts(mlp.down_proj, x)
    if not pg == pu == pd:
        return None
    source = remade_norms.source(mlp.gate_proj, x)
    # the seeds in the order the kept path draws them (gate/up's group, then the down projection): the same masks
    seeds = fused_lora.lora_seeds(2, pg) + fused_lora.lora_seeds(1, pg)
    return _SwiGLUMLP.apply(x, (wg, wu), (bg, bu), pg, seeds, (wd, bd), mlp._mhsft_liger, source,
                            ag, btg, au, btu, ad, btd)  # fmt: skip


def install(model: torch.nn.Module, liger: bool) -> int:
    """Give every SwiGLU MLP of `model` (gate_proj, up_proj, down_proj, silu) the switchable forward, off until the
    plan turns it on (`set_mode`); `liger`: Liger's SwiGLU kernels run the MLP. Returns how many MLPs."""
    n = 0
    for mlp in model.modules():
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            continue
        if getattr(getattr(mlp, "config", None), "hidden_act", None) not in ("silu", "swish"):
            continue
        if not hasattr(mlp, "_mhsft_mlp_forward"):
            mlp._mhsft_mlp_forward = mlp.forward
        mlp._mhsft_liger = liger
        setattr(mlp, _ATTR, None)
        mlp.forward = types.MethodType(_mlp_forward, mlp)
        n += 1
    return n


def installed(model: torch.nn.Module) -> bool:
    return any(hasattr(m, _ATTR) for m in model.modules())


def set_mode(layer: torch.nn.Module, mode: str | None) -> None:
    """What the MLPs of this decoder layer keep for the backward: everything (None), gate and up but not their
    product ("product"), only their input ("mlp")."""
    assert mode in MODES, mode
    for m in layer.modules():
        if hasattr(m, _ATTR):
            setattr(m, _ATTR, mode)
