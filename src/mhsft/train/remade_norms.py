"""A decoder layer's two RMSNorm outputs remade in the backward by the LoRA groups that read them, instead of kept.

The problem. In a Qwen2 (Llama, Mistral) layer each RMSNorm's output is the input of one fused LoRA group (q/k/v
after `input_layernorm`, gate/up after `post_attention_layernorm`), and that group keeps it for its backward (the
A-GEMM's gradient, the dropout mask). The norm keeps its own input for its own backward. So a stored layer holds
both sides of each norm: 2 x 5,120 values per token on Qwen2.5-32B, 12% of a stored layer with its SwiGLU product
remade (benchmarks/NOTES.md, session 15), and 45% of what a layer keeps once its MLP's gate/up are recomputed
(mhsft.train.swiglu_down's third mode). Remaking the output from the input the norm keeps anyway costs one
elementwise pass over [tokens, hidden] per norm in the backward (~30 us per 32B layer at 4096 tokens by bandwidth).

How. The patched norm notes (its output, its input) when the plan asked it to; the LoRA group that reads exactly
that output (`source`, checked by identity) saves the input instead, and in the backward calls the norm's own
forward on it, which gives the same values bit for bit (the same kernel on the same tensor). The norm's input is
the tensor its own backward keeps (Liger's RMSNorm and, in float32, transformers' keep it), so saving it again
costs no memory. No library does it: the producer (the norm) and the consumer (PEFT's LoRA linear) are separate
modules, each keeping what it needs.
"""

from __future__ import annotations

import types
import weakref

import torch

_ON = "_mhsft_remade_norm"  # on a norm: note (output, input) for the group that reads it (set_remade)
_MADE = (
    "_mhsft_norm_made"  # on a norm: (weak reference to its last output, its input), until a reader takes it
)
_NORM = "_mhsft_norm"  # on a LoRA linear: (the norm whose output it reads,) - a tuple, so not a submodule


def _norm_forward(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = norm._mhsft_own_forward(x)
    if norm.__dict__.get(_ON) and norm.training and torch.is_grad_enabled():
        norm.__dict__[_MADE] = (weakref.ref(out), x)
    else:  # a note no reader took (its reader left the fused path) holds its input no longer
        norm.__dict__.pop(_MADE, None)
    return out


def install(model: torch.nn.Module) -> int:
    """Patch the two norms of every decoder layer that has them (input_layernorm before self_attn's q/k/v,
    post_attention_layernorm before the MLP's gate/up) and link the LoRA linears that read them; off until
    `set_remade`. Returns how many layers."""
    n = 0
    for layer in model.modules():
        pairs = _pairs(layer)
        if pairs is None:
            continue
        for norm, readers in pairs:
            if not hasattr(norm, "_mhsft_own_forward"):
                norm._mhsft_own_forward = norm.forward
                norm.forward = types.MethodType(_norm_forward, norm)
            norm.__dict__[_ON] = False
            for r in readers:
                r.__dict__[_NORM] = (norm,)
        n += 1
    return n


def _pairs(layer: torch.nn.Module):
    """[(norm, the LoRA linears reading its output)] of a pre-norm decoder layer, or None for any other module."""
    names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    if not all(hasattr(layer, a) for a in names):
        return None
    attn = [getattr(layer.self_attn, p, None) for p in ("q_proj", "k_proj", "v_proj")]
    mlp = [getattr(layer.mlp, p, None) for p in ("gate_proj", "up_proj")]
    if any(m is None or not hasattr(m, "lora_A") for m in attn + mlp):
        return None
    return [(layer.input_layernorm, attn), (layer.post_attention_layernorm, mlp)]


def set_remade(layer: torch.nn.Module, on: bool) -> None:
    """Remake (on) or keep (off) the outputs of this decoder layer's norms in the backward."""
    for m in layer.modules():
        if _ON in m.__dict__:
            m.__dict__[_ON] = on
            m.__dict__.pop(_MADE, None)


def source(reader: torch.nn.Module, x: torch.Tensor):
    """(the norm's input, the norm's forward) when `x` is the output the reader's norm just made with remaking on,
    else None. Takes the note, so that the norm's input is held no longer than the backward needs it."""
    linked = reader.__dict__.get(_NORM)
    if linked is None:
        return None
    made = linked[0].__dict__.pop(_MADE, None)
    if made is None or made[0]() is not x:
        return None
    return made[1], linked[0]._mhsft_own_forward


def remake(src) -> torch.Tensor:
    """The norm's output again, from (its input, its forward) as `source` gave them."""
    with torch.no_grad():
        return src[1](src[0])
