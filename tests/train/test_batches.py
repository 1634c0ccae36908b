"""mhsft/train/batches.py: the packed and padded collators, and each epoch's plan of micro-batches."""

from __future__ import annotations

import pytest
import torch

from mhsft.data.render import IGNORE_INDEX
from mhsft.train.batches import collate_packed, collate_padded, count_label_tokens


def _sample(ids, labels):
    return {"input_ids": list(ids), "labels": list(labels)}


def test_collate_packed_layout():
    a = _sample([1, 2, 3], [1, 2, 3])
    b = _sample([4, 5], [-100, 5])
    c = _sample([6, 7, 8, 9], [6, -100, 8, 9])
    batch = collate_packed([[a, b], [c]])  # a batch of two bins -> one row
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, 8, 9]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert "attention_mask" not in batch
    assert collate_packed([a, b, c])["input_ids"].equal(batch["input_ids"])
    with pytest.raises(ValueError):
        collate_packed([_sample([1, 2], [1])])


def test_no_cross_sample_prediction():
    """The last token of sample k never predicts sample k+1's first token, and the number of loss tokens
    equals the per-sample total (a sample's own first label is never a target anyway)."""
    samples = [_sample([10, 11, 12], [10, 11, 12]), _sample([20, 21], [20, 21]), _sample([30], [30])]
    batch = collate_packed(samples)
    shifted = batch["labels"][0, 1:].tolist()  # the target of position t is labels[t + 1]
    ends = batch["cu_seq_lens_q"].tolist()[1:-1]
    assert [shifted[e - 1] for e in ends] == [IGNORE_INDEX, IGNORE_INDEX]
    per_sample = sum(count_label_tokens(torch.tensor([s["labels"]])) for s in samples)
    assert count_label_tokens(batch["labels"]) == per_sample == 3
    assert 20 not in shifted and 30 not in shifted


def test_collate_padded():
    batch = collate_padded(
        [_sample([1, 2, 3], [-100, 2, 3]), _sample([4], [4])], pad_id=0, pad_to_multiple_of=4
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
