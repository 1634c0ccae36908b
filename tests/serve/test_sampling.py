"""mhsft/serve/sampling.py: each row of a batch samples with its own settings."""

from __future__ import annotations

import torch

from mhsft.serve.sampling import RowState, SamplingParams, sample


def test_sampling_rows_keep_their_own_settings():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = SamplingParams()
    top1 = SamplingParams(temperature=1.5, top_k=1)
    seeded = SamplingParams(temperature=1.0, seed=123)
    rows = [
        RowState.create(p, [], 50, "cpu") for p in (greedy, top1, seeded, SamplingParams(temperature=0.7))
    ]
    out = sample(logits.clone(), rows)
    assert out.tokens[0] == int(logits[0].argmax()) and out.tokens[1] == int(logits[1].argmax())
    alone = sample(logits[2:3].clone(), [RowState.create(seeded, [], 50, "cpu")])
    assert alone.tokens[0] == out.tokens[2]  # a seed gives the same token whatever the batch around it
    tokens = {
        sample(logits[2:3].clone(), [RowState.create(p, [], 50, "cpu")]).tokens[0] for p in [seeded] * 3
    }
    assert tokens == {out.tokens[2]}
    # top-p keeps only the nucleus
    peaked = torch.full((1, 10), -10.0)
    peaked[0, 3] = 10.0
    picks = {
        sample(
            peaked.clone(), [RowState.create(SamplingParams(temperature=2.0, top_p=0.5), [], 10, "cpu")]
        ).tokens[0]
        for _ in range(20)
    }
    assert picks == {3}
    # repetition penalty pushes a seen token below an unseen one
    lg = torch.tensor([[2.0, 1.9, 0.0]])
    st = RowState.create(SamplingParams(repetition_penalty=1.5), [0], 3, "cpu")
    assert sample(lg.clone(), [st]).tokens == [1]
    st = RowState.create(SamplingParams(frequency_penalty=1.0), [], 3, "cpu")
    st.observe(0)
    assert sample(lg.clone(), [st]).tokens == [1]
