"""mhsft/train/concat_update.py: the LoRA update inside the base GEMM ([x | h] @ [W | bt^T]^T) gives the two-pass
path's loss and gradients, holds each weight once, and survives the weight being moved or replaced. The fused
LoRA kernels run in Triton's interpreter on the CPU (float32); MHSFT_TEST_DEVICE=cuda runs the same compiled."""

from __future__ import annotations

import copy

import pytest
import torch

from mhsft import lora_forward
from mhsft.train import concat_update, fused_lora
from mhsft.train.plan import set_recompute
from tiny import DEVICE, loss_and_grads, tiny_lora

pytest.importorskip("triton", reason="the fused LoRA kernels need Triton (pip install triton)")
pytestmark = pytest.mark.usefixtures("fused_on_device")


def _model(dropout: float):
    m = tiny_lora(dropout).to(DEVICE)
    lora_forward.fast_lora_forward(m, fused=fused_lora)
    return m


def _gate_up_weights(m):
    return [
        mod.weight
        for n, mod in m.named_modules()
        if n.endswith(("gate_proj.base_layer", "up_proj.base_layer"))
    ]


def _run(m, ids, on: bool, monkeypatch, seed: int = 3):
    monkeypatch.setattr(concat_update, "enabled", on)
    return loss_and_grads(m, ids, seed=seed)


@pytest.mark.parametrize(("dropout", "recompute"), [(0.0, 0), (0.2, 0), (0.2, 1)])
def test_the_update_in_the_base_gemm_gives_the_two_pass_loss_and_gradients(monkeypatch, dropout, recompute):
    """With dropout on and off and one layer recomputing: the same loss and gradients as the two-pass path, and
    the concatenated path ran."""
    base = _model(dropout)
    set_recompute(base, recompute)
    ids = torch.randint(0, 300, (2, 19), device=DEVICE)
    la, ga = _run(copy.deepcopy(base), ids, False, monkeypatch)
    ran = []
    forward = concat_update.forward
    monkeypatch.setattr(concat_update, "forward", lambda *a: (ran.append(len(a[1])), forward(*a))[1])
    lb, gb = _run(base, ids, True, monkeypatch)
    layers = len(_gate_up_weights(base)) // 2
    assert ran.count(2) >= layers  # gate/up in every layer (the tiny q/k/v too: 128 outputs over 64 inputs)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for n in ga:
        _assert_equal_gradients(ga[n], gb[n], n)


def _assert_equal_gradients(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if DEVICE == "cpu":
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        return
    # Compiled, Triton's tl.dot rounds float32 inputs to TF32 (10-bit mantissa): dh out of the concatenated GEMM
    # differs from the two-pass path's in its last bits, which the dropout kernel's TF32 rounding makes ~1e-3 of the
    # largest entry of lora_A's gradient (H100, session 13: 4.7e-6 of ~6e-3). A wrong mask or member is of the
    # order of the entries themselves.
    worst = (a - b).abs().max().item()
    assert worst <= 2e-3 * a.abs().max().item(), (
        f"{name}: {worst:.3g} apart, largest entry {a.abs().max():.3g}"
    )


def test_each_weight_is_held_once_inside_its_buffer(monkeypatch):
    m = _model(0.1)
    weights = _gate_up_weights(m)
    before = [w.detach().clone() for w in weights]
    _run(m, torch.randint(0, 300, (1, 9), device=DEVICE), True, monkeypatch)
    for j, (w, old) in enumerate(zip(weights, before, strict=True)):
        buf, g, slot, r = w._mhsft_cat
        n, k = w.shape
        assert (g, r, buf.shape) == (2, 8, (n, k + 2 * r)) and slot == j % 2
        assert w.data_ptr() == buf.data_ptr() and w.stride() == (k + 2 * r, 1)  # a view, not a copy
        torch.testing.assert_close(w, old, rtol=0, atol=0)


def test_a_replaced_weight_gets_a_new_buffer_and_eval_reads_the_strided_weight(monkeypatch):
    """After a weight is replaced (as `.to()` would), the next step adopts it anew; the model's own (PEFT) eval
    forward multiplies by the strided weights and gives the same logits as before they were strided."""
    m = _model(0.0)
    ids = torch.randint(0, 300, (1, 11), device=DEVICE)
    m.eval()
    with torch.no_grad():
        plain = m(input_ids=ids).logits
    m.train()
    la, ga = _run(copy.deepcopy(m), ids, False, monkeypatch)
    _run(m, ids, True, monkeypatch)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, plain, rtol=1e-5, atol=1e-6)
    m.train()
    w = _gate_up_weights(m)[0]
    w.data = w.detach().clone()  # contiguous, outside the buffer
    lb, gb = _run(m, ids, True, monkeypatch)
    assert w.data_ptr() == w._mhsft_cat[0].data_ptr()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for n in ga:
        _assert_equal_gradients(ga[n], gb[n], n)


def test_only_outputs_twice_the_input_are_worth_it(monkeypatch):
    monkeypatch.setattr(concat_update, "enabled", True)
    gate_up = [torch.empty(18944, 3584)] * 2
    qkv = [torch.empty(3584, 3584), torch.empty(512, 3584), torch.empty(512, 3584)]
    assert concat_update.worth(gate_up, 3584) and not concat_update.worth(qkv, 3584)
    monkeypatch.setattr(concat_update, "enabled", False)
    assert not concat_update.worth(gate_up, 3584)
