"""mhsft/train/swiglu_down.py: the MLP's SwiGLU product remade in the backward (mode "product"), or gate and up
recomputed too (mode "mlp"). Same loss and gradients as kept, the bytes no longer kept, only the layers the plan
marks. The fused LoRA kernels run in Triton's
interpreter on the CPU (float32); MHSFT_TEST_DEVICE=cuda runs the same tests compiled, in float32, with Liger's
SwiGLU kernels where liger-kernel is installed."""

from __future__ import annotations

import copy

import pytest
import torch

from mhsft.train import plan, remade_norms, swiglu_down
from mhsft.train.plan import checkpointing_on, decoder_layers, set_recompute
from tiny import DEVICE, LIGER, fused_tiny_lora, loss_and_grads, saved_bytes

pytest.importorskip("triton", reason="the fused LoRA kernels need Triton (pip install triton)")
pytestmark = pytest.mark.usefixtures("fused_on_device")


def _model(dropout: float, checkpointing: bool = False):
    m = fused_tiny_lora(dropout)
    assert swiglu_down.install(m, liger=LIGER) == len(decoder_layers(m))
    assert remade_norms.install(m) == len(decoder_layers(m))
    if checkpointing:
        checkpointing_on(m)
        m.enable_input_require_grads()
    return m


def _remade(m, k: int = 0, mlp: int = 0):
    m = copy.deepcopy(m)
    set_recompute(m, k, remake_swiglu=True, mlp_layers=mlp)
    return m


def _counting(monkeypatch, cls) -> list:
    calls, apply = [], cls.apply
    monkeypatch.setattr(cls, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    return calls


@pytest.mark.parametrize(
    ("dropout", "recompute", "mlp"),
    [(0.0, 0, 0), (0.2, 0, 0), (0.2, 1, 0), (0.0, 0, 2), (0.2, 0, 2), (0.2, 1, 1), (0.2, 0, 1)],
)
def test_remade_product_gives_the_kept_products_loss_and_gradients(monkeypatch, dropout, recompute, mlp):
    """Kept, or remade (dropout on and off, a layer recomputing, layers recomputing gate and up): the same loss and
    gradients, and each path ran in the layers the plan gave it."""
    base = _model(dropout)
    set_recompute(base, recompute)
    ran, ran_mlp = (
        _counting(monkeypatch, swiglu_down._SwiGLUDown),
        _counting(monkeypatch, swiglu_down._SwiGLUMLP),
    )
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    la, ga = loss_and_grads(copy.deepcopy(base), ids, seed=5)
    assert not ran and not ran_mlp
    lb, gb = loss_and_grads(_remade(base, recompute, mlp), ids, seed=5)
    assert (len(ran), len(ran_mlp)) == (len(decoder_layers(base)) - recompute - mlp, mlp)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_stored_layer_keeps_its_product_and_norm_outputs_no_longer():
    """Each stored layer keeps [tokens, intermediate] values fewer: the product the down projection reads, and on
    the torch path also silu(gate), which torch's multiply keeps (Liger's SwiGLU remakes it in its backward); and
    the two norms' outputs (mhsft.train.remade_norms), kept as their inputs, which the norms keep anyway; except
    the first layer's input norm, whose input (the frozen embeddings' output) needs no gradient: there the norm
    keeps nothing and the input replaces the output."""
    base = _model(0.1)
    ids = torch.randint(0, 300, (2, 33), device=DEVICE)
    kept = saved_bytes(copy.deepcopy(base), ids)
    cfg = base.get_base_model().config
    product = ids.numel() * cfg.intermediate_size * 4 * (1 if LIGER else 2)  # float32
    norm = ids.numel() * cfg.hidden_size * 4
    layers = len(decoder_layers(base))
    assert kept - saved_bytes(_remade(base), ids) == layers * product + (2 * layers - 1) * norm
    one = copy.deepcopy(base)
    set_recompute(
        one, 1
    )  # the recomputing (first) layer keeps its input either way: only the stored one changes
    assert saved_bytes(one, ids) - saved_bytes(_remade(base, 1), ids) == (layers - 1) * (product + 2 * norm)


def test_without_remade_norms_a_stored_layer_keeps_its_norm_outputs(monkeypatch):
    """plan.REMAKE_NORMS off (the default before session 16; the benchmarks' `+nomlp`): only the product is
    remade."""
    monkeypatch.setattr(plan, "REMAKE_NORMS", False)
    base = _model(0.1)
    ids = torch.randint(0, 300, (2, 33), device=DEVICE)
    product = ids.numel() * base.get_base_model().config.intermediate_size * 4 * (1 if LIGER else 2)
    kept = saved_bytes(copy.deepcopy(base), ids)
    assert kept - saved_bytes(_remade(base), ids) == len(decoder_layers(base)) * product


def test_a_layer_recomputing_gate_and_up_keeps_no_intermediate_values():
    """In mode "mlp" a layer keeps none of gate, up, their product (and on the torch path silu(gate)), nor the
    norms' outputs: against the layer with its product remade, gate and up fewer."""
    base = _model(0.1)
    ids = torch.randint(0, 300, (2, 33), device=DEVICE)
    cfg = base.get_base_model().config
    gate_up = 2 * ids.numel() * cfg.intermediate_size * 4
    product_remade = saved_bytes(_remade(base), ids)
    assert product_remade - saved_bytes(_remade(base, mlp=1), ids) == gate_up
    assert product_remade - saved_bytes(_remade(base, mlp=2), ids) == 2 * gate_up


def test_off_the_model_runs_its_own_forward_and_eval_ignores_the_switch():
    m = _remade(_model(0.1))
    ids = torch.randint(0, 300, (1, 9), device=DEVICE)
    m.eval()
    with torch.no_grad():
        out = m(input_ids=ids).logits
    set_recompute(m, 0, remake_swiglu=False)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, out)


@pytest.mark.skipif(DEVICE != "cpu", reason="on the card Liger's own kernels run in the tests above")
def test_the_modes_call_ligers_swiglu_as_its_kernels_need(monkeypatch):
    """Liger's SwiGLU kernels do not run under Triton's interpreter; stand-ins with their contract (contiguous gate,
    up and product gradient of one shape; the backward writes the gradients into gate and up and returns them)
    check that both modes call them so, and give the kept path's loss and gradients."""
    ops = pytest.importorskip("liger_kernel.ops.swiglu", reason="liger-kernel is not installed")

    calls = []

    def contract(*ts):
        calls.append(len(ts))
        assert all(t.is_contiguous() and t.shape == ts[0].shape for t in ts), [
            (t.shape, t.stride()) for t in ts
        ]

    def forward(a, b):
        contract(a, b)
        return a, b, torch.nn.functional.silu(a) * b

    def backward(a, b, dc):
        contract(a, b, dc)
        sig = torch.sigmoid(a)
        da, db = dc * b * sig * (1 + a * (1 - sig)), dc * a * sig
        return a.copy_(da), b.copy_(db)

    monkeypatch.setattr(ops, "swiglu_forward", forward)
    monkeypatch.setattr(ops, "swiglu_backward", backward)
    base = _model(0.2)
    for mlp in base.modules():
        if hasattr(mlp, "_mhsft_liger"):
            mlp._mhsft_liger = True
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    la, ga = loss_and_grads(copy.deepcopy(base), ids, seed=5)
    assert not calls  # the kept path runs the model's own MLP
    for mlp_layers in (0, 2):
        calls.clear()
        lb, gb = loss_and_grads(_remade(base, 0, mlp_layers), ids, seed=5)
        # per layer: the product in the forward and again in the backward, then its gradients
        assert sorted(calls) == [2, 2, 2, 2, 3, 3]
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)
