"""mhsft/serve/decode_attention.py: the engine's decode attention equals SDPA over repeated KV heads."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from mhsft.serve.decode_attention import decode_attention_forward


@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa_with_repeated_kv_heads(masked):
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 7, True
    q, k, v = torch.randn(3, 28, 1, 16), torch.randn(3, 4, 40, 16), torch.randn(3, 4, 40, 16)
    mask = (torch.arange(40)[None] < torch.tensor([[5], [40], [23]]))[:, None, None, :] if masked else None
    out, _ = decode_attention_forward(module, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 7), repeat_kv(v, 7), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert out.shape == (3, 1, 28, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
