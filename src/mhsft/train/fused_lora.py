"""A LoRA linear for training whose dropout is never materialized (on CUDA, when Triton is installed).

PEFT computes `base(x) + B(A(dropout(x))) * s`. The dropout writes a copy of the layer's input and a mask,
autograd keeps both until the backward, and the backward reads them again and writes the input gradient of
the LoRA path as a tensor of its own that is then added to the base's. For a 7B layer that is ~14 bytes of
traffic per input element, over [tokens, 3584] six times and [tokens, 18944] once per layer, and on an H100 it
moved the peak of a 2 x 3072 micro-batch without checkpointing from 60.0 to 49.0 GiB: the difference between
fitting 2 and 4 rows (benchmarks/NOTES.md).

Here the mask is a function of (seed, element index) through Philox (`tl.randint4x`), so it is regenerated
where it is needed instead of stored:
- forward: one kernel reads x once and computes dropout(x) @ A^T (the [tokens, r] LoRA hidden);
- backward: one kernel reads x and the base's input gradient once, regenerates the mask, adds
  (dh @ A) * mask * scale into that gradient in place and accumulates dA = dh^T @ dropout(x).
The base matmuls and the rank-r matmuls with B stay with cuBLAS. Only x, the [tokens, r] hidden and a seed
are kept for the backward. Seeds come from torch's CPU generator, so `torch.manual_seed` reproduces a run and
activation checkpointing (which restores the RNG state before recomputing) regenerates the same masks.

Triton is not a hand-written replacement for a library here: no library ships dropout fused into a
skinny matmul with the mask recomputed in the backward (Unsloth and Liger skip dropout instead).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

try:  # module-level names: Triton's interpreter patches `tl` in the kernels' globals
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# Tests set this to run the kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 before import)
on_cpu = False
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _kernels():
    if triton is None:
        raise ImportError("the fused LoRA kernels need Triton (pip install triton)")
    return _fwd, _bwd


if triton is not None:
    # The mask. One Philox4x32-10 call (`tl.randint4x`) gives 4 x 32 random bits, cut into 8 16-bit draws for 8
    # neighbouring elements: a draw per element (`tl.rand`) made the kernels compute-bound on Philox, at a
    # third of the memory bandwidth (measured on an H100). Element (m, k) is kept when its draw >= threshold,
    # threshold = round(p * 65536), so the kept fraction is exactly 1 - threshold / 65536 and the scale is its
    # inverse. The uint32 counter m * ceil(K / 8) + k // 8 is distinct for the first 2^35 elements.
    @triton.jit
    def _keep(seed, rows, k0, K, threshold, BM: tl.constexpr, BK: tl.constexpr):
        groups = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.uint32)
        counter = rows[:, None].to(tl.uint32) * ((K + 7) // 8).to(tl.uint32) + groups[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        bits = tl.join(tl.join(r0, r1), tl.join(r2, r3))
        draws = tl.join(bits & 0xFFFF, bits >> 16)  # [BM, BK / 8, 2, 2, 2]
        return tl.reshape(draws, (BM, BK)) >= threshold

    @triton.jit(do_not_specialize=["seed", "M"])
    def _fwd(x_ptr, a_ptr, part_ptr, M, K, r, k_per_split, seed, threshold, scale,
             BM: tl.constexpr, BK: tl.constexpr, R: tl.constexpr):  # fmt: skip
        # part[split, m, :r] = sum over this split's K range of (x * keep * scale)[m, k] * A[:, k]
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        ranks = tl.arange(0, R)
        acc = tl.zeros((BM, R), dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=inside, other=0.0)
            keep = _keep(seed, rows, k0, K, threshold, BM, BK)
            xd = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None],
                        mask=(ranks[None, :] < r) & (cols[:, None] < K), other=0.0)  # fmt: skip
            acc += tl.dot(xd, a)
        out = part_ptr + split.to(tl.int64) * M * R + rows[:, None].to(tl.int64) * R + ranks[None, :]
        tl.store(out, acc.to(part_ptr.dtype.element_ty), mask=rows[:, None] < M)

    @triton.jit(do_not_specialize=["seed", "M"])
    def _bwd(x_ptr, dh_ptr, a_ptr, dx_ptr, part_ptr, M, K, r, m_per_split, seed, threshold, scale,
             HAS_DX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, R: tl.constexpr):  # fmt: skip
        # dx[m, k] += (dh @ A)[m, k] * keep * scale;  part[split, :, k] = sum over this split's rows of
        # dh[m, :]^T (x * keep * scale)[m, k]. One mask serves both.
        pid_k = tl.program_id(0)
        split = tl.program_id(1)
        k0 = pid_k * BK
        cols = k0 + tl.arange(0, BK)
        ranks = tl.arange(0, R)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :],
                    mask=(ranks[:, None] < r) & (cols[None, :] < K), other=0.0)  # fmt: skip
        acc = tl.zeros((R, BK), dtype=tl.float32)
        m_start = split * m_per_split
        for m0 in range(m_start, m_start + m_per_split, BM):
            rows = m0 + tl.arange(0, BM)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            at = rows[:, None].to(tl.int64) * K + cols[None, :]
            keep = _keep(seed, rows, k0, K, threshold, BM, BK)
            dh = tl.load(dh_ptr + rows[:, None] * r + ranks[None, :],
                         mask=(rows[:, None] < M) & (ranks[None, :] < r), other=0.0)  # fmt: skip
            x = tl.load(x_ptr + at, mask=inside, other=0.0)
            xd = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            acc += tl.dot(tl.trans(dh), xd)
            if HAS_DX:
                ddx = tl.dot(dh, a)
                dx = tl.load(dx_ptr + at, mask=inside, other=0.0)
                dx = dx.to(tl.float32) + tl.where(keep, ddx * scale, 0.0)
                tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        out = part_ptr + split.to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :]
        tl.store(out, acc, mask=cols[None, :] < K)


def _threshold(p: float) -> tuple[int, float]:
    """The mask's 16-bit threshold for dropout `p`, and the scale that keeps the expectation."""
    t = min(65535, round(p * 65536))
    return t, 65536 / (65536 - t)


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())  # tl.dot wants every dimension >= 16


@functools.cache
def _programs(device: torch.device) -> int:
    """Enough programs to fill the GPU about four times over (the kernels are bound by memory bandwidth)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# (rows, columns, warps[, pipeline stages]) of a program's tile, forward and backward: from benchmarks/lora_kernels.py
# on an H100 at rank 8. Larger ranks need more shared memory; `_fitting` shrinks the tile until the kernel compiles.
FWD_TILE = (64, 128, 4)
BWD_TILE = (64, 128, 4)
_fitted: dict[tuple[str, int], tuple[int, int, int]] = {}


def _fitting(kind: str, rb: int, tile, attempt):
    """attempt(tile) with the first tile that fits the GPU's shared memory, remembered per (kind, rank)."""
    tile = tile or _fitted.get((kind, rb)) or (FWD_TILE if kind == "fwd" else BWD_TILE)
    while True:
        try:
            out = attempt(tile)
        except triton.runtime.errors.OutOfResources:  # raised when compiling, before anything is written
            bm, bk, *rest = tile
            if bk == 32 and bm == 16:
                raise
            tile = (bm, bk // 2, *rest) if bk > 32 else (bm // 2, bk, *rest)
            continue
        _fitted[(kind, rb)] = tile
        return out


def _stages(stages: list) -> dict:
    return {"num_stages": stages[0]} if stages else {}  # else Triton's default


def dropout_matmul(x: torch.Tensor, a: torch.Tensor, p: float, seed: int, tile=None) -> torch.Tensor:
    """dropout(x, p) @ a.T for x [M, K], a [r, K], with the mask given by `seed`; returns [M, r] in x's dtype."""
    return _fitting("fwd", _rank_block(a.shape[0]), tile, lambda t: _dropout_matmul(x, a, p, seed, t))


def dropout_matmul_backward(x, dh, a, dx, p: float, seed: int, tile=None) -> torch.Tensor:
    """The backward of `dropout_matmul`: adds d(x) into `dx` in place (when given) and returns dA [r, K] in
    a's dtype. `dh` is the [M, r] gradient of the result."""
    attempt = lambda t: _dropout_matmul_backward(x, dh, a, dx, p, seed, t)  # noqa: E731
    return _fitting("bwd", _rank_block(a.shape[0]), tile, attempt)


def _dropout_matmul(x, a, p, seed, tile):
    fwd, _ = _kernels()
    (m, k), r = x.shape, a.shape[0]
    (bm, bk, warps, *stages), rb = tile, _rank_block(r)
    m_blocks = triton.cdiv(m, bm)
    k_blocks = triton.cdiv(k, bk)
    splits = max(1, min(k_blocks, _programs(x.device) // m_blocks))
    k_per_split = triton.cdiv(k_blocks, splits) * bk
    splits = triton.cdiv(k, k_per_split)
    # a split of its own writes the result's dtype directly; several write float32 partial sums
    part = torch.empty(splits, m, rb, device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
    fwd[(m_blocks, splits)](x, a, part, m, k, r, k_per_split, seed, *_threshold(p),
                            BM=bm, BK=bk, R=rb, num_warps=warps, **_stages(stages))  # fmt: skip
    return (part[0] if splits == 1 else part.sum(0).to(x.dtype))[:, :r]


def _dropout_matmul_backward(x, dh, a, dx, p, seed, tile):
    _, bwd = _kernels()
    (m, k), r = x.shape, a.shape[0]
    (bm, bk, warps, *stages), rb = tile, _rank_block(r)
    dh = dh.contiguous()
    k_blocks = triton.cdiv(k, bk)
    m_blocks = triton.cdiv(m, bm)
    splits = max(1, min(m_blocks, _programs(x.device) // k_blocks))
    m_per_split = triton.cdiv(m_blocks, splits) * bm
    splits = triton.cdiv(m, m_per_split)
    part = torch.empty(splits, rb, k, device=x.device, dtype=torch.float32)
    bwd[(k_blocks, splits)](x, dh, a, x if dx is None else dx, part, m, k, r, m_per_split, seed, *_threshold(p),
                            HAS_DX=dx is not None, BM=bm, BK=bk, R=rb, num_warps=warps, **_stages(stages))  # fmt: skip
    return part[0, :r].to(a.dtype) if splits == 1 else part[:, :r].sum(0).to(a.dtype)


def _base_linear(x2: torch.Tensor, weight, bias) -> torch.Tensor:
    """The frozen base's product: a weight tensor, or a quantized weight (mhsft.train.fp8.Float8Weight, ...) that
    computes its own `linear(x2, bias)` and `input_grad(g)`."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x2, weight, bias)
    return weight.linear(x2, bias)


def _base_input_grad(g: torch.Tensor, weight) -> torch.Tensor:
    return g @ weight if isinstance(weight, torch.Tensor) else weight.input_grad(g)


class _Siblings:
    """The LoRA linears that read one input tensor (q/k/v; gate/up) in one forward: their input gradients go into
    one buffer (cuBLAS accumulating into it, the LoRA kernels adding in place) and the last of them to run its
    backward hands it to autograd; the others return none. Autograd would otherwise write one gradient per linear
    and add them (24 ms of a 7B 8 x 3072 step on an H200: benchmarks/NOTES.md). Every member is in the graph in
    the models this trains (attention uses q, k and v; the MLP gate and up), so the count reaches zero."""

    __slots__ = ("x", "pending", "dx", "__weakref__")

    def __init__(self, x: torch.Tensor):
        self.x, self.pending, self.dx = weakref.ref(x), 0, None


_last: list = [None]  # the _Siblings of the latest forward call, weakly


def _siblings(x: torch.Tensor) -> _Siblings | None:
    """The group `x` joins: the previous call's when it read this same tensor, else a new one (none without a
    gradient to compute). Checkpointing's recompute makes new input tensors, so its calls never join the
    original forward's groups, which the backward uses."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return None
    group = _last[0]() if _last[0] is not None else None
    if group is None or group.x() is not x:
        group = _Siblings(x)
        _last[0] = weakref.ref(group)
    group.pending += 1
    return group


def _accumulate_input_grad(group: _Siblings | None, g: torch.Tensor, weight) -> torch.Tensor:
    """The group's buffer with this linear's base input gradient g @ W added (created by the first member)."""
    if group is None or group.dx is None:
        dx = _base_input_grad(g, weight)
        if group is not None:
            group.dx = dx
        return dx
    if isinstance(weight, torch.Tensor):
        return group.dx.addmm_(g, weight)
    return group.dx.add_(weight.input_grad(g))


def _hand_over(group: _Siblings | None, dx: torch.Tensor) -> torch.Tensor | None:
    """dx for autograd from the group's last member to run, none from the others."""
    if group is None:
        return dx
    group.pending -= 1
    if group.pending:
        return None
    group.dx = None
    return dx


class _LoRALinear(torch.autograd.Function):
    """base(x) + (dropout(x) @ a.T) @ bt for a frozen base (`_base_linear`); gradients for x, a and bt."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, bt, p, seed, group):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = _base_linear(x2, weight, bias)
        h = dropout_matmul(x2, a, p, seed) if p > 0 else x2 @ a.t()
        out.addmm_(h, bt)
        ctx.save_for_backward(x2, a, bt, h)
        ctx.weight = weight  # frozen: kept by reference, not as a saved tensor (it may be a quantized weight)
        ctx.p, ctx.seed, ctx.x_shape, ctx.group = p, seed, x.shape, group
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, a, bt, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dbt = h.t() @ g if ctx.needs_input_grad[4] else None
        dh = g @ bt.t()
        group = ctx.group if ctx.needs_input_grad[0] else None
        dx = _accumulate_input_grad(group, g, ctx.weight) if ctx.needs_input_grad[0] else None
        if ctx.p > 0:
            da = dropout_matmul_backward(x2, dh, a, dx, ctx.p, ctx.seed)
        else:
            da = dh.t() @ x2
            if dx is not None:
                dx.addmm_(dh, a)
        dx = None if dx is None else _hand_over(group, dx)
        return None if dx is None else dx.view(ctx.x_shape), None, None, da, dbt, None, None, None


# Tests switch the sharing off to compare against one input gradient per linear
share_input_grad = True


def lora_linear(x, weight, bias, a, bt, p: float) -> torch.Tensor:
    seed = int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0
    group = _siblings(x) if share_input_grad else None
    return _LoRALinear.apply(x, weight, bias, a, bt, p, seed, group)


class _Bnb4bitBase:
    """bitsandbytes' 4-bit linear as a frozen base (QLoRA): its own forward (bias included), and for the input
    gradient g @ W with W dequantized for the call, as bitsandbytes' MatMul4Bit does in its backward."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    def linear(self, x2: torch.Tensor, bias) -> torch.Tensor:
        return self.layer(x2)

    def input_grad(self, g: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        w = self.layer.weight
        return g @ dequantize_4bit(w.data, w.quant_state).to(g.dtype)


def _is_bnb_4bit(base: torch.nn.Module) -> bool:
    return type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes")


def frozen_base(base: torch.nn.Module):
    """What `_LoRALinear` multiplies by: the weight, its FP8 copies (mhsft.train.fp8), or a 4-bit layer."""
    if _is_bnb_4bit(base):
        return _Bnb4bitBase(base)
    return getattr(base, "_mhsft_fp8", None) or base.weight


def usable(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """The fused path serves a plain nn.Linear (or bitsandbytes 4-bit) base with frozen weights and one active
    adapter, on CUDA with Triton (or on the CPU under Triton's interpreter, for tests)."""
    base = module.base_layer
    if type(base) is not torch.nn.Linear and not _is_bnb_4bit(base):
        return False
    if base.weight.requires_grad or x.dtype not in _DTYPES:
        return False
    if base.bias is not None and base.bias.requires_grad or len(module.active_adapters) != 1:
        return False
    if module.active_adapters[0] not in module.lora_A:
        return False
    # DeepSpeed ZeRO-3 gathers a module's weights in a hook around that module's own forward, which this path
    # bypasses by reading base_layer.weight directly
    if hasattr(base.weight, "ds_id"):
        return False
    return (x.is_cuda or on_cpu) and triton is not None


def forward(module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA linear's training forward through `lora_linear` (the caller checked `usable`)."""
    name = module.active_adapters[0]
    drop = module.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and module.training else 0.0
    a = module.lora_A[name].weight.to(x.dtype)
    bt = (module.lora_B[name].weight * module.scaling[name]).to(x.dtype).t()
    base = module.base_layer
    bias = None if _is_bnb_4bit(base) else base.bias  # the 4-bit layer's own forward adds it
    return lora_linear(x, frozen_base(base), bias, a, bt, p)
