"""mhsft/train/remade_norms.py: the norms' outputs remade in the backward by the LoRA groups that read them. Same loss
and gradients as kept, their bytes no longer kept, and no norm input held past its use. Fused LoRA kernels under
Triton's interpreter on the CPU (float32); MHSFT_TEST_DEVICE=cuda runs them compiled, with Liger's RMSNorm."""

from __future__ import annotations

import copy

import pytest
import torch

from mhsft.train import remade_norms
from mhsft.train.plan import decoder_layers
from tiny import DEVICE, fused_tiny_lora, loss_and_grads, saved_bytes

pytest.importorskip("triton", reason="the fused LoRA kernels need Triton (pip install triton)")
pytestmark = pytest.mark.usefixtures("fused_on_device")


def _model(dropout: float):
    m = fused_tiny_lora(dropout)
    assert remade_norms.install(m) == len(decoder_layers(m))
    return m


def _remade(m):
    m = copy.deepcopy(m)
    for layer in decoder_layers(m):
        remade_norms.set_remade(layer, True)
    return m


def _notes(m) -> int:
    return sum(remade_norms._MADE in x.__dict__ for x in m.modules())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_remade_norm_outputs_give_the_kept_loss_and_gradients_and_keep_fewer_bytes(dropout):
    """q/k/v and gate/up keep their norm's input instead of its output: the same loss and gradients; one [tokens,
    hidden] fewer per norm, except the first layer's input norm (its input, the frozen embeddings' output, needs no
    gradient, so the norm kept nothing of its own: there the input replaces the output)."""
    base = _model(dropout)
    ids = torch.randint(0, 300, (2, 17), device=DEVICE)
    la, ga = loss_and_grads(copy.deepcopy(base), ids, seed=3)
    remade = _remade(base)
    lb, gb = loss_and_grads(remade, ids, seed=3)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)
    assert _notes(remade) == 0  # every note was taken by its reader
    norm = ids.numel() * base.get_base_model().config.hidden_size * 4  # float32
    layers = len(decoder_layers(base))
    assert saved_bytes(copy.deepcopy(base), ids) - saved_bytes(_remade(base), ids) == (2 * layers - 1) * norm


def test_no_note_outlives_its_use_and_a_different_input_is_not_remade():
    m = _remade(_model(0.1))
    layer = decoder_layers(m)[1]
    norm, reader = layer.post_attention_layernorm, layer.mlp.gate_proj
    x = torch.randn(1, 5, 64, device=DEVICE, requires_grad=True)
    out = norm(x)
    assert remade_norms.source(reader, out + 0) is None  # not the norm's output: kept as usual
    assert remade_norms.source(reader, out) is None  # the note was taken by the first reader
    out = norm(x)
    src = remade_norms.source(reader, out)
    assert src[0] is x and torch.equal(remade_norms.remake(src), out)
    norm(x)  # a note nobody takes ...
    with torch.no_grad():
        norm(x)  # ... is dropped by the next forward that makes none (evaluation)
    assert _notes(m) == 0
    m.eval()
    with torch.no_grad():
        m(input_ids=torch.randint(0, 300, (1, 9), device=DEVICE))
    assert _notes(m) == 0
    remade_norms.set_remade(layer, False)
    norm(x)
    assert remade_norms.source(reader, norm(x)) is None  # off: no note
