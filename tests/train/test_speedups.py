"""mhsft/train/speedups.py: the trainer's speed paths keep the maths: compiled layers, partial recomputation."""

from __future__ import annotations

import copy

import pytest

from mhsft.lora_forward import fast_lora_forward
from mhsft.train.speedups import compile_layers
from tiny import loss_and_grads as _loss_and_grads
from tiny import tiny_lora as _model


def test_compiled_layers_match_eager_without_graph_breaks():
    """`--torch_compile`: each decoder layer compiled with the fast LoRA forward (its in-place update included)
    traces without a graph break and gives PEFT's loss and gradients."""
    import torch._dynamo

    peft_model = _model(0.0)
    fast = copy.deepcopy(peft_model)
    fast_lora_forward(fast)
    compile_layers(fast)
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(0, 300, (2, 17))
    la, ga = _loss_and_grads(peft_model, ids)
    lb, gb = _loss_and_grads(fast, ids)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_liger_brings_its_fused_loss_when_it_is_chosen(monkeypatch, fused_loss):
    """With Liger's kernels on, the trainer's loss module takes Liger's fused linear cross-entropy exactly when
    loss.FUSED_LOSS says so (the GPU A/B decides it), and the plan's kernel list names it."""
    from types import SimpleNamespace

    from mhsft.train import loss, speedups
    from mhsft.train.sft import training_loss

    monkeypatch.setattr(speedups, "apply_liger", lambda model: None)  # Liger itself needs a GPU
    monkeypatch.setattr(loss, "FUSED_LOSS", fused_loss)
    args = SimpleNamespace(train_type="lora", torch_compile=False, lora_dropout=0.0, fp8=False,
                           use_liger_kernel=True, loss_chunk_size=64)  # fmt: skip
    model = speedups.speedups(_model(0.0), args, [])
    assert ("Liger fused loss" in model.mhsft_kernels) == fused_loss
    assert training_loss(model, args).fused is (loss.liger_fused_loss if fused_loss else None)
