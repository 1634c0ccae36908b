"""mhsft/train/fused_lora.py: the LoRA linear whose dropout mask is regenerated, not stored. On the CPU the Triton
kernels run in Triton's interpreter (float32); MHSFT_TEST_DEVICE=cuda runs the same tests compiled, in bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from mhsft import lora_forward
from mhsft.train import fused_lora
from mhsft.train.plan import checkpointing_on
from tiny import DEVICE, saved_bytes, tiny_lora
from tiny import loss_and_grads as _loss_and_grads

pytest.importorskip("triton", reason="the fused LoRA kernels need Triton (pip install triton)")
pytestmark = pytest.mark.usefixtures("fused_on_device")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = {"rtol": 2e-2, "atol": 2e-2} if DEVICE == "cuda" else {"rtol": 1e-4, "atol": 1e-5}


def _mask(seed: int, m: int, k: int, p: float) -> torch.Tensor:
    """The kept elements of the mask `seed` draws, read back through the kernel itself (A = identity)."""
    ones = torch.ones(m, k, device=DEVICE, dtype=DTYPE)
    return fused_lora.dropout_matmul(ones, torch.eye(k, device=DEVICE, dtype=DTYPE), p, seed) != 0


# shapes that give one program per row block and the K range split over several (forward), or the rows split
# over several (backward); rank 64 needs a smaller tile than the default on a GPU (`_fitting`)
@pytest.mark.parametrize(
    ("m", "k", "r"), [(70, 40, 8), (130, 100, 20), (70, 300, 8), (200, 40, 8), (130, 300, 64)]
)
def test_kernels_equal_dropout_then_matmul_with_the_same_mask(m, k, r):
    p, seed = 0.3, 1234
    scale = fused_lora._threshold(p)[1]
    g = torch.Generator().manual_seed(0)
    x, a = (torch.randn(s, generator=g).to(DEVICE, DTYPE) for s in ((m, k), (r, k)))
    dh, dx0 = (torch.randn(s, generator=g).to(DEVICE, DTYPE) for s in ((m, r), (m, k)))
    keep = _mask(seed, m, k, p)
    xd = (x.float() * keep * scale).to(DTYPE)
    torch.testing.assert_close(
        fused_lora.dropout_matmul(x, a, p, seed), (xd.float() @ a.float().t()).to(DTYPE), **TOL
    )
    dx = dx0.clone()
    da = fused_lora.dropout_matmul_backward(x, dh, a, dx, p, seed)
    torch.testing.assert_close(da.float(), dh.float().t() @ xd.float(), **TOL)
    torch.testing.assert_close(dx.float(), dx0.float() + (dh.float() @ a.float()) * keep * scale, **TOL)
    # without an input gradient to update, dA is the same
    torch.testing.assert_close(
        fused_lora.dropout_matmul_backward(x, dh, a, None, p, seed), da, rtol=0, atol=0
    )


@pytest.mark.parametrize("tile", [(32, 64, 4, 2), (64, 32, 4, 4)])
def test_a_tile_with_pipeline_stages_gives_the_same_result(tile):
    """benchmarks/lora_kernels.py's tiles name their pipeline stages: the same sums (up to the order of the
    float32 partial sums) and the same mask whatever the tile."""
    g = torch.Generator().manual_seed(1)
    x, a, dh = (torch.randn(s, generator=g).to(DEVICE, DTYPE) for s in ((130, 200), (8, 200), (130, 8)))
    ref = fused_lora.dropout_matmul(x, a, 0.3, 5, tile=(64, 128, 4))
    torch.testing.assert_close(fused_lora.dropout_matmul(x, a, 0.3, 5, tile=tile), ref, **TOL)
    dx, dx_ref = torch.zeros_like(x), torch.zeros_like(x)
    da_ref = fused_lora.dropout_matmul_backward(x, dh, a, dx_ref, 0.3, 5, tile=(64, 128, 4))
    da = fused_lora.dropout_matmul_backward(x, dh, a, dx, 0.3, 5, tile=tile)
    torch.testing.assert_close(da, da_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)


@pytest.mark.parametrize(("g", "m", "k"), [(2, 70, 300), (3, 130, 100), (3, 200, 40)])
def test_group_kernels_equal_their_members_one_at_a_time(g, m, k):
    """q/k/v (3) and gate/up (2) read one input: one kernel for all gives each member what its own kernel gives
    (its own mask), and the input gradient is the sum of the members' updates."""
    p, seeds = 0.3, (11, 22, 33)[:g]
    gen = torch.Generator().manual_seed(2)
    x, a, dh, dx0 = (
        torch.randn(s, generator=gen).to(DEVICE, DTYPE) for s in ((m, k), (g, 8, k), (g, m, 8), (m, k))
    )
    scale = fused_lora._threshold(p)[1]
    hs = fused_lora.dropout_matmul_group(x, a, p, seeds)
    dx = dx0.clone()
    da = fused_lora.dropout_matmul_backward_group(x, dh, a, dx, p, seeds)
    dx_ref = dx0.float()  # in float32: the group adds every member's update before rounding once
    for j in range(g):
        torch.testing.assert_close(hs[j], fused_lora.dropout_matmul(x, a[j], p, seeds[j]), **TOL)
        torch.testing.assert_close(
            da[j], fused_lora.dropout_matmul_backward(x, dh[j], a[j], None, p, seeds[j]), **TOL
        )
        dx_ref += (dh[j].float() @ a[j].float()) * _mask(seeds[j], m, k, p) * scale
    torch.testing.assert_close(dx.float(), dx_ref, **TOL)
    assert not torch.equal(hs[0], hs[1])  # each member its own mask


@pytest.mark.parametrize(
    ("g", "m", "k", "tile"), [(3, 130, 100, None), (2, 70, 300, None), (1, 200, 44, (64, 32, 4))]
)
def test_stored_masks_are_the_drawn_masks(g, m, k, tile):
    """`store_masks`: the forward packs each member's mask 8 elements a byte and the backward reads them; the
    bits are the mask drawn from the seed, so the backward is the same bit for bit (K not a multiple of 8 or of
    the tile, rows not a multiple of the tile)."""
    p, seeds = 0.3, (5, 6, 7)[:g]
    gen = torch.Generator().manual_seed(3)
    x, a, dh, dx0 = (
        torch.randn(s, generator=gen).to(DEVICE, DTYPE) for s in ((m, k), (g, 8, k), (g, m, 8), (m, k))
    )
    masks = fused_lora.mask_buffer(x, g)
    hs = fused_lora.dropout_matmul_group(x, a, p, seeds, tile, masks=masks)
    for j in range(g):
        assert torch.equal(hs[j], fused_lora.dropout_matmul_group(x, a, p, seeds, tile)[j])
        bits = (masks[j].long()[:, :, None] >> torch.arange(8, device=DEVICE)) & 1
        assert torch.equal(bits.flatten(1)[:, :k].bool(), _mask(seeds[j], m, k, p))
    dx, dx_drawn = dx0.clone(), dx0.clone()
    da = fused_lora.dropout_matmul_backward_group(x, dh, a, dx, p, seeds, tile, masks=masks)
    da_drawn = fused_lora.dropout_matmul_backward_group(x, dh, a, dx_drawn, p, seeds, tile)
    assert torch.equal(da, da_drawn) and torch.equal(dx, dx_drawn)
    masks[0] ^= 0xFF  # the backward reads the bits: other bits, other gradients
    assert not torch.equal(
        fused_lora.dropout_matmul_backward_group(x, dh, a, None, p, seeds, tile, masks=masks), da
    )


def test_mask_keeps_one_minus_p_and_depends_on_the_seed_only():
    keep = _mask(7, 256, 192, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(keep, _mask(7, 256, 192, 0.25))
    assert not torch.equal(keep, _mask(8, 256, 192, 0.25))
    assert torch.equal(_mask(7, 256, 192, 0.25)[:100], _mask(7, 100, 192, 0.25))  # row by row, not per call
    # one Philox call serves 8 neighbouring elements, each with its own 16 bits: neighbours are independent
    keep = _mask(9, 256, 192, 0.5)
    assert abs((~keep[:, :-1] & ~keep[:, 1:]).float().mean().item() - 0.25) < 0.01


def _model(dropout: float):
    return tiny_lora(dropout).to(DEVICE, DTYPE if DEVICE == "cuda" else torch.float32)


def _count_groups(monkeypatch) -> list[int]:
    """The group size of every `_LoRAGroup` call from now on."""
    sizes = []
    apply = fused_lora._LoRAGroup.apply
    monkeypatch.setattr(
        fused_lora._LoRAGroup, "apply", lambda *a: (sizes.append(len(a[5:]) // 2), apply(*a))[1]
    )
    return sizes


def test_fused_layers_equal_peft_without_dropout(monkeypatch):
    sizes = _count_groups(monkeypatch)
    peft_model = _model(0.0)
    fused = copy.deepcopy(peft_model)
    lora_forward.fast_lora_forward(fused, fused=fused_lora)
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    la, ga = _loss_and_grads(peft_model, ids)
    lb, gb = _loss_and_grads(fused, ids)
    # every adapted linear went through the fused layer: q/k/v and gate/up as groups, o and down alone
    assert sizes == [3, 1, 2, 1] * 2
    torch.testing.assert_close(la, lb, **TOL)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL)


def test_checkpointing_regenerates_the_same_masks():
    """Recomputation draws the same seeds (checkpointing restores the RNG state), so with dropout on the
    gradients equal those of a run that stores its activations; a different seed changes them."""
    plain = _model(0.2)
    lora_forward.fast_lora_forward(plain, fused=fused_lora)
    ckpt = copy.deepcopy(plain)
    checkpointing_on(ckpt)
    ckpt.enable_input_require_grads()
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    la, ga = _loss_and_grads(plain, ids, seed=3)
    lb, gb = _loss_and_grads(ckpt, ids, seed=3)
    torch.testing.assert_close(la, lb, **TOL)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL)
    lc, _ = _loss_and_grads(plain, ids, seed=4)
    assert not torch.equal(la, lc)


def _fused_model_and_ids(checkpointing: bool):
    """A tiny LoRA model (dropout 0.2) on the fused path, recomputing or not, and a batch of token ids."""
    base = _model(0.2)
    lora_forward.fast_lora_forward(base, fused=fused_lora)
    if checkpointing:
        checkpointing_on(base)
        base.enable_input_require_grads()
    return base, torch.randint(0, 300, (2, 17), device=DEVICE)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sibling_groups_equal_one_linear_at_a_time(monkeypatch, checkpointing):
    """q/k/v and gate/up run as groups (one kernel reads their input, one input gradient): the same loss and
    gradients as each linear on its own (with dropout, with and without recompute)."""
    base, ids = _fused_model_and_ids(checkpointing)
    sizes = _count_groups(monkeypatch)
    la, ga = _loss_and_grads(copy.deepcopy(base), ids, seed=5)
    assert sizes[:4] == [3, 1, 2, 1] and max(sizes) == 3
    monkeypatch.setattr(fused_lora, "group_siblings", False)
    lb, gb = _loss_and_grads(copy.deepcopy(base), ids, seed=5)
    torch.testing.assert_close(la, lb, **TOL)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL)


def test_a_siblings_output_is_used_only_for_the_input_it_was_computed_from():
    """q computes k's output too; k called on another input computes its own."""
    m = _model(0.0)
    lora_forward.fast_lora_forward(m, fused=fused_lora)
    attn = m.get_base_model().model.layers[0].self_attn
    width = attn.q_proj.base_layer.in_features
    x1, x2 = (
        torch.randn(5, width, device=DEVICE, dtype=attn.q_proj.base_layer.weight.dtype) for _ in range(2)
    )
    with torch.no_grad():
        attn.q_proj(x1)  # leaves k's and v's outputs for x1
        assert attn.k_proj.__dict__["_mhsft_ready"][0]() is x1
        k2 = attn.k_proj(x2)
        fused_lora.group_siblings = False
        try:
            ref = attn.k_proj(x2)
        finally:
            fused_lora.group_siblings = True
    torch.testing.assert_close(k2, ref, **TOL)
    assert "_mhsft_ready" not in attn.k_proj.__dict__


def test_fused_layers_store_no_dropout_copy():
    """What autograd keeps for the backward: with dropout on, PEFT's dropout keeps a copy of every adapted
    layer's input and its mask on top of what the layers keep without dropout; the fused layers keep exactly
    what they keep without dropout."""

    def kept(dropout: float, fused: bool) -> int:
        m = _model(dropout)
        lora_forward.fast_lora_forward(m, fused=fused_lora if fused else None)
        return saved_bytes(m, torch.randint(0, 300, (2, 33), device=DEVICE))

    assert kept(0.1, fused=True) == kept(0.0, fused=True)
    assert kept(0.1, fused=False) > kept(0.0, fused=False)


def test_zero3_partitioned_weights_keep_the_module_path():
    """Under DeepSpeed ZeRO-3 a base weight is only gathered inside base_layer's own forward: such layers must
    not take the fused path (which reads the weight directly)."""
    m = _model(0.1)
    layer = next(lora_forward._plain_lora_linears(m))
    x = torch.randn(2, 3, layer.base_layer.in_features, device=DEVICE, dtype=layer.base_layer.weight.dtype)
    assert fused_lora.usable(layer, x)
    layer.base_layer.weight.ds_id = 0  # what deepspeed.zero.Init sets on a partitioned parameter
    assert not fused_lora.usable(layer, x)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stored_masks_give_the_drawn_masks_gradients(monkeypatch, checkpointing):
    """`store_masks`: a model's loss and gradients with the masks stored as bits equal those with the masks
    drawn again in the backward, with and without recompute (which stores them again in its forward)."""
    base, ids = _fused_model_and_ids(checkpointing)
    monkeypatch.setattr(fused_lora, "store_masks", False)
    la, ga = _loss_and_grads(copy.deepcopy(base), ids, seed=6)
    stored = []
    monkeypatch.setattr(fused_lora, "store_masks", True)
    buffer = fused_lora.mask_buffer
    monkeypatch.setattr(fused_lora, "mask_buffer", lambda *a: stored.append(buffer(*a)) or stored[-1])
    lb, gb = _loss_and_grads(copy.deepcopy(base), ids, seed=6)
    assert stored  # the stored path ran
    assert torch.equal(la, lb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
