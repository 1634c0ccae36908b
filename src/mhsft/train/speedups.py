"""The trainer's speed paths on a loaded model, as its arguments ask; each measured in
benchmarks/train_throughput.py (notes and numbers in benchmarks/NOTES.md).

- the LoRA layers' bf16 update (mhsft.lora_forward), with dropout in fused Triton kernels (mhsft.train.fused_lora)
  on a GPU;
- `apply_liger`: Liger's fused RMSNorm / SwiGLU / RoPE kernels on the model instance, when the package is there
  (`--use_liger_kernel`, ms-swift's flag). The loss stays ours (chunked, labelled tokens only);
- `compile_layers`: regional torch.compile of each decoder layer (`--torch_compile`);
- `partial_checkpointing`: recompute only a share of the layers (`--gradient_checkpointing_ratio`).
"""

from __future__ import annotations

import torch

from mhsft.lora_forward import fast_lora_forward
from mhsft.train import fused_lora


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
        fused = None if args.torch_compile else fused_lora
        fast_lora_forward(model, fused=fused)
        on_gpu = next(model.parameters()).is_cuda
        if fused is not None and args.lora_dropout > 0 and on_gpu and fused_lora.triton is not None:
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
