"""mhsft/train/fused_lora.py: the LoRA linear whose dropout mask is regenerated, not stored. On the CPU the Triton
kernels run in Triton's interpreter (float32); MHSFT_TEST_DEVICE=cuda runs the same tests compiled, in bf16."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mhsft import lora_forward
from mhsft.train import fused_lora
from tiny import loss_and_grads as _loss_and_grads
from tiny import tiny_lora

pytest.importorskip("triton", reason="the fused LoRA kernels need Triton (pip install triton)")
DEVICE = os.environ.get("MHSFT_TEST_DEVICE", "cpu")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = {"rtol": 2e-2, "atol": 2e-2} if DEVICE == "cuda" else {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def triton_mode(monkeypatch):
    monkeypatch.setattr(fused_lora, "on_cpu", DEVICE == "cpu")  # conftest switched Triton's interpreter on


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


def test_fused_layers_equal_peft_without_dropout(monkeypatch):
    calls = []
    apply = fused_lora._LoRALinear.apply
    monkeypatch.setattr(fused_lora._LoRALinear, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    peft_model = _model(0.0)
    fused = copy.deepcopy(peft_model)
    lora_forward.fast_lora_forward(fused, fused=fused_lora)
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    la, ga = _loss_and_grads(peft_model, ids)
    lb, gb = _loss_and_grads(fused, ids)
    assert len(calls) == 14  # every adapted linear went through the fused layer
    torch.testing.assert_close(la, lb, **TOL)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL)


def test_checkpointing_regenerates_the_same_masks():
    """Recomputation draws the same seeds (checkpointing restores the RNG state), so with dropout on the
    gradients equal those of a run that stores its activations; a different seed changes them."""
    plain = _model(0.2)
    lora_forward.fast_lora_forward(plain, fused=fused_lora)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    la, ga = _loss_and_grads(plain, ids, seed=3)
    lb, gb = _loss_and_grads(ckpt, ids, seed=3)
    torch.testing.assert_close(la, lb, **TOL)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL)
    lc, _ = _loss_and_grads(plain, ids, seed=4)
    assert not torch.equal(la, lc)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_siblings_share_one_input_gradient(monkeypatch, checkpointing):
    """q/k/v and gate/up read one input: their input gradients accumulate in one buffer handed to autograd by the
    last of them. Same gradients as one input gradient per linear (with dropout, with and without recompute), and
    the sharing really happened (members that handed nothing over)."""
    base = _model(0.2)
    lora_forward.fast_lora_forward(base, fused=fused_lora)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    handed = []
    hand_over = fused_lora._hand_over
    monkeypatch.setattr(fused_lora, "_hand_over", lambda g, dx: (r := hand_over(g, dx), handed.append(r))[0])
    la, ga = _loss_and_grads(copy.deepcopy(base), ids, seed=5)
    monkeypatch.setattr(fused_lora, "share_input_grad", False)
    lb, gb = _loss_and_grads(copy.deepcopy(base), ids, seed=5)
    torch.testing.assert_close(la, lb, **TOL)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL)
    # 2 layers: gate/up of both (one member each hands nothing) and q/k/v of the second (two members); of the
    # first too under recompute, whose embeddings need a gradient then
    shared = sum(r is None for r in handed[:14])
    assert shared == (6 if checkpointing else 4)


def test_fused_layers_store_no_dropout_copy():
    """What autograd keeps for the backward: with dropout on, PEFT's dropout keeps a copy of every adapted
    layer's input and its mask on top of what the layers keep without dropout; the fused layers keep exactly
    what they keep without dropout."""

    def saved_bytes(dropout: float, fused: bool) -> int:
        m = _model(dropout)
        lora_forward.fast_lora_forward(m, fused=fused_lora if fused else None)
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        ids = torch.randint(0, 300, (2, 33), device=DEVICE)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=ids).loss.backward()
        return sum(seen.values())

    assert saved_bytes(0.1, fused=True) == saved_bytes(0.0, fused=True)
    assert saved_bytes(0.1, fused=False) > saved_bytes(0.0, fused=False)


def test_zero3_partitioned_weights_keep_the_module_path():
    """Under DeepSpeed ZeRO-3 a base weight is only gathered inside base_layer's own forward: such layers must
    not take the fused path (which reads the weight directly)."""
    m = _model(0.1)
    layer = next(lora_forward._plain_lora_linears(m))
    x = torch.randn(2, 3, layer.base_layer.in_features, device=DEVICE, dtype=layer.base_layer.weight.dtype)
    assert fused_lora.usable(layer, x)
    layer.base_layer.weight.ds_id = 0  # what deepspeed.zero.Init sets on a partitioned parameter
    assert not fused_lora.usable(layer, x)
