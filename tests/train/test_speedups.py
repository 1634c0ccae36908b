"""mhsft/train/speedups.py: the trainer's speed paths keep the maths: compiled layers, partial recomputation."""

from __future__ import annotations

import copy

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
