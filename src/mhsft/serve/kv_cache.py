"""The serving engine's KV cache: fixed slots a request keeps from its prefill to its last token.

One tensor per layer, [slot, kv head, position, dim], allocated once: each row sits at its own position, a row
can join or leave between two steps, and a decode step's shapes never change (what CUDA graphs need). It plugs
into a Hugging Face decoder as its cache object (`update` is the public extension point), so the model code,
PEFT's LoRA layers included, runs unchanged.
"""

from __future__ import annotations

import torch


class SlotCache:
    """KV cache of fixed slots. Before each forward the engine sets which slots the batch rows use
    (`slots`), where each new token goes (`positions`) and how many positions attention reads (`kv_len`)."""

    def __init__(
        self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device
    ):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.kv_len = 0
        self.first_rows = 0  # > 0: the batch rows are slots 0..first_rows-1, read as a view (no gather)

    # Called by every attention layer; extra arguments differ between transformers versions.
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        rows = self.slots[:, None]
        k[rows, :, self.positions] = key_states.transpose(1, 2).to(k.dtype)
        v[rows, :, self.positions] = value_states.transpose(1, 2).to(v.dtype)
        if self.first_rows:
            return k[: self.first_rows, :, : self.kv_len], v[: self.first_rows, :, : self.kv_len]
        return k[self.slots, :, : self.kv_len], v[self.slots, :, : self.kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len


def kv_cache_bytes(config, slots: int, max_len: int, dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return slots * max_len * per_token * torch.empty((), dtype=dtype).element_size()
