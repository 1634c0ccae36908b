"""mhsft/train/packed_attention.py: backend choice, and proof that packed attention equals the per-sample
computation (forward, generation, LoRA loss and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mhsft import packed_attention
from mhsft.data.render import IGNORE_INDEX
from mhsft.packed_attention import register_packed_attention, select_attn_backend
from mhsft.train.batches import collate_packed, collate_padded, count_label_tokens
from tiny import random_samples as _samples
from tiny import tiny_qwen2 as _tiny_qwen2


def _use_packed_attention(model, backend: str) -> None:
    """Switch a loaded model (or a PEFT wrapper around one) to the packed attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(register_packed_attention(backend))


# ----------------------------------------------------------------------------------------------------------
# Backend choice


def test_select_attn_backend_cpu():
    assert select_attn_backend("cpu", None) == ("sdpa", None)
    backend, notice = select_attn_backend("cpu", "flash_attn")
    assert backend == "sdpa" and notice and "\n" not in notice and notice.startswith("flash_attn")


def test_select_attn_backend_cuda_chain(monkeypatch):
    monkeypatch.setattr(packed_attention, "_flash_attn_varlen", lambda: None)
    monkeypatch.setattr(packed_attention, "_cuda_supports_varlen", lambda device: True)
    monkeypatch.setattr(packed_attention, "_flex_available", lambda: True)
    assert select_attn_backend("cuda", None) == ("varlen", None)
    assert select_attn_backend("cuda", "flash_attn") == (
        "varlen",
        "flash_attn is not installed; packing uses torch varlen_attn",
    )
    assert select_attn_backend("cuda", "flex_attention") == ("flex", None)
    monkeypatch.setattr(packed_attention, "_cuda_supports_varlen", lambda device: False)
    assert select_attn_backend("cuda", None) == ("flex", None)
    monkeypatch.setattr(packed_attention, "_flash_attn_varlen", lambda: object())
    assert select_attn_backend("cuda", "flash_attn") == ("flash_attn", None)


# ----------------------------------------------------------------------------------------------------------
# Kernels on raw tensors (the CUDA ones through stand-ins that run here)


def _per_doc_reference(q, k, v, cu, scale):
    rep = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qq, kk, vv = (
            t[s:e].transpose(0, 1) for t in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        )
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 14, 15, 29], dtype=torch.int32)
    return torch.randn(29, 4, 16), torch.randn(29, 2, 16), torch.randn(29, 2, 16), cu


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sdpa_and_flex_kernels_match_per_document(qkv):
    q, k, v, cu = qkv
    ref = _per_doc_reference(q, k, v, cu, 0.3)
    torch.testing.assert_close(
        packed_attention._sdpa_forward(q, k, v, cu, 14, 0.3, 0.0), ref, rtol=0, atol=1e-5
    )
    flex = packed_attention._flex_forward(q, k, v, cu, 14, 0.3, 0.0, compiled=False)  # uncompiled runs on CPU
    torch.testing.assert_close(flex, ref, rtol=0, atol=1e-5)


def test_varlen_call_convention(qkv, monkeypatch):
    """torch's varlen_attn only runs on CUDA: check what we hand it with a stand-in of its signature."""
    q, k, v, cu = qkv
    seen = {}

    def fake_varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
    ):  # fmt: skip
        seen.update(window_size=window_size, enable_gqa=enable_gqa, max_q=max_q, cu_k=cu_seq_k)
        return _per_doc_reference(query, key, value, cu_seq_q, scale)

    monkeypatch.setattr(packed_attention, "_torch_varlen_attn", lambda: fake_varlen_attn)
    packed_attention._varlen_call_kwargs.cache_clear()
    try:
        out = packed_attention._varlen_forward(q, k, v, cu, 14, 0.3, 0.0)
    finally:
        packed_attention._varlen_call_kwargs.cache_clear()
    assert (
        seen["window_size"] == (-1, 0) and seen["enable_gqa"] and seen["max_q"] == 14 and seen["cu_k"] is cu
    )
    torch.testing.assert_close(out, _per_doc_reference(q, k, v, cu, 0.3), rtol=0, atol=1e-6)


@pytest.fixture
def old_varlen(monkeypatch):
    """A stand-in of torch 2.10/2.11's varlen_attn (no `enable_gqa`), recording the k heads it was handed;
    `refuse` makes it reject unexpanded heads as a stricter version would, `oom` makes it run out of memory."""
    calls, mode = [], {"refuse": False, "oom": False}

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1)):  # fmt: skip
        calls.append(key.shape[1])
        if mode["oom"]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if mode["refuse"] and key.shape[1] != query.shape[1]:
            raise RuntimeError("Expected query, key, and value to have the same number of heads")
        return _per_doc_reference(query, key, value, cu_seq_q, scale)

    monkeypatch.setattr(packed_attention, "_torch_varlen_attn", lambda: fake)
    monkeypatch.setattr(packed_attention, "_gqa_native", [True])
    packed_attention._varlen_call_kwargs.cache_clear()
    yield calls, mode
    packed_attention._varlen_call_kwargs.cache_clear()


def test_old_varlen_gets_the_kv_heads_unexpanded(qkv, old_varlen):
    """Without `enable_gqa` the kernel reads the grouped heads itself: k/v go in as they are, no copy."""
    q, k, v, cu = qkv
    calls, _ = old_varlen
    out = packed_attention._varlen_forward(q, k, v, cu, 14, 0.3, 0.0)
    assert calls == [2]
    torch.testing.assert_close(out, _per_doc_reference(q, k, v, cu, 0.3), rtol=0, atol=1e-6)


def test_a_version_that_refuses_grouped_heads_gets_them_expanded_from_then_on(qkv, old_varlen):
    q, k, v, cu = qkv
    calls, mode = old_varlen
    mode["refuse"] = True
    for _ in range(2):
        out = packed_attention._varlen_forward(q, k, v, cu, 14, 0.3, 0.0)
        torch.testing.assert_close(out, _per_doc_reference(q, k, v, cu, 0.3), rtol=0, atol=1e-6)
    assert calls == [2, 4, 4]  # refused once, expanded on every call after


def test_out_of_memory_is_not_taken_for_a_refusal(qkv, old_varlen):
    """The plan's probe relies on out-of-memory reaching it; it must not switch the GQA path either."""
    q, k, v, cu = qkv
    calls, mode = old_varlen
    mode["oom"] = True
    with pytest.raises(torch.OutOfMemoryError):
        packed_attention._varlen_forward(q, k, v, cu, 14, 0.3, 0.0)
    assert calls == [2] and packed_attention._gqa_native == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen_attn runs on CUDA only")
def test_varlen_on_the_gpu_grouped_heads_equal_expanded_ones(monkeypatch):
    """On the card: the grouped k/v heads as handed to the kernel give the expanded ones' output and gradients."""
    monkeypatch.setattr(packed_attention, "_gqa_native", [True])
    if packed_attention._torch_varlen_attn() is None:
        pytest.skip("this torch has no varlen_attn")
    torch.manual_seed(0)
    cu = torch.tensor([0, 50, 177, 180, 300], dtype=torch.int32, device="cuda")
    q, k, v = (
        torch.randn(300, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2)
    )
    out = packed_attention._varlen_forward(q, k, v, cu, 127, 0.125, 0.0)
    assert packed_attention._gqa_native == [True] or packed_attention._varlen_call_kwargs()[1]
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = _per_doc_reference(*(t.float() for t in (q, k, v)), cu, 0.125)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------------------
# Whole model: packed == per-sample


LENGTHS = [7, 13, 4, 22, 1, 9]


@pytest.fixture(scope="module")
def models():
    name = register_packed_attention("sdpa")
    packed = _tiny_qwen2(name)
    reference = _tiny_qwen2("sdpa")
    reference.load_state_dict(packed.state_dict())
    return packed, reference


def test_packed_forward_matches_per_sample(models):
    packed, reference = models
    samples = _samples(LENGTHS)
    batch = collate_packed(samples)
    cu = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        logits = packed(**batch).logits[0]
        # the same row with no boundary kwargs: boundaries come from the restarting position ids
        from_positions = packed(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        # control: one long causal sequence lets later samples see earlier ones, so it must differ
        leaky = reference(input_ids=batch["input_ids"]).logits[0]
        for i, s in enumerate(samples):
            alone = reference(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[cu[i] : cu[i + 1]], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(from_positions[cu[i] : cu[i + 1]], alone, rtol=0, atol=1e-5)
    assert (leaky[cu[1] :] - logits[cu[1] :]).abs().max() > 1e-3


def test_boundaries_moved_to_host_once_per_forward(models, monkeypatch):
    packed, _ = models
    builds = []
    real = packed_attention._per_forward

    def counting(kind, key, device, build):
        return real(kind, key, device, lambda: builds.append(kind) or build())

    monkeypatch.setattr(packed_attention, "_per_forward", counting)
    with torch.no_grad():
        packed(**collate_packed(_samples(LENGTHS)))
    assert builds.count("sdpa_bounds") == 1  # two layers, one host copy of the boundaries


def test_padded_batches_still_work_with_packed_attention(models):
    """Unpacked batches (and generation) through the packed attention name fall back to plain SDPA."""
    packed, reference = models
    batch = collate_padded(_samples([5, 11, 8]), pad_id=0)
    with torch.no_grad():
        got, want = packed(**batch).logits, reference(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-6)
    with torch.no_grad():
        prompt = torch.tensor([[1, 2, 3, 4]])
        a = packed.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False
    )
    return get_peft_model(copy.deepcopy(model), cfg)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_packed_loss_and_grads_match_per_sample(models):
    """Token-level mean over the batch's label tokens: packed in one row == summed over samples alone."""
    packed_base, reference_base = models
    packed, reference = _lora(packed_base), _lora(reference_base)
    _use_packed_attention(packed, "sdpa")
    samples = _samples(LENGTHS, seed=5)
    batch = collate_packed(samples)
    n_tokens = count_label_tokens(batch["labels"])

    loss = packed(**batch, num_items_in_batch=n_tokens).loss
    loss.backward()

    ref_loss = 0.0
    for s in samples:
        one = torch.tensor([s["input_ids"]])
        logits = reference(input_ids=one).logits[0, :-1]
        target = torch.tensor(s["labels"][1:], dtype=torch.long)
        part = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / n_tokens
        part.backward()
        ref_loss += part.item()

    assert loss.item() == pytest.approx(ref_loss, abs=1e-5)
    got, want = _lora_grads(packed), _lora_grads(reference)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B for 7 linears in 2 layers
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-5, msg=n)
    assert any(g.abs().max() > 1e-3 for g in got.values())  # the comparison is not between zeros
