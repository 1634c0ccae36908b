"""The trainer's loss path without host-device synchronizations gives the same numbers as the synchronizing one:
label positions found on the host (instead of a boolean mask on the device), the packed row's ready-made mask
mapping (instead of transformers detecting packing from the position ids), `batch_to_device`."""

from __future__ import annotations

import pytest
import torch

from mhsft.packed_attention import register_packed_attention
from mhsft.train import loss as loss_mod
from mhsft.train.batches import batch_to_device, collate_packed
from mhsft.train.loss import ChunkedLMLoss, chunked_lm_loss, label_positions
from tiny import random_samples as _samples
from tiny import tiny_qwen2 as _tiny_qwen2


def test_label_positions_match_the_boolean_mask():
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, 9], [1, -100, 2, 3, -100, -100, 4, -100]])
    pos = label_positions(labels)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    assert pos.tolist() == (shifted.reshape(-1) != -100).nonzero().view(-1).tolist()
    assert pos.dtype == torch.long


def test_chunked_loss_with_positions_equals_mask_path():
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (2, 40))
    labels[torch.rand(2, 40) < 0.4] = -100
    head = torch.nn.Linear(16, 50, bias=False)
    h1 = torch.randn(2, 40, 16, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    a = chunked_lm_loss(h1, head, labels, chunk_size=7)
    b = chunked_lm_loss(h2, head, labels, chunk_size=7, positions=label_positions(labels))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.backward()
    b.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=0)


def test_packed_loss_without_syncs_equals_transformers_masks(monkeypatch):
    """The ready-made mask mapping and host label positions change nothing, in the loss or the gradients."""
    model = _tiny_qwen2(register_packed_attention("sdpa"))
    wrapped = ChunkedLMLoss(model, chunk_size=16)
    host = collate_packed(_samples([7, 13, 4, 22, 1, 9]))
    assert loss_mod.packed_mask_mapping(model.config) is not None
    fast = wrapped(**batch_to_device(host, "cpu"))
    fast.backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(loss_mod, "packed_mask_mapping", lambda config: None)
    slow = wrapped(**host)
    slow.backward()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)
    for a, p in zip(g_fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=1e-6)


def test_mask_mapping_only_for_packed_attention():
    model = _tiny_qwen2("sdpa")
    assert loss_mod.packed_mask_mapping(model.config) is None


def test_batch_to_device_keeps_values_and_adds_positions():
    host = collate_packed(_samples([5, 8]))
    moved = batch_to_device(host, "cpu")
    assert set(moved) == set(host) | {"label_positions"}
    for k, v in host.items():
        assert torch.equal(moved[k], v) if isinstance(v, torch.Tensor) else moved[k] == v
    assert torch.equal(moved["label_positions"], label_positions(host["labels"]))


def test_liger_fused_loss_equals_the_chunked_loss():
    """The +flce candidate (Liger's fused linear cross-entropy; Triton's interpreter on the CPU): the same summed
    loss and input gradient as the chunked loss over the same labelled positions."""
    pytest.importorskip("liger_kernel", reason="needs liger-kernel")
    from mhsft.train.loss import chunked_lm_loss, liger_fused_loss

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 120, bias=False)
    labels = torch.randint(0, 120, (1, 50))
    labels[0, :10] = -100
    grads = []
    for fused in (None, liger_fused_loss):
        hidden = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss = chunked_lm_loss(hidden, lm_head, labels, chunk_size=16, fused=fused)
        loss.backward()
        grads.append((loss.detach(), hidden.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
