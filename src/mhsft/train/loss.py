"""Causal-LM loss without materializing the full logits.

For Qwen2.5's 152k vocabulary, 24k tokens of fp32 logits are 15 GB (plus the same again for their
gradient). We run the LM head and cross-entropy over chunks of tokens under activation checkpointing,
so only one chunk's logits exist at a time, in the forward and in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mhsft.data.render import IGNORE_INDEX
from mhsft.packed_attention import packed_mask_mapping


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the positions that predict them: position t predicts token t+1."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[..., :-1] = labels[..., 1:]
    return out


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (into the [..., T] tokens) whose shifted label is trained, ascending. Computed on the host by
    the trainer, before the batch moves to the GPU: the boolean-mask indexing it replaces reads the count back from
    the GPU (a synchronization) in every micro-batch."""
    return (shift_labels(labels).reshape(-1) != IGNORE_INDEX).nonzero().view(-1)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_loss_and_hits(hidden, weight, bias, target) -> torch.Tensor:
    """Validation: [summed cross-entropy, tokens whose most likely prediction is the label] of one chunk."""
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([loss, (logits.argmax(-1) == target).sum().float()])


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    positions: torch.Tensor | None = None,
    count_hits: bool = False,
    fused=None,
) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over every labelled position.

    `hidden` [..., T, H] are the final hidden states, `labels` [..., T] the unshifted labels (-100 = no loss).
    Returning the sum lets the caller divide by the number of labelled tokens in the whole optimizer step
    (across micro-batches and ranks), which is the token-level mean that gradient accumulation must preserve.
    `positions` are `label_positions(labels)` when the caller has them (no host-device synchronization here).
    `count_hits` (validation, no gradient): [loss sum, correctly predicted labelled tokens] instead, for
    eval_token_acc (ms-swift's name). `fused(h, weight, bias, target)` (`liger_fused_loss`) replaces the chunks
    in training: the LM head and loss in one pass whose input gradient is computed in the forward.
    """
    target = shift_labels(labels).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    # Only labelled positions need logits at all: assistant tokens are often under half of a counseling dialogue.
    if positions is None:
        keep = target != IGNORE_INDEX
        h, target = h[keep], target[keep]
    else:
        positions = positions.to(h.device)
        h, target = h.index_select(0, positions), target.index_select(0, positions)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if fused is not None and torch.is_grad_enabled() and not count_hits:
        return fused(h, weight, bias, target)
    if count_hits:
        total = h.new_zeros(2, dtype=torch.float32)
        for i in range(0, h.shape[0], chunk_size):
            total = total + _chunk_loss_and_hits(
                h[i : i + chunk_size], weight, bias, target[i : i + chunk_size]
            )
        return total
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_size):
        hc, tc = h[i : i + chunk_size], target[i : i + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hc, weight, bias, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, weight, bias, tc)
    return total


# Training through Liger's fused linear cross-entropy wherever Liger's kernels run (speedups.py): on an H100 at the
# 7B's 2 x 3072 it gave 14,972 tokens/s at 40.9 GiB against the chunked loss's 14,818 at 44.2 GiB, the same losses
# to bf16 rounding (benchmarks/NOTES.md, session 7); the memory it saves goes to the plan
FUSED_LOSS = True


def liger_fused_loss(h: torch.Tensor, weight: torch.Tensor, bias, target: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy over the labelled positions (summed): the logits of a chunk are made,
    reduced and differentiated in the forward, so the backward has no LM-head GEMM to redo (the chunked loss runs
    it three times: forward, recomputed forward, input gradient) and no float32 copy of the logits exists.
    The trainer's loss where Liger runs (FUSED_LOSS); benchmarks/train_throughput.py's `+flce` variant A/Bs it."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, weight, target, bias, reduction="sum")


class ChunkedLMLoss(torch.nn.Module):
    """The model plus its loss as one module, so that DDP / DeepSpeed see a single forward that returns the summed
    token loss of the batch, and the full logits tensor is never built."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 4096, fused=None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.fused = fused

    def forward(
        self, input_ids, labels, position_ids=None, attention_mask=None, label_positions=None, count_hits=False,
        **kw,
    ) -> torch.Tensor:  # fmt: skip
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        kw.pop("padding_tokens", None)  # a count for tokens/s, not a model input
        if attention_mask is None and "cu_seq_lens_q" in kw:
            attention_mask = packed_mask_mapping(lm.config)
        out = lm.get_decoder()(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **kw,
        )
        return chunked_lm_loss(
            out.last_hidden_state,
            lm.get_output_embeddings(),
            labels,
            self.chunk_size,
            label_positions,
            count_hits,
            self.fused,
        )
