"""The serving engine's attention, registered with transformers as `mhsft_decode` (measured in
benchmarks/decode_profile.py, notes in benchmarks/NOTES.md)."""

from __future__ import annotations

import contextlib

import torch

DECODE_ATTN = "mhsft_decode"


def decode_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA, except that a one-token query under grouped-query attention runs on the KV heads directly: the
    query heads sharing a KV head become that head's query rows, so each cached K/V is read once instead of
    being repeated to every query head first (transformers before 5.2x copies it 7 times for Qwen2.5-7B's 28
    query / 4 KV heads, which at batch 64 costs more than reading the weights)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, t, d = query.shape
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    if t != 1 or groups == 1 or not shared_mask or key.shape[1] * groups != heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    q = query.reshape(b, key.shape[1], groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


def register_decode_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTN, decode_attention_forward)
    with contextlib.suppress(ImportError):  # transformers >= 4.53 builds masks per attention name
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(DECODE_ATTN, sdpa_mask)
    return DECODE_ATTN
