"""mhsft/lora_forward.py: the fast LoRA forwards (training and inference) compute what PEFT computes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

from mhsft import lora_forward
from mhsft.lora_forward import fast_lora_forward, fast_lora_inference
from mhsft.train.plan import checkpointing_on
from tiny import loss_and_grads as _loss_and_grads
from tiny import tiny_lora as _model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fast_lora_forward_matches_peft(checkpointing, monkeypatch):
    """Loss and every LoRA gradient equal PEFT's, with the low-rank update added in place into the base
    layer's output (also when checkpointing recomputes the forward)."""
    peft_model = _model(0.0)
    fast = copy.deepcopy(peft_model)
    assert fast_lora_forward(fast) == 14  # 7 linears x 2 layers, lm_head excluded
    if checkpointing:
        for m in (peft_model, fast):
            checkpointing_on(m)
            m.enable_input_require_grads()
    in_place = []
    apply = lora_forward._AddLowRankInPlace.apply
    monkeypatch.setattr(
        lora_forward._AddLowRankInPlace, "apply", lambda *a: (in_place.append(1), apply(*a))[1]
    )
    ids = torch.randint(0, 300, (2, 17))
    la, ga = _loss_and_grads(peft_model, ids)
    lb, gb = _loss_and_grads(fast, ids)
    # in place where the base output is a tensor of its own: Qwen2's q/k/v have a bias, so their output is a
    # view of addmm's (updating a view in place would make autograd copy the gradient instead)
    own = sum(m.base_layer.bias is None for m in lora_forward._plain_lora_linears(fast))
    assert own == 8 and len(in_place) == own * (2 if checkpointing else 1)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


def test_fast_lora_forward_applies_dropout_in_training_only():
    m = _model(0.5)
    fast_lora_forward(m)
    ids = torch.randint(0, 300, (1, 9))
    m.train()
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, m(input_ids=ids).logits
    assert not torch.equal(a, b)  # dropout masks differ between calls
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, m(input_ids=ids).logits)


def test_fast_lora_inference_matches_peft_and_follows_the_active_adapter():
    m = _model(0.1).eval()
    m.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in m.named_parameters():
        if "lora_B.b" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 300, (2, 11))
    ref = {}
    with torch.no_grad():
        for name in ("default", "b"):
            m.set_adapter(name)
            ref[name] = m(input_ids=ids).logits
        with m.disable_adapter():
            ref[None] = m(input_ids=ids).logits
        assert fast_lora_inference(m) == 14
        for name in ("default", "b"):
            m.set_adapter(name)
            torch.testing.assert_close(m(input_ids=ids).logits, ref[name], rtol=1e-5, atol=1e-5)
        with m.disable_adapter():
            torch.testing.assert_close(m(input_ids=ids).logits, ref[None], rtol=0, atol=0)
    assert not torch.equal(ref["default"], ref["b"]) and not torch.equal(ref["default"], ref[None])
