"""mhsft/serve/kv_cache.py: the slot cache writes each row where the engine says and reads back what it wrote."""

from __future__ import annotations

import torch
from transformers import Qwen2Config

from mhsft.serve.kv_cache import SlotCache, kv_cache_bytes


def _cache(slots=4, max_len=8, heads=2, dim=3, layers=2):
    return SlotCache(layers, slots, max_len, heads, dim, torch.float32, torch.device("cpu"))


def _kv(rows, t, heads=2, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, heads, t, dim, generator=g), torch.randn(rows, heads, t, dim, generator=g)


def test_prefill_then_decode_reads_back_each_rows_own_tokens():
    c = _cache()
    # a prefill of two rows into slots 2 and 0, three positions each
    c.slots, c.positions, c.kv_len = torch.tensor([2, 0]), torch.arange(3)[None].expand(2, 3), 3
    k, v = _kv(2, 3)
    got_k, got_v = c.update(k, v, layer_idx=1)
    torch.testing.assert_close(got_k, k, rtol=0, atol=0)
    torch.testing.assert_close(got_v, v, rtol=0, atol=0)
    assert not c.k[0].any()  # another layer is untouched
    # one decode token per row, at position 3; attention reads 4 positions
    c.positions, c.kv_len = torch.tensor([[3], [3]]), 4
    k1, v1 = _kv(2, 1, seed=1)
    got_k, _ = c.update(k1, v1, layer_idx=1)
    torch.testing.assert_close(got_k, torch.cat([k, k1], dim=2), rtol=0, atol=0)
    assert c.get_seq_length() == 4


def test_rows_packed_in_the_first_slots_read_as_a_view():
    c = _cache()
    c.slots, c.positions, c.kv_len = torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.long), 1
    k, v = _kv(2, 1)
    gathered = c.update(k, v, 0)[0].clone()
    c.first_rows = 2
    view = c.update(k, v, 0)[0]
    torch.testing.assert_close(view, gathered, rtol=0, atol=0)
    assert view.data_ptr() == c.k[0].data_ptr()  # no copy: the cache's own storage


def test_move_copies_a_slot_up_to_its_length():
    c = _cache()
    c.slots, c.positions, c.kv_len = torch.tensor([3]), torch.arange(5)[None], 5
    k, v = _kv(1, 5)
    for layer in range(2):
        c.update(k, v, layer)
    c.move(3, 1, 4)
    for layer in range(2):
        torch.testing.assert_close(c.k[layer][1, :, :4], k[0, :, :4], rtol=0, atol=0)
        torch.testing.assert_close(c.v[layer][1, :, :4], v[0, :, :4], rtol=0, atol=0)
        assert not c.k[layer][1, :, 4:].any()  # past the length: not copied


def test_kv_cache_bytes_is_what_the_cache_allocates():
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    c = SlotCache(3, 5, 16, 2, 16, torch.bfloat16, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for t in c.k + c.v)
    assert kv_cache_bytes(cfg, 5, 16, torch.bfloat16) == held == 5 * 16 * 2 * 3 * 2 * 16 * 2
