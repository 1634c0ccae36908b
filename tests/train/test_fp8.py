"""mhsft/train/fp8.py: rowwise e4m3 quantization, the frozen base's FP8 products inside the fused LoRA linear, and
the refusals. On the CPU the products run through torch._scaled_mm's CPU kernel and the quantization through torch
ops; MHSFT_TEST_DEVICE=cuda runs them on a Hopper GPU (the quantization through its Triton kernel)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import DEMO, run_cli
from mhsft.train import fp8, fused_lora

DEVICE = os.environ.get("MHSFT_TEST_DEVICE", "cpu")
DTYPE = torch.bfloat16


@pytest.fixture(autouse=True)
def fresh_cache():
    fp8.forget_inputs()
    yield
    fp8.forget_inputs()


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: one scale per row must follow them
    rows = torch.logspace(-3, 2, shape[0]).view(-1, *([1] * (len(shape) - 1)))
    return (torch.randn(*shape, generator=g) * rows * scale).to(DEVICE, DTYPE)


@pytest.mark.parametrize("one_pass", [True, False])  # on a GPU: the one-read kernel and the two-pass one
def test_quantize_rows_keeps_each_row_within_e4m3s_precision(monkeypatch, one_pass):
    monkeypatch.setattr(fp8, "one_pass", one_pass)
    x = _rand(37, 300)
    x[5] = 0  # an all-zero row must not divide by zero
    q, s = fp8.quantize_rows(x)
    assert q.dtype == fp8.E4M3 and s.shape == (37, 1) and torch.isfinite(s).all()
    back = q.float() * s
    assert back[5].abs().max() == 0
    amax = x.float().abs().amax(1, keepdim=True)
    torch.testing.assert_close(
        q.float().abs().amax(1, keepdim=True)[amax > 0], torch.full_like(amax, 448.0)[amax > 0]
    )
    # e4m3 has 3 mantissa bits: half a step is 1/16 of the value; below 2^-6 * scale, subnormal steps of 2^-9
    err = (back - x.float()).abs()
    assert (err <= x.float().abs() / 16 + s * 2.0**-9 + 1e-30).all()


def test_products_equal_the_dequantized_operands_in_float64():
    """The scales go where they belong: x W^T and g W equal the float64 products of the dequantized operands."""
    x, w, g = _rand(48, 96, seed=1), _rand(80, 96, seed=2) * 0.05, _rand(48, 80, seed=3)
    w8 = fp8.Float8Weight(w)
    qx, sx = fp8.quantize_rows(x)
    ref = (qx.double() * sx.double()) @ (w8.fwd.double() * w8.fwd_scale.double().t()).t()
    torch.testing.assert_close(
        w8.linear(x, None).double(), ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item()
    )
    qg, sg = fp8.quantize_rows(g)
    ref_g = (qg.double() * sg.double()) @ (w8.bwd.double() * w8.bwd_scale.double().t()).t()  # W^T dequantized
    torch.testing.assert_close(
        w8.input_grad(g).double(), ref_g, rtol=1e-2, atol=1e-3 * ref_g.abs().max().item()
    )
    # and close to the bf16 products (the quantization error itself: a few % of the typical element)
    for got, want in (
        (w8.linear(x, None), x.float() @ w.float().t()),
        (w8.input_grad(g), g.float() @ w.float()),
    ):
        rel = (got.float() - want).norm() / want.norm()
        assert rel < 0.06, rel
    # a row count that is not a multiple of 16 (validation batches) is padded inside and cut back
    assert w8.linear(x[:13], None).shape == (13, 80)
    torch.testing.assert_close(w8.linear(x[:13], None), w8.linear(x, None)[:13])


def test_q_k_v_quantize_their_shared_input_once(monkeypatch):
    w8 = [fp8.Float8Weight(_rand(32, 64, seed=i)) for i in range(3)]
    x = _rand(16, 64, seed=9)
    calls = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda t: calls.append(t.shape) or real(t))
    outs = [w.linear(x.reshape(-1, 64), None) for w in w8]  # a new view each time, as each projection makes
    assert len(calls) == 1
    x.mul_(2)  # changed in place: the cached quantization must not be used
    again = w8[0].linear(x, None)
    assert len(calls) == 2
    torch.testing.assert_close(again, outs[0] * 2, rtol=0.1, atol=0.1)


def test_lora_linear_with_an_fp8_base_trains_like_bf16():
    """The fused LoRA linear on an FP8 base: the output and every gradient within the quantization error of the
    bf16 base's, and the LoRA parts (dA, dB) computed from the same bf16 activations."""
    x = _rand(64, 96, seed=4).requires_grad_()
    w = _rand(80, 96, seed=5) * 0.05
    a = (torch.randn(8, 96) * 0.1).to(DEVICE, DTYPE).requires_grad_()
    bt = (torch.randn(8, 80) * 0.1).to(DEVICE, DTYPE).requires_grad_()
    g = _rand(64, 80, seed=6)
    grads = []
    for weight in (w, fp8.Float8Weight(w)):
        for t in (x, a, bt):
            t.grad = None
        out = fused_lora.lora_linear(x, weight, None, a, bt, 0.0)
        out.backward(g)
        grads.append([out.detach().float(), x.grad.float(), a.grad.float(), bt.grad.float()])
    for name, ref, got in zip(("out", "dx", "dA", "dB"), *grads):
        rel = (got - ref).norm() / ref.norm()
        assert rel < 0.06, (name, rel)


def test_fp8_on_a_cpu_is_a_one_line_refusal(tmp_path, capsys):
    rc, out, err = run_cli(["sft", "--model", "builtin:tiny", "--dataset", DEMO, "--output_dir", str(tmp_path),
                            "--report_to", "none", "--max_steps", "1", "--fp8", "true"], capsys)  # fmt: skip
    if DEVICE == "cpu":
        assert rc == 2 and "--fp8 needs an NVIDIA Hopper GPU" in err
        # refused before the data, the model or a run folder: not after minutes of loading
        assert "train dataset" not in err and not any(tmp_path.glob("v*"))
    else:  # on a Hopper GPU: a whole step through the CLI with FP8 base weights
        assert rc == 0 and "FP8 base matmuls" in out + err, err[-2000:]
    rc, _, err = run_cli(["sft", "--model", "builtin:tiny", "--dataset", DEMO, "--output_dir", str(tmp_path),
                          "--train_type", "full", "--fp8", "true"], capsys)  # fmt: skip
    assert rc == 2 and "needs --train_type lora" in err
