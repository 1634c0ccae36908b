"""Small builders the model-level tests share: a 2-layer Qwen2 from a config and random training samples."""

from __future__ import annotations

import torch


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
