"""The trainer's speed paths on a loaded model, as its arguments ask; each measured in
benchmarks/train_throughput.py (notes and numbers in benchmarks/NOTES.md).

- the LoRA layers' bf16 update (mhsft.lora_forward), with dropout in fused Triton kernels (mhsft.train.fused_lora)
  on a GPU;
- `apply_liger`: Liger's fused RMSNorm / SwiGLU / RoPE kernels on the model instance, when the package is there
  (`--use_liger_kernel`, ms-swift's flag; on by default where it works). The loss stays ours (chunked,
  labelled tokens only);
- `fp8_base`: the frozen base weights' matmuls in FP8 (`--fp8`, mhsft.train.fp8);
- `swiglu_down.install`, `remade_norms.install`: the MLPs' SwiGLU product (or their gate and up too) and the norms'
  outputs remade in the backward, for the execution plan to turn on where memory limits the step;
- `compile_layers`: regional torch.compile of each decoder layer (`--torch_compile`);
"""

from __future__ import annotations

import torch

from mhsft.lora_forward import fast_lora_forward
from mhsft.train import fp8, fused_lora, loss, remade_norms, swiglu_down
from mhsft.utils import UserError


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


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def fp8_base(model: torch.nn.Module, fused_on: bool) -> str:
    """The frozen base weights as FP8 (mhsft.train.fp8), or a one-line refusal where the card cannot."""
    device = next(model.parameters()).device
    if why := fp8.supported(device):
        raise UserError(why)
    if not fused_on or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise UserError("--fp8 runs in mhsft's fused LoRA layers: not under DeepSpeed ZeRO-3")
    n = fp8.convert(model)
    return f"FP8 base matmuls ({n} layers)"


def speedups(model: torch.nn.Module, args, notices: list[str]) -> torch.nn.Module:
    """The trainer's measured speed paths (benchmarks/NOTES.md), as its arguments ask. Liger's kernels are on by
    default where they work (CUDA with Triton and liger-kernel; `--use_liger_kernel false` turns them off). What
    runs is recorded as `model.mhsft_kernels` (the plan's line and args.json name it)."""
    on_gpu = next(model.parameters()).is_cuda
    kernels = []
    if args.train_type == "lora":
        # torch.compile cannot trace the fused layer's seed draw (a host int); compiled layers keep the other path
        fused = None if args.torch_compile else fused_lora
        fast_lora_forward(model, fused=fused)
        if fused is not None and on_gpu and fused_lora.triton is not None:
            kernels.append("fused LoRA")
            if args.lora_dropout > 0:
                notices.append(
                    "LoRA dropout runs in fused Triton kernels: its mask is regenerated in the backward, not stored"
                )
    if getattr(args, "fp8", False):
        kernels.append(fp8_base(model, fused_on="fused LoRA" in kernels))
    liger = args.use_liger_kernel
    if liger is None:
        liger = on_gpu and fused_lora.triton is not None and liger_available()
    if liger:
        if msg := apply_liger(model):
            notices.append(msg)
        else:
            kernels.append("Liger")
            if loss.FUSED_LOSS and not any(hasattr(p, "ds_id") for p in model.parameters()):
                model.mhsft_fused_loss = loss.liger_fused_loss  # ChunkedLMLoss takes it (sft.py)
                kernels.append("Liger fused loss")
    if args.train_type == "lora" and not args.torch_compile:  # on the fused LoRA path wherever it runs
        swiglu_down.install(model, liger="Liger" in kernels)  # off until the plan turns it on
        remade_norms.install(model)
    if args.torch_compile:
        compile_layers(model)
        kernels.append("torch.compile")
    model.mhsft_kernels = kernels
    return model
