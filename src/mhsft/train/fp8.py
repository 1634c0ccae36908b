"""FP8 matmuls for the frozen base weights of LoRA training (`mhsft sft --fp8 true`, Hopper GPUs).

The problem. The base linears' GEMMs are 55-60% of a 7B LoRA step (benchmarks/NOTES.md's profiles), and Hopper's
tensor cores multiply FP8 (e4m3) at twice their bf16 rate. In LoRA the base weights are frozen: they need no
weight gradient, only the forward product x W^T and the input gradient g W.

What this does. Each frozen base weight is quantized ONCE, when training starts, into two e4m3 copies with one
scale per row: [out, in] for the forward and [in, out] for the input gradient (a scale must run along the
dimension that is not summed). Together they take the bf16 weight's bytes, which are freed. Per call, the
activation x (forward) and the output gradient g (backward) are quantized with one scale per row, in one Triton
kernel each, and multiplied by `torch._scaled_mm` (cuBLASLt / CUTLASS rowwise-scaled FP8 GEMMs) into bf16. LoRA's
A and B, the LM head, norms and attention stay in bf16. q/k/v and gate/up read the same input: its quantization is
done once and reused (`_last_input`).

Why not a library. torchao's float8 training converts nn.Linear modules and re-quantizes every weight in every
step, because it trains them; here the weights never change, and the LoRA layers' own fused path
(mhsft.train.fused_lora) needs a matmul it can call, not a module. The GEMM itself is PyTorch's.

Accuracy costs: e4m3 keeps 3 mantissa bits; with one scale per row the relative error of a product is ~2-4%
per element before accumulation. What it does to training is measured, not assumed (benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch

try:  # module-level names: Triton's interpreter patches `tl` in the kernels' globals
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
ALIGN = 16  # torch._scaled_mm wants every dimension a multiple of 16
one_pass = True  # rows up to ONE_PASS_MAX_K quantized in one read (the benchmark A/Bs it against two passes)


def supported(device: torch.device) -> str | None:
    """None when this device runs the FP8 path, else why not (one line)."""
    if device.type != "cuda":
        return f"--fp8 needs an NVIDIA Hopper GPU (H100/H200); this run is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        name = torch.cuda.get_device_name(device)
        return (
            f"--fp8 needs an NVIDIA Hopper GPU (H100/H200: rowwise-scaled FP8 matmuls); this is {name} "
            f"(compute capability {major}.{minor})"
        )
    if triton is None:
        return "--fp8 needs Triton (it comes with CUDA builds of torch)"
    return None


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, BM: tl.constexpr, BK: tl.constexpr):
        # two passes over BM rows: their absolute maxima, then x / scale cast to e4m3 (the second read mostly hits L2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        amax = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=inside, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = tl.maximum(amax, 1e-12) / 448.0
        tl.store(s_ptr + rows, scale, mask=rows < M)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            at = rows[:, None].to(tl.int64) * K + cols[None, :]
            x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale[:, None], -448.0, 448.0)
            tl.store(q_ptr + at, q.to(q_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["M"])
    def _quantize_row_once_kernel(x_ptr, q_ptr, s_ptr, M, K, BLOCK: tl.constexpr):
        # one row a program, held in registers: one read and one write per element (the two-pass kernel took 61 ms
        # of a 7B step's backward on the H200, ~1.6x the bytes of a single pass)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        at = row.to(tl.int64) * K + cols
        x = tl.load(x_ptr + at, mask=cols < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        tl.store(s_ptr + row, scale)
        tl.store(q_ptr + at, tl.clamp(x / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=cols < K)


ONE_PASS_MAX_K = 32768  # a row of up to this many elements fits one program's registers (16 warps, 64 each)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): x [M, K] as e4m3 with one float32 scale per row ([M, 1]); q * scale ~ x."""
    x = x.contiguous()
    m, k = x.shape
    if x.is_cuda and triton is not None:
        q = torch.empty(m, k, device=x.device, dtype=E4M3)
        s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
        if k <= ONE_PASS_MAX_K and one_pass:
            block = triton.next_power_of_2(k)
            _quantize_row_once_kernel[(m,)](
                x, q, s, m, k, BLOCK=block, num_warps=min(16, max(4, block // 2048))
            )
        else:
            bm = 4
            _quantize_rows_kernel[(triton.cdiv(m, bm),)](x, q, s, m, k, BM=bm, BK=1024, num_warps=4)
        return q, s
    s = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


class Float8Weight:
    """A frozen [out, in] weight as two rowwise-scaled e4m3 copies: `fwd` [out, in] with a scale per output row,
    `bwd` [in, out] with a scale per input column."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        self.fwd, fwd_scale = quantize_rows(w)
        self.bwd, bwd_scale = quantize_rows(w.t())
        self.fwd_scale = fwd_scale.view(1, -1).contiguous()  # _scaled_mm's scale_b is [1, N]
        self.bwd_scale = bwd_scale.view(1, -1).contiguous()
        self.shape, self.dtype, self.device = tuple(w.shape), w.dtype, w.device

    def dequantize(self) -> torch.Tensor:
        return (self.fwd.float() * self.fwd_scale.t()).to(self.dtype)

    def linear(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x2 [M, in] @ W^T (+ bias) -> [M, out] in x2's dtype (the frozen-base interface of fused_lora)."""
        q, s = _quantized_input(x2)
        out = _mm(q, s, self.fwd.t(), self.fwd_scale, x2.dtype, fast_accum=True)
        return out if bias is None else out.add_(bias)

    def input_grad(self, g: torch.Tensor) -> torch.Tensor:
        """g [M, out] @ W -> [M, in] in g's dtype (accumulated without fast accumulation: these are gradients)."""
        q, s = quantize_rows(g)
        return _mm(q, s, self.bwd.t(), self.bwd_scale, g.dtype, fast_accum=False)


_last_input: list = [
    None,
    None,
    None,
]  # (x, its version, (q, scale)): q/k/v and gate/up quantize their input once


def _quantized_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the cache holds x itself, so its memory cannot be reused by another tensor while the entry lives
    cached, version, qs = _last_input
    if cached is x or (
        cached is not None
        and cached.data_ptr() == x.data_ptr()
        and cached.shape == x.shape
        and cached.stride() == x.stride()
        and cached.dtype == x.dtype
        and version == x._version
    ):
        return qs
    qs = quantize_rows(x)
    _last_input[:] = [x, x._version, qs]
    return qs


def forget_inputs() -> None:
    _last_input[:] = [None, None, None]


def _mm(a_q, a_s, b_t, b_s, out_dtype, fast_accum: bool) -> torch.Tensor:
    m = a_q.shape[0]
    pad = -m % ALIGN
    if pad:  # the trainer pads its batches to 16 tokens; other callers (validation, tests) pay a copy
        a_q = torch.cat([a_q, a_q.new_zeros(pad, a_q.shape[1])])
        a_s = torch.cat([a_s, a_s.new_ones(pad, 1)])
    out = torch._scaled_mm(a_q, b_t, scale_a=a_s, scale_b=b_s, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return out[:m] if pad else out


def convert(model: torch.nn.Module) -> int:
    """Quantize the base weight of every LoRA linear of `model` (frozen, plain nn.Linear) to a Float8Weight kept
    as `base_layer._mhsft_fp8`; the bf16 weight is replaced by the forward copy, so that a path that would read it
    as bf16 fails loudly instead of computing with it. Returns how many layers were converted."""
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
            continue
        base = module.base_layer
        w8 = Float8Weight(base.weight)
        base._mhsft_fp8 = w8
        base.weight = torch.nn.Parameter(w8.fwd, requires_grad=False)
        n += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n
