"""The trainer's batches: each epoch's plan of micro-batches, and the collators that turn samples into tensors.

Layout of a packed batch. With packing, a batch of B bins is concatenated into ONE row of shape [1, T]
(T = the batch's real tokens, no padding at all), the "padding-free" layout flash-attn's varlen kernels
were built for: no compute is spent on padding and the kernel sees one flat token stream plus
`cu_seq_lens` boundaries. Position ids restart at 0 for every sample, so RoPE sees each sample exactly as
it would alone, and the packed attention (mhsft.packed_attention) never lets a token see another
sample's tokens.

Labels follow the Hugging Face convention (unshifted: `labels[i]` is `input_ids[i]` where trained, -100
elsewhere; the model shifts them inside the loss). In a packed row the logit at the last token of sample k
is followed by the first label of sample k+1, so the collator sets the label at every sample's first
position to -100: nothing is ever predicted across a sample boundary (alone, a sample's first token is
never a target either, so no training signal is lost).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import torch

from mhsft.data.binpack import pack_bfd
from mhsft.data.render import IGNORE_INDEX
from mhsft.train.loss import label_positions


def _flatten_samples(batch: Sequence[Any]) -> list[Mapping[str, Sequence[int]]]:
    """Accept a flat list of samples or a list of bins (lists of samples), as a DataLoader over bins yields."""
    out: list[Mapping[str, Sequence[int]]] = []
    for item in batch:
        if isinstance(item, Mapping):
            out.append(item)
        else:
            out.extend(item)
    return out


def _ids_and_labels(sample: Mapping[str, Sequence[int]]) -> tuple[Sequence[int], Sequence[int]]:
    ids, labels = sample["input_ids"], sample["labels"]
    if len(ids) == 0 or len(ids) != len(labels):
        raise ValueError(
            f"sample with {len(ids)} input_ids and {len(labels)} labels (need equal and non-empty)"
        )
    return ids, labels


def collate_packed(
    batch: Sequence[Any], pad_id: int = 0, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Concatenate samples (or bins of samples) into one padding-free row.

    Returns `input_ids`, `labels`, `position_ids` (each [1, T]), `cu_seq_lens_q`/`cu_seq_lens_k` (int32
    [n_samples + 1] offsets into the row) and `max_length_q`/`max_length_k` (ints). No `attention_mask`:
    its absence is what tells transformers (and the attention below) that the row is packed. Pass the
    whole dict to the model: `model(**batch)`.

    `pad_to_multiple_of` (FP8 matmuls want the token count a multiple of 16) appends a segment of `pad_id` tokens
    of its own (attending only to itself, no labels) and records its length as `padding_tokens`."""
    samples = _flatten_samples(batch)
    if not samples:
        raise ValueError("collate_packed got an empty batch")
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    lengths: list[int] = []
    for s in samples:
        ids, lab = _ids_and_labels(s)
        input_ids.extend(ids)
        labels.append(IGNORE_INDEX)  # the previous sample's last logit must not predict this token
        labels.extend(lab[1:])
        position_ids.extend(range(len(ids)))
        lengths.append(len(ids))
    longest = max(lengths)
    pad = -len(input_ids) % pad_to_multiple_of if pad_to_multiple_of else 0
    if pad:
        input_ids.extend([pad_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        position_ids.extend(range(pad))
    cu = torch.tensor([0, *accumulate(lengths + ([pad] if pad else []))], dtype=torch.int32)
    out = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    if pad_to_multiple_of:
        out["padding_tokens"] = pad
    return out


def collate_padded(
    batch: Sequence[Any], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Right-pad samples to the longest (rounded up to `pad_to_multiple_of`): `input_ids` (pad_id),
    `labels` (-100) and `attention_mask` (1 real / 0 pad), each [B, L]. For --packing false."""
    samples = _flatten_samples(batch)
    if not samples:
        raise ValueError("collate_padded got an empty batch")
    pairs = [_ids_and_labels(s) for s in samples]
    width = max(len(ids) for ids, _ in pairs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss is taken over (labels are shifted by one inside the model's loss): the
    denominator of the token-level mean, e.g. `num_items_in_batch` summed over gradient-accumulation steps."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def epoch_plan(samples: list[dict], epoch: int, args) -> list[list[list[int]]]:
    """The epoch's micro-batches, each a list of rows, each row a list of sample indices (one index per row when
    not packing). Deterministic in (seed, epoch), which is what makes resume exact."""
    rng = random.Random(args.seed * 1000 + epoch)
    order = list(range(len(samples)))
    rng.shuffle(order)
    if args.packing:
        bins = pack_bfd([len(samples[i]["input_ids"]) for i in order], args.max_length)
        rows = [[order[j] for j in b] for b in bins]
        rng.shuffle(rows)
    else:
        rows = [[i] for i in order]
    bs = args.per_device_train_batch_size
    return [rows[i : i + bs] for i in range(0, len(rows), bs)]


def collate(samples: list[dict], rows: list[list[int]], args, pad_id: int) -> dict:
    align = 16 if getattr(args, "fp8", False) else None  # FP8 matmuls want the token count a multiple of 16
    if args.packing:
        return collate_packed([[samples[i] for i in row] for row in rows], pad_id, align)
    return collate_padded([samples[row[0]] for row in rows], pad_id, align)


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding: what tokens/s counts."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel() - batch.get("padding_tokens", 0)


def batch_to_device(batch: dict, device) -> dict:
    """A collated (host) batch on `device`, without synchronizing it: the loss's label positions are found here on
    the host (`loss.label_positions`), and on a GPU the tensors go through pinned memory with non-blocking copies
    (a plain `.to("cuda")` of a host tensor waits for the whole stream: the GPU drains at every micro-batch)."""
    batch = dict(batch)
    if "labels" in batch:
        batch["label_positions"] = label_positions(batch["labels"])
    cuda = torch.device(device).type == "cuda"

    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)

    return {k: move(v) for k, v in batch.items()}
