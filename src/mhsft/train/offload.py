"""Activations of some decoder layers kept in host memory instead of recomputed: the plan's third way to fit.

The problem. The users' 32B command on an 80 GB card: 61 GiB of bf16 weights leave room for the activations of 14
of the 64 layers; the plan (mhsft.train.plan) makes the other 50 recompute theirs, a forward pass again in the
backward for each: 2,959 tokens/s on an H100 (session 14), against ~3,960 for the same step without recompute by
its FLOPs. Meanwhile the host link idles: a stored 32B layer keeps 0.56 GiB for 4096 tokens (SwiGLU product
remade), and the H100's PCIe link moved 55 GB/s into pinned memory, so on paper a 0.48 s forward carries ~35 layers'
worth to the host and the backward brings them back. Each layer carried instead of recomputed saves its forward
(~6.5 ms).

How. TRL's `OffloadActivations` (from torchtune) does the carrying: saved-tensor hooks that copy every activation to
pinned host memory on a side stream in the forward, keep a few alive until their copies land, and bring them back
in the backward as the autograd nodes ask for them. It offloads everything under its context; the plan wants
only the chosen layers, and only as many as the link carries in a forward (`plan.offload_some`, from the measured
bandwidth, the step's time and a stored layer's bytes). So the context spans the decoder's forward, and a no-op
hook pair (TRL's `NoOpManager`, the innermost hooks win) keeps the other layers, the embeddings and the final norm
where they are. Layers that recompute keep their own checkpoint hooks (`_may_keep`).
The loss (Liger's fused linear cross-entropy) runs outside the decoder, so never under the hooks.

Why not more: no library chooses how many layers to carry from the link's speed; TRL offloads all or nothing and
ms-swift/LLaMA-Factory do not offload activations. Only on one CUDA GPU (DDP's ranks share the host link) and not
under --fp8 (its quantized weights are not parameters, so they would be carried each step).

Measured, and therefore OFF by default (`enabled`; benchmarks switch it on with `+offload`): the users' 32B command
at 80 GB on an H100 (session 14, side by side in one call): the plan measured the link at 55 GB/s, a forward at
0.48 s and a stored layer at 0.56 GiB, carried 35 layers and recomputed 15: **2,580 tokens/s against 2,965** with
50 layers recomputing (-13%). The 35 recomputes spared (~230 ms a micro-batch) cost ~435 ms of transfers that did
not overlap: TRL brings a tensor back only when its autograd node asks for it (the compute stream then waits on the
copy), and in the forward it holds at most 5 tensors in flight before the compute stream waits. Next: a smaller
share of the link (`plan.LINK_SHARE`, `+offloadlow` = 0.2: ~9 layers), and a prefetch of the next layer's tensors
in the backward, which TRL does not do. Strided views stay on the card (`_Contiguous`): TRL brings them back as
contiguous copies, and a compiled backward (inductor asserts its saved inputs' strides) failed on them on the H100.
"""

from __future__ import annotations

import time

import torch

MIN_BYTES = 256 * 1024  # smaller saved tensors stay: not worth a copy each way
enabled = False  # off: measured slower (above); benchmarks' `+offload` turns it on for A/Bs
# Saved tensors whose copies may be in flight in the forward before the compute stream waits for the oldest: TRL's
# default, 5, is fewer than a layer saves (~20), so an offloaded layer's compute waited on its own copies;
# benchmarks' `+offloadstash` tries 64 (~2 layers held on the card a little longer)
FWD_STASH = 5


def available(device: torch.device, world: int, fp8: bool) -> bool:
    """Whether the plan may offload here: one CUDA GPU, not FP8, TRL importable."""
    if not enabled or device.type != "cuda" or world != 1 or fp8:
        return False
    try:
        import trl.models.activation_offloading  # noqa: F401
    except ImportError:
        return False
    return True


class Offload:
    """Saved-tensor hooks over the decoder that send the activations of `self.layers` (decoder layers) to host memory;
    with an empty set the decoder runs untouched. `make` builds the offloading context (TRL's by default; tests
    pass a recording one)."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], make=None, min_bytes=MIN_BYTES):
        from trl.models.activation_offloading import NoOpManager

        self.layers: set[torch.nn.Module] = set()
        self.active = False
        self.ctx = make() if make else _trl_context(model, min_bytes)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = base.get_decoder()
        decoder.register_forward_pre_hook(lambda *_: self._enter())
        decoder.register_forward_hook(lambda *_: self._exit(), always_call=True)
        for layer in layers:
            self._keep(
                layer, NoOpManager(), lambda layer=layer: layer not in self.layers and _may_keep(layer)
            )
        for name, child in decoder.named_children():
            if name != "layers":  # embeddings, rotary tables, the final norm
                self._keep(child, NoOpManager(), lambda: True)

    def _keep(self, module: torch.nn.Module, noop, applies) -> None:
        """Push `noop` around `module`'s forward while offloading is active and `applies()`."""
        entered = []

        def pre(*_):
            if self.active and applies():
                noop.__enter__()
                entered.append(True)

        def post(*_):
            if entered:
                entered.pop()
                noop.__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post, always_call=True)

    def _enter(self) -> None:
        if self.layers and torch.is_grad_enabled():
            self.ctx.__enter__()
            self.active = True

    def _exit(self) -> None:
        if self.active:
            self.active = False
            self.ctx.__exit__(None, None, None)


def reset(model: torch.nn.Module) -> None:
    """Drop what the offloading context still tracks from a step that failed (out of memory) before its backward
    consumed it: TRL's context clears its state on entering and syncs its streams on leaving."""
    hooks = getattr(model, "mhsft_offload", None)
    if hooks is not None and not hooks.active:
        hooks.ctx.__enter__()
        hooks.ctx.__exit__(None, None, None)


def _may_keep(layer: torch.nn.Module) -> bool:
    """Whether a no-op may be pushed around this layer: yes where it stores, and where it recomputes but its module
    hooks run outside the checkpoint (transformers >= 5.2x checkpoints `forward`: the no-op then keeps the layer's
    input, which the checkpoint saves, on the card). Where the checkpoint wraps `__call__` (5.17) the hooks run
    inside it, and a no-op there would override the checkpoint's own hooks: the layer would store everything; its
    input then goes to host memory (~40 MB a 32B layer at 4096 tokens)."""
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return True
    return not any("__call__" in vars(c) for c in type(layer).__mro__ if c is not torch.nn.Module)


def _trl_context(model: torch.nn.Module, min_bytes: int):
    from trl.models.activation_offloading import OffloadActivations

    ctx = OffloadActivations(
        use_pin_memory=True, use_streams=True, min_offload_size=min_bytes, max_fwd_stash_size=FWD_STASH
    )
    ctx.update_model_params(model)
    # frozen buffers (rotary tables, quantization state) are no activations either
    ctx.param_storages |= {b.untyped_storage().data_ptr() for b in model.buffers() if b.numel()}
    return _Contiguous(ctx)


class _Contiguous(torch.autograd.graph.saved_tensors_hooks):
    """TRL's context for contiguous tensors only; strided views stay where they are. TRL brings a view back as a
    contiguous copy, and a compiled backward rejects that (inductor asserts the strides of its saved inputs: the
    tiny model's float32 attention failed so on an H100, session 14). Entered over TRL's own hooks, so its pack and
    unpack run only through these."""

    def __init__(self, inner):
        self.inner = inner

        def pack(t):
            return (True, inner.pack_hook(t)) if t.is_contiguous() else (False, t)

        def unpack(packed):
            carried, x = packed
            return inner.unpack_hook(x) if carried else x

        super().__init__(pack, unpack)

    def __enter__(self):
        self.inner.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.inner.__exit__(*exc)


def install(model: torch.nn.Module, layers: list[torch.nn.Module]) -> Offload:
    """The hooks on `model`, offloading nothing until `model.mhsft_offload.layers` is set (plan.set_recompute)."""
    model.mhsft_offload = Offload(model, layers)
    return model.mhsft_offload


def host_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes a second from this GPU into pinned host memory (the slower direction on most hosts), best of 3."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def host_memory_free() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
