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
The linears that read one input (q/k/v, gate/up: `SIBLINGS`) run as one group: the kernels read x (and, in the
backward, the shared input gradient) once for all members, each with its own mask, instead of once per member,
and the base GEMMs accumulate their input gradients into that one buffer (on an H100 at 24,576 tokens x 3584 the
3-member kernels take 0.32 / 0.70 ms forward / backward against 3 x 0.13 / 3 x 0.29 one member at a time; they
are bound by the Philox arithmetic and registers, not memory). The base matmuls and the rank-r matmuls with B
stay with cuBLAS; the base GEMM accumulates onto the rank-r update (`fold_update`). Only x, the [tokens, r]
hiddens and the seeds are kept for the backward (and, with `store_masks`, the masks as bits, 1/16 of x's bytes per
member, so that the backward skips Philox; off: slower on an H100, benchmarks/NOTES.md). Seeds come from torch's CPU generator, so `torch.manual_seed`
reproduces a run and activation checkpointing (which restores the RNG state before recomputing) regenerates the
same masks.

Triton is not a hand-written replacement for a library here: no library ships dropout fused into a
skinny matmul with the mask recomputed in the backward (Unsloth and Liger skip dropout instead).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from mhsft.train import concat_update, remade_norms

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
    # The mask. One Philox4x32 call (`tl.randint4x`, PHILOX_ROUNDS rounds) gives 4 x 32 random bits, cut into 8 16-bit draws for 8
    # neighbouring elements: a draw per element (`tl.rand`) made the kernels compute-bound on Philox, at a
    # third of the memory bandwidth (measured on an H100). Element (m, k) is kept when its draw >= threshold,
    # threshold = round(p * 65536), so the kept fraction is exactly 1 - threshold / 65536 and the scale is its
    # inverse. The uint32 counter m * ceil(K / 8) + k // 8 is distinct for the first 2^35 elements.
    @triton.jit
    def _randoms(seed, rows, k0, K, BK: tl.constexpr, ROUNDS: tl.constexpr):
        # 4 x [BM, BK / 8] uint32: the random bits of the tile's groups of 8 elements
        groups = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.uint32)
        counter = rows[:, None].to(tl.uint32) * ((K + 7) // 8).to(tl.uint32) + groups[None, :]
        return tl.randint4x(seed, counter, ROUNDS)

    @triton.jit
    def _keep(r0, r1, r2, r3, threshold, BM: tl.constexpr, BK: tl.constexpr):
        # element 8 n + e of a row draws half e % 2 of r_(e // 4 + 2 (e // 2 % 2)) of group n (as join lays out)
        bits = tl.join(tl.join(r0, r1), tl.join(r2, r3))
        draws = tl.join(bits & 0xFFFF, bits >> 16)  # [BM, BK / 8, 2, 2, 2]
        return tl.reshape(draws, (BM, BK)) >= threshold

    @triton.jit
    def _dropped(
        x, seed, rows, k0, K, threshold, scale, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr
    ):
        # (keep, dropout(x)) of one member's mask over the [BM, BK] tile x
        r0, r1, r2, r3 = _randoms(seed, rows, k0, K, BK, ROUNDS)
        keep = _keep(r0, r1, r2, r3, threshold, BM, BK)
        return keep, tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)

    # Stored masks (`store_masks`): the forward packs member g's keep bits 8 to a byte, [G, M, ceil(K / 8)] uint8,
    # bit e of byte n = element 8 n + e, and the backward unpacks them instead of running Philox again (a read of
    # 1/16 of x's bytes per member).
    @triton.jit
    def _mask_at(mask_ptr, g, M, KB, rows, k0, BK: tl.constexpr):
        bytes_ = k0 // 8 + tl.arange(0, BK // 8)
        at = mask_ptr + g * M.to(tl.int64) * KB + rows[:, None].to(tl.int64) * KB + bytes_[None, :]
        return at, (rows[:, None] < M) & (bytes_[None, :] < KB)

    @triton.jit
    def _bit(r, half: tl.constexpr, threshold, e: tl.constexpr):
        draw = (r >> 16) if half else (r & 0xFFFF)
        return (draw >= threshold).to(tl.uint32) << e

    @triton.jit
    def _dropped_stored(x, seed, mask_ptr, g, M, rows, k0, K, threshold, scale,
                        BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):  # fmt: skip
        # dropout(x) of member g, its mask stored as bits: packed from the random words, in `_keep`'s order, on
        # [BM, BK / 8] (packing the [BM, BK] mask took twice the registers and spilled)
        r0, r1, r2, r3 = _randoms(seed, rows, k0, K, BK, ROUNDS)
        packed = _bit(r0, 0, threshold, 0) | _bit(r0, 1, threshold, 1) | _bit(r2, 0, threshold, 2)
        packed |= _bit(r2, 1, threshold, 3) | _bit(r1, 0, threshold, 4) | _bit(r1, 1, threshold, 5)
        packed |= _bit(r3, 0, threshold, 6) | _bit(r3, 1, threshold, 7)
        packed = packed.to(tl.uint8)
        at, inside = _mask_at(mask_ptr, g, M, (K + 7) // 8, rows, k0, BK)
        tl.store(at, packed, mask=inside)
        keep = _unpacked(packed, BM, BK)
        return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)

    @triton.jit
    def _unpacked(packed, BM: tl.constexpr, BK: tl.constexpr):
        bits = (packed[:, :, None] >> tl.arange(0, 8).to(tl.uint8)[None, None, :]) & 1
        return tl.reshape(bits, (BM, BK)) != 0

    @triton.jit
    def _load_mask(mask_ptr, g, M, KB, rows, k0, BM: tl.constexpr, BK: tl.constexpr):
        at, inside = _mask_at(mask_ptr, g, M, KB, rows, k0, BK)
        return _unpacked(tl.load(at, mask=inside, other=0), BM, BK)

    @triton.jit
    def _member(x, seed, mask_ptr, g, M, rows, k0, K, threshold, scale,
                STORE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):  # fmt: skip
        # dropout(x) of member g in the forward, its mask stored when STORE
        if STORE:
            return _dropped_stored(x, seed, mask_ptr, g, M, rows, k0, K, threshold, scale, BM, BK, ROUNDS)
        return _dropped(x, seed, rows, k0, K, threshold, scale, BM, BK, ROUNDS)[1]

    @triton.jit
    def _a_t(a_ptr, g, r, K, ranks, cols):
        # member g's A^T tile [BK, R] (A stacked as [G, r, K])
        at = a_ptr + g * r * K + ranks[None, :] * K + cols[:, None]
        return tl.load(at, mask=(ranks[None, :] < r) & (cols[:, None] < K), other=0.0)

    @triton.jit(do_not_specialize=["s0", "s1", "s2", "M"])
    def _fwd(x_ptr, a_ptr, part_ptr, mask_ptr, M, K, r, k_per_split, s0, s1, s2, threshold, scale,
             G: tl.constexpr, STORE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, R: tl.constexpr,
             ROUNDS: tl.constexpr):  # fmt: skip
        # part[split, g, m, :r] = sum over this split's K range of (x * keep_g * scale)[m, k] * A_g[:, k], for the
        # G (<= 3) linears that read x: x is read once for all of them, each member has its own mask (seed s_g)
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        ranks = tl.arange(0, R)
        acc0 = tl.zeros((BM, R), dtype=tl.float32)
        acc1 = tl.zeros((BM, R), dtype=tl.float32)
        acc2 = tl.zeros((BM, R), dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=inside, other=0.0)
            xd = _member(x, s0, mask_ptr, 0, M, rows, k0, K, threshold, scale, STORE, BM, BK, ROUNDS)
            acc0 += tl.dot(xd, _a_t(a_ptr, 0, r, K, ranks, cols))
            if G > 1:
                xd = _member(x, s1, mask_ptr, 1, M, rows, k0, K, threshold, scale, STORE, BM, BK, ROUNDS)
                acc1 += tl.dot(xd, _a_t(a_ptr, 1, r, K, ranks, cols))
            if G > 2:
                xd = _member(x, s2, mask_ptr, 2, M, rows, k0, K, threshold, scale, STORE, BM, BK, ROUNDS)
                acc2 += tl.dot(xd, _a_t(a_ptr, 2, r, K, ranks, cols))
        member = M.to(tl.int64) * R  # elements between two members' partial sums
        out = part_ptr + split.to(tl.int64) * G * member + rows[:, None].to(tl.int64) * R + ranks[None, :]
        ty = part_ptr.dtype.element_ty
        tl.store(out, acc0.to(ty), mask=rows[:, None] < M)
        if G > 1:
            tl.store(out + member, acc1.to(ty), mask=rows[:, None] < M)
        if G > 2:
            tl.store(out + 2 * member, acc2.to(ty), mask=rows[:, None] < M)

    @triton.jit
    def _a(a_ptr, g, r, K, ranks, cols):
        # member g's A tile [R, BK]
        at = a_ptr + g * r * K + ranks[:, None] * K + cols[None, :]
        return tl.load(at, mask=(ranks[:, None] < r) & (cols[None, :] < K), other=0.0)

    @triton.jit
    def _dh(dh_ptr, g, M, r, rows, ranks):
        # member g's [BM, R] rows of dh (stacked as [G, M, r])
        at = dh_ptr + g * M.to(tl.int64) * r + rows[:, None] * r + ranks[None, :]
        return tl.load(at, mask=(rows[:, None] < M) & (ranks[None, :] < r), other=0.0)

    @triton.jit
    def _kept(x, seed, mask_ptr, g, M, rows, k0, K, threshold, scale,
              LOAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):  # fmt: skip
        # (keep, dropout(x)) of member g: the forward's stored bits, or the mask drawn again
        if LOAD:
            keep = _load_mask(mask_ptr, g, M, (K + 7) // 8, rows, k0, BM, BK)
            return keep, tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        return _dropped(x, seed, rows, k0, K, threshold, scale, BM, BK, ROUNDS)

    @triton.jit
    def _bwd_add(acc, ddx, x, dh_ptr, g, a, seed, mask_ptr, M, r, rows, ranks, k0, K, threshold, scale,
                 HAS_DX: tl.constexpr, LOAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                 ROUNDS: tl.constexpr):  # fmt: skip
        # member g (> 0) added to a [BM, BK] tile's dA accumulator and, where kept, to the input gradient's update
        keep, xd = _kept(x, seed, mask_ptr, g, M, rows, k0, K, threshold, scale, LOAD, BM, BK, ROUNDS)
        dh = _dh(dh_ptr, g, M, r, rows, ranks)
        acc += tl.dot(tl.trans(dh), xd)
        if HAS_DX:
            ddx += tl.where(keep, tl.dot(dh, a), 0.0)
        return acc, ddx

    @triton.jit(do_not_specialize=["s0", "s1", "s2", "M"])
    def _bwd(x_ptr, dh_ptr, a_ptr, dx_ptr, part_ptr, mask_ptr, M, K, r, m_per_split, s0, s1, s2, threshold,
             scale, G: tl.constexpr, HAS_DX: tl.constexpr, LOAD: tl.constexpr, BM: tl.constexpr,
             BK: tl.constexpr, R: tl.constexpr, ROUNDS: tl.constexpr):  # fmt: skip
        # dx[m, k] += sum over members g of (dh_g @ A_g)[m, k] * keep_g * scale;  part[split, g, :, k] = sum over
        # this split's rows of dh_g[m, :]^T (x * keep_g * scale)[m, k]. x and dx are read once for all members.
        pid_k = tl.program_id(0)
        split = tl.program_id(1)
        k0 = pid_k * BK
        cols = k0 + tl.arange(0, BK)
        ranks = tl.arange(0, R)
        a0 = _a(a_ptr, 0, r, K, ranks, cols)
        a1 = _a(a_ptr, 1 if G > 1 else 0, r, K, ranks, cols)
        a2 = _a(a_ptr, 2 if G > 2 else 0, r, K, ranks, cols)
        acc0 = tl.zeros((R, BK), dtype=tl.float32)
        acc1 = tl.zeros((R, BK), dtype=tl.float32)
        acc2 = tl.zeros((R, BK), dtype=tl.float32)
        m_start = split * m_per_split
        for m0 in range(m_start, m_start + m_per_split, BM):
            rows = m0 + tl.arange(0, BM)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            at = rows[:, None].to(tl.int64) * K + cols[None, :]
            x = tl.load(x_ptr + at, mask=inside, other=0.0)
            keep, xd = _kept(x, s0, mask_ptr, 0, M, rows, k0, K, threshold, scale, LOAD, BM, BK, ROUNDS)
            dh = _dh(dh_ptr, 0, M, r, rows, ranks)
            acc0 += tl.dot(tl.trans(dh), xd)
            if HAS_DX:
                ddx = tl.where(keep, tl.dot(dh, a0), 0.0)
            else:
                ddx = 0.0  # unused: the members after the first take it along
            if G > 1:
                acc1, ddx = _bwd_add(acc1, ddx, x, dh_ptr, 1, a1, s1, mask_ptr, M, r, rows, ranks, k0, K, threshold,
                                     scale, HAS_DX, LOAD, BM, BK, ROUNDS)  # fmt: skip
            if G > 2:
                acc2, ddx = _bwd_add(acc2, ddx, x, dh_ptr, 2, a2, s2, mask_ptr, M, r, rows, ranks, k0, K, threshold,
                                     scale, HAS_DX, LOAD, BM, BK, ROUNDS)  # fmt: skip
            if HAS_DX:
                dx = tl.load(dx_ptr + at, mask=inside, other=0.0)
                dx = dx.to(tl.float32) + ddx * scale
                tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        member = R * K
        out = part_ptr + split.to(tl.int64) * G * member + ranks[:, None] * K + cols[None, :]
        tl.store(out, acc0, mask=cols[None, :] < K)
        if G > 1:
            tl.store(out + member, acc1, mask=cols[None, :] < K)
        if G > 2:
            tl.store(out + 2 * member, acc2, mask=cols[None, :] < K)


def _threshold(p: float) -> tuple[int, float]:
    """The mask's 16-bit threshold for dropout `p`, and the scale that keeps the expectation."""
    t = min(65535, round(p * 65536))
    return t, 65536 / (65536 - t)


# Philox rounds per draw: 10 is the Random123 default; 7 already passes TestU01's BigCrush (Salmon et al., 2011).
# The kernels are bound by this arithmetic, not by memory, once x is read for a group (benchmarks/NOTES.md); 7
# rounds made a 7B layer's LoRA kernels 4.1% faster than 10 on an H100 (`lora_kernels.py --rounds 10,7 --adopt`).
PHILOX_ROUNDS = 7


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())  # tl.dot wants every dimension >= 16


@functools.cache
def _programs(device: torch.device) -> int:
    """Enough programs to fill the GPU about four times over (the kernels are bound by memory bandwidth)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# (rows, columns, warps[, pipeline stages]) of a program's tile, forward and backward, by group size: the fastest of
# benchmarks/lora_kernels.py's sweep on an H100 at rank 8 and 24,576 tokens (results/lora_kernels_groups_7b_h100.json;
# a group's backward holds a dA accumulator per member: larger tiles spill registers, 4-10x slower). Larger ranks need
# more shared memory; `_fitting` shrinks the tile until the kernel compiles.
FWD_TILES = {1: (32, 128, 4), 2: (64, 64, 4), 3: (32, 128, 4)}
BWD_TILES = {1: (16, 128, 4), 2: (16, 64, 4), 3: (16, 128, 4)}
_fitted: dict[tuple[str, int, int], tuple] = {}


def _fitting(kind: str, g: int, rb: int, tile, attempt):
    """attempt(tile) with the given tile, else with the default tile for (kind, members, rank) shrunk until it fits
    the GPU's shared memory (what fits is remembered)."""
    if tile is not None:
        return attempt(tile)
    tile = _fitted.get((kind, g, rb)) or (FWD_TILES if kind == "fwd" else BWD_TILES)[g]
    while True:
        try:
            out = attempt(tile)
        except triton.runtime.errors.OutOfResources:  # raised when compiling, before anything is written
            bm, bk, *rest = tile
            if bk == 32 and bm == 16:
                raise
            tile = (bm, bk // 2, *rest) if bk > 32 else (bm // 2, bk, *rest)
            continue
        _fitted[(kind, g, rb)] = tile
        return out


def _stages(stages: list) -> dict:
    return {"num_stages": stages[0]} if stages else {}  # else Triton's default


def _seeds(seeds) -> tuple[int, int, int]:
    if not 1 <= len(seeds) <= 3:
        raise ValueError(f"the fused LoRA kernels take 1 to 3 linears reading one input, not {len(seeds)}")
    return (*seeds, *[0] * (3 - len(seeds)))


def mask_buffer(x: torch.Tensor, members: int) -> torch.Tensor:
    """Room for `members` masks over x [M, K], 8 elements a byte (`dropout_matmul_group(masks=...)`)."""
    m, k = x.shape
    return torch.empty(members, m, (k + 7) // 8, device=x.device, dtype=torch.uint8)


def dropout_matmul_group(
    x: torch.Tensor, a: torch.Tensor, p: float, seeds, tile=None, masks: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """[dropout_g(x, p) @ a[g].T for each g] for x [M, K] and a [G, r, K] (G <= 3), member g's mask given by
    seeds[g]; x is read once. Returns G tensors [M, r] in x's dtype. With `masks` (`mask_buffer`) the masks are
    also written there, for the backward to read instead of drawing them again."""
    attempt = lambda t: _dropout_matmul(x, a, p, seeds, t, masks)  # noqa: E731
    return _fitting("fwd", a.shape[0], _rank_block(a.shape[1]), tile, attempt)


def dropout_matmul_backward_group(x, dh, a, dx, p: float, seeds, tile=None, masks=None) -> torch.Tensor:
    """The backward of `dropout_matmul_group`: adds every member's d(x) into `dx` in place (when given) and returns
    dA [G, r, K] in a's dtype. `dh` [G, M, r] stacks the gradients of the members' results; `masks` are the
    forward's stored masks (else they are drawn again from the seeds)."""
    attempt = lambda t: _dropout_matmul_backward(x, dh, a, dx, p, seeds, t, masks)  # noqa: E731
    return _fitting("bwd", a.shape[0], _rank_block(a.shape[1]), tile, attempt)


def dropout_matmul(x: torch.Tensor, a: torch.Tensor, p: float, seed: int, tile=None) -> torch.Tensor:
    """dropout(x, p) @ a.T for x [M, K], a [r, K], with the mask given by `seed`; returns [M, r] in x's dtype."""
    return dropout_matmul_group(x, a[None], p, (seed,), tile)[0]


def dropout_matmul_backward(x, dh, a, dx, p: float, seed: int, tile=None) -> torch.Tensor:
    """The backward of `dropout_matmul`: adds d(x) into `dx` in place (when given) and returns dA [r, K] in
    a's dtype. `dh` is the [M, r] gradient of the result."""
    return dropout_matmul_backward_group(x, dh[None], a[None], dx, p, (seed,), tile)[0]


def _dropout_matmul(x, a, p, seeds, tile, masks):
    fwd, _ = _kernels()
    (m, k), (g, r, _) = x.shape, a.shape
    (bm, bk, warps, *stages), rb = tile, _rank_block(r)
    m_blocks = triton.cdiv(m, bm)
    k_blocks = triton.cdiv(k, bk)
    splits = max(1, min(k_blocks, _programs(x.device) // m_blocks))
    k_per_split = triton.cdiv(k_blocks, splits) * bk
    splits = triton.cdiv(k, k_per_split)
    # a split of its own writes the result's dtype directly; several write float32 partial sums
    part = torch.empty(splits, g, m, rb, device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
    fwd[(m_blocks, splits)](x, a.contiguous(), part, x if masks is None else masks, m, k, r, k_per_split,
                            *_seeds(seeds), *_threshold(p), G=g, STORE=masks is not None, BM=bm, BK=bk, R=rb,
                            ROUNDS=PHILOX_ROUNDS, num_warps=warps, **_stages(stages))  # fmt: skip
    h = part[0] if splits == 1 else part.sum(0).to(x.dtype)
    return list(h[:, :, :r].unbind(0))


def _dropout_matmul_backward(x, dh, a, dx, p, seeds, tile, masks):
    _, bwd = _kernels()
    (m, k), (g, r, _) = x.shape, a.shape
    (bm, bk, warps, *stages), rb = tile, _rank_block(r)
    dh = dh.contiguous()
    k_blocks = triton.cdiv(k, bk)
    m_blocks = triton.cdiv(m, bm)
    splits = max(1, min(m_blocks, _programs(x.device) // k_blocks))
    m_per_split = triton.cdiv(m_blocks, splits) * bm
    splits = triton.cdiv(m, m_per_split)
    part = torch.empty(splits, g, rb, k, device=x.device, dtype=torch.float32)
    bwd[(k_blocks, splits)](x, dh, a.contiguous(), x if dx is None else dx, part, x if masks is None else masks, m,
                            k, r, m_per_split, *_seeds(seeds), *_threshold(p), G=g, HAS_DX=dx is not None,
                            LOAD=masks is not None, BM=bm, BK=bk, R=rb, ROUNDS=PHILOX_ROUNDS, num_warps=warps,
                            **_stages(stages))  # fmt: skip
    return (part[0] if splits == 1 else part.sum(0))[:, :r].to(a.dtype)


def _base_linear(x2: torch.Tensor, weight, bias) -> torch.Tensor:
    """The frozen base's product: a weight tensor, or a quantized weight (mhsft.train.fp8.Float8Weight, ...) that
    computes its own `linear(x2, bias)` and `input_grad(g)`."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x2, weight, bias)
    return weight.linear(x2, bias)


# The base GEMM adds into the LoRA update (cuBLAS reads the output it accumulates into while it writes it) instead of
# the update adding into the base's output afterwards, a read and a write of [tokens, out] less per linear (for
# gate/up at 8 x 3072: 42 ms of a 1.39 s step went to that update, benchmarks/NOTES.md). Benchmarks switch it off
# for the A/B.
fold_update = True


def _base_plus_update(x2: torch.Tensor, weight, bias, h: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """base(x2) + h @ bt, as one accumulating base GEMM where the base is a plain weight."""
    if fold_update and isinstance(weight, torch.Tensor):
        out = torch.mm(h, bt) if bias is None else torch.addmm(bias, h, bt)
        return out.addmm_(x2, weight.t())
    return _base_linear(x2, weight, bias).addmm_(h, bt)


def _add_input_grad(dx: torch.Tensor | None, g: torch.Tensor, weight) -> torch.Tensor:
    """dx + g @ W (the base's input gradient), accumulated into dx by cuBLAS where the base is a plain weight."""
    if dx is None:
        return g @ weight if isinstance(weight, torch.Tensor) else weight.input_grad(g)
    if isinstance(weight, torch.Tensor):
        return dx.addmm_(g, weight)
    return dx.add_(weight.input_grad(g))


# The forward stores each member's mask as bits and the backward reads them, instead of drawing them again with
# Philox: the backward kernels are bound by that arithmetic (benchmarks/NOTES.md). Costs 1 bit per input element
# per member until the backward (3.4 GB for a 7B 8 x 3072 micro-batch without recompute, about 3% of its
# activations); under recompute only one layer's. Measured slower on an H100 (a 7B layer's kernels 4.37 against
# 3.75 ms at 7 rounds, the step -1.8%): unpacking the bits costs more than the rounds it saves. Off; benchmarks
# switch it for the A/B.
store_masks = False


def group_forward(x2, weights, biases, p: float, seeds, a_all, bts, keep_masks: bool):
    """(outputs, the members' h = dropout(x2) @ a.T, stored masks or None) of the G LoRA linears reading x2 [M, K]
    (`_LoRAGroup`'s forward; mhsft.train.swiglu_down calls it on an input it does not keep)."""
    masks = mask_buffer(x2, len(a_all)) if p > 0 and store_masks and keep_masks else None
    if p > 0:
        hs = dropout_matmul_group(x2, a_all, p, seeds, masks=masks)
    else:  # one skinny GEMM reads x for every member
        hs = (x2 @ a_all.flatten(0, 1).t()).split(a_all.shape[1], dim=1)
    return group_outputs(x2, weights, biases, hs, bts), hs, masks


def group_outputs(x2, weights, biases, hs, bts) -> list[torch.Tensor]:
    """The members' outputs base_g(x2) + h_g @ bt_g from their h = dropout(x2) @ a.T: the forward's last part, and
    what mhsft.train.swiglu_down runs again in the backward to recompute gate and up (the same values, bit for bit:
    the same GEMMs on the same inputs)."""
    bufs = _concat_buffers(x2, weights, hs[0].shape[1])
    if bufs is not None:  # the update inside the base GEMM (mhsft.train.concat_update)
        return concat_update.forward(x2, bufs, biases, hs, bts)
    return [_base_plus_update(x2, w, b, h, bt) for w, b, h, bt in zip(weights, biases, hs, bts)]


def _concat_buffers(x2: torch.Tensor, weights, r: int):
    if not concat_update.worth(weights, x2.shape[1]):
        return None
    return concat_update.buffers(weights, r, x2.dtype)


def group_backward(x2, grads, weights, p: float, seeds, a_all, bts, hs, masks, need_x: bool, need_bt):
    """(dx2 or None, da [G, r, K], [dbt or None per member]) from the outputs' gradients `grads` ([M, N_g] each)."""
    bufs = _concat_buffers(x2, weights, a_all.shape[1]) if need_x else None
    dbts = [h.t() @ g if need else None for g, h, need in zip(grads, hs, need_bt)]
    if bufs is not None:  # dx and every dh out of one accumulated GEMM per member (mhsft.train.concat_update)
        dx, dh = concat_update.input_grads(grads, bufs, bts, x2.shape[1], a_all.shape[1])
    else:
        dh = torch.empty(len(grads), x2.shape[0], a_all.shape[1], device=x2.device, dtype=grads[0].dtype)
        dx = None
        for j, (g, weight, bt) in enumerate(zip(grads, weights, bts)):
            torch.mm(g, bt.t(), out=dh[j])
            if need_x:
                dx = _add_input_grad(dx, g, weight)
    if p > 0:
        da = dropout_matmul_backward_group(x2, dh, a_all, dx, p, seeds, masks=masks)
    else:
        dh_all = dh.transpose(0, 1).flatten(1)  # [M, n * r]: one GEMM each way for every member
        da = (dh_all.t() @ x2).view(a_all.shape)
        if dx is not None:
            dx.addmm_(dh_all, a_all.flatten(0, 1))
    return dx, da, dbts


class _LoRAGroup(torch.autograd.Function):
    """base_g(x) + (dropout_g(x) @ a_g.T) @ bt_g for the G linears that read x (q/k/v, or gate/up, or one linear),
    frozen bases (`_base_linear`); gradients for x, every a_g and bt_g. The LoRA kernels read x once for all
    members, and the members' input gradients accumulate into one buffer (cuBLAS with beta = 1, the backward
    kernel in place) instead of one gradient per linear that autograd adds (24 ms of a 7B 8 x 3072 step on an
    H200, benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, x, weights, biases, p, seeds, source, *ab):
        a, bts = ab[0::2], ab[1::2]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        a_all = torch.stack(a)
        outs, hs, masks = group_forward(x2, weights, biases, p, seeds, a_all, bts, any(ctx.needs_input_grad))
        # x's norm remakes it in the backward from its own input (mhsft.train.remade_norms), or x is kept
        ctx.save_for_backward(x2 if source is None else source[0], a_all, masks, *bts, *hs)
        # frozen: kept by reference, not as saved tensors (they may be quantized weights)
        ctx.weights, ctx.p, ctx.seeds, ctx.x_shape = weights, p, seeds, x.shape
        ctx.norm = None if source is None else source[1]
        return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, a_all, masks, *rest = ctx.saved_tensors
        if ctx.norm is not None:
            x2 = remade_norms.remake((x2, ctx.norm)).reshape(-1, ctx.x_shape[-1])
        n = len(grads)
        bts, hs = rest[:n], rest[n:]
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        need_bt = [ctx.needs_input_grad[7 + 2 * j] for j in range(n)]
        dx, da, dbts = group_backward(x2, gs, ctx.weights, ctx.p, ctx.seeds, a_all, bts, hs, masks,
                                      ctx.needs_input_grad[0], need_bt)  # fmt: skip
        dx = None if dx is None else dx.view(ctx.x_shape)
        return (dx, None, None, None, None, None, *[t for j in range(n) for t in (da[j], dbts[j])])


def lora_seeds(members: int, p: float) -> tuple[int, ...]:
    """One Philox seed per member (drawn from torch's generator, so runs repeat under a seed), zeros without dropout."""
    return tuple(int(s) for s in torch.randint(0, 2**31 - 1, (members,))) if p > 0 else (0,) * members


def lora_group(x, weights, biases, a, bts, p: float, source=None) -> tuple[torch.Tensor, ...]:
    """The outputs of the LoRA linears (frozen bases `weights`/`biases`, adapters `a`/`bts`, dropout p) reading x;
    `source`: (input, forward) of the norm that made x, to remake x in the backward instead of keeping it."""
    ab = [t for pair in zip(a, bts) for t in pair]
    return _LoRAGroup.apply(x, tuple(weights), tuple(biases), p, lora_seeds(len(a), p), source, *ab)


def lora_linear(x, weight, bias, a, bt, p: float) -> torch.Tensor:
    return lora_group(x, (weight,), (bias,), (a,), (bt,), p)[0]


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


def _parts(module, x: torch.Tensor):
    """(frozen base, bias, a, bt, dropout p) of a usable LoRA linear for input x."""
    name = module.active_adapters[0]
    drop = module.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and module.training else 0.0
    a = module.lora_A[name].weight.to(x.dtype)
    bt = (module.lora_B[name].weight * module.scaling[name]).to(x.dtype).t()
    base = module.base_layer
    bias = None if _is_bnb_4bit(base) else base.bias  # the 4-bit layer's own forward adds it
    return frozen_base(base), bias, a, bt, p


# Linears of one parent module that models call on the same input, by name (Qwen2, Llama, Mistral, ...)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
group_siblings = True  # tests and benchmarks switch it off to compare against one linear at a time


def link_siblings(model: torch.nn.Module, switched) -> int:
    """Mark the switched LoRA linears that read one input (`SIBLINGS`): the first of a group to be called computes
    every member's output in one `_LoRAGroup`, the others pick theirs up (`forward`). Returns the groups linked."""
    switched = set(map(id, switched))
    n = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLINGS:
            members = [children[c] for c in names if c in children and id(children[c]) in switched]
            if len(members) < 2 or len({m.base_layer.in_features for m in members}) > 1:
                continue
            for m in members:
                m._mhsft_siblings = members  # a plain list: not submodules, copied along by deepcopy
            n += 1
    return n


def forward(module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA linear's training forward (the caller checked `usable`): with its siblings in one `_LoRAGroup`
    when they all take the fused path with the same dropout, else alone."""
    ready = module.__dict__.pop("_mhsft_ready", None)
    if ready is not None and ready[0]() is x:  # a sibling computed this output from this same input
        return ready[1]
    members = module.__dict__.get("_mhsft_siblings") if group_siblings else None
    source = remade_norms.source(module, x)
    if members and all(m is module or usable(m, x) for m in members):
        bases, biases, a, bts, ps = zip(*[_parts(m, x) for m in members])
        if len(set(ps)) == 1:
            outs = lora_group(x, bases, biases, a, bts, ps[0], source)
            for m, out in zip(members, outs):
                if m is not module:
                    m._mhsft_ready = (weakref.ref(x), out)
            return outs[members.index(module)]
    weight, bias, a, bt, p = _parts(module, x)
    return lora_group(x, (weight,), (bias,), (a,), (bt,), p, source)[0]
