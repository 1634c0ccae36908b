"""Small builders the model-level tests share: a 2-layer Qwen2 from a config, a LoRA on it, and random training
samples."""

from __future__ import annotations

import importlib.util
import os

import torch

# MHSFT_TEST_DEVICE=cuda runs the fused-kernel tests compiled on a GPU (with Liger's kernels where installed); on the
# CPU they run under Triton's interpreter (tests/conftest.py), float32, with torch's RMSNorm and SwiGLU
DEVICE = os.environ.get("MHSFT_TEST_DEVICE", "cpu")
LIGER = DEVICE == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def tiny_qwen2(attn: str | None = None):
    """A 2-layer, hidden-64 Qwen2 in float32, seeded (the same weights at every call), in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, use_cache=False)  # fmt: skip
    model = Qwen2ForCausalLM(cfg).float().eval()
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def random_samples(lengths, seed: int = 1) -> list[dict]:
    """Tokenized samples of these lengths; the first third is the prompt (-100), the rest is trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return out


def tiny_lora(dropout: float):
    """tiny_qwen2 with a LoRA (r8, alpha 32) on every linear layer, in training mode; B is random instead of zero, so
    that the LoRA path changes the outputs."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    m = get_peft_model(tiny_qwen2().train(), cfg)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m


def loss_and_grads(m, ids, seed: int = 0):
    """(loss, {trainable parameter: gradient}) of one forward and backward, with the RNG seeded (dropout)."""
    torch.manual_seed(seed)
    m.zero_grad()
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def saved_bytes(m, ids) -> int:
    """Bytes autograd keeps from one forward for its backward, each stored view once. Only the forward counts (a
    backward may build small graphs of its own), and the tensors stay referenced until counted, so a freed address
    reused by another tensor cannot merge two entries."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(t.numel() * t.element_size() for t in seen.values())


def fused_tiny_lora(dropout: float):
    """tiny_lora on DEVICE with its LoRA linears on the fused path (mhsft.train.fused_lora) and, where LIGER, Liger's
    kernels; tests that run it use the `fused_on_device` fixture."""
    from mhsft import lora_forward
    from mhsft.train import fused_lora

    m = tiny_lora(dropout).to(DEVICE)
    lora_forward.fast_lora_forward(m, fused=fused_lora)
    if LIGER:
        from mhsft.train.speedups import apply_liger

        assert apply_liger(m) is None
    return m
