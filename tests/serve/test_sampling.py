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


def test_checked_values_always_compute():
    """Values that once failed a whole batch (a temperature of 1e-300 made NaN probabilities, a top_k of 10**20
    overflowed, a seed of 10**30 could not seed a generator) are made safe once, at submit; out-of-range and
    non-finite values are refused with the setting's name."""
    import math

    import pytest

    from mhsft.utils import UserError

    vocab = 50
    p = SamplingParams(temperature=1e-300, top_k=10**20, seed=10**30, logit_bias={"3": 100.0}).checked(vocab)
    assert p.greedy and p.top_k == 0 and p.logit_bias == {3: 100.0}
    assert SamplingParams(temperature=1e-5, top_k=-1).checked(vocab).temperature == 1e-5
    torch.manual_seed(0)
    logits = torch.randn(6, vocab) * 30
    rows = [
        RowState.create(q.checked(vocab), [1, 2, 3], vocab, "cpu")
        for q in (
            SamplingParams(temperature=1e-5, seed=2**64 + 7),
            SamplingParams(temperature=2.0, top_p=1e-300, seed=-5),
            SamplingParams(temperature=1.0, repetition_penalty=0.01),
            SamplingParams(
                temperature=1.0, repetition_penalty=100.0, frequency_penalty=2.0, presence_penalty=-2
            ),
            SamplingParams(temperature=1e-5, logit_bias={7: 100.0}, logprobs=20),
            SamplingParams(temperature=2.0, logit_bias={k: -100.0 for k in range(vocab)}),
        )
    ]
    for _ in range(5):
        out = sample(logits.clone(), rows)
        assert all(0 <= t < vocab for t in out.tokens)
        assert out.tokens[4] == 7  # +100 wins even over logits scaled by 1e5
        assert all(math.isfinite(v) for _, v in out.top[4])
    # the same seed modulo 2**64 draws the same token
    a = RowState.create(SamplingParams(temperature=1.0, seed=7), [], vocab, "cpu")
    b = RowState.create(SamplingParams(temperature=1.0, seed=2**64 + 7), [], vocab, "cpu")
    assert sample(logits[:1].clone(), [a]).tokens == sample(logits[:1].clone(), [b]).tokens
    for bad, name in [
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(temperature=2.5), "temperature"),
        (SamplingParams(top_p=float("inf")), "top_p"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(presence_penalty=-3), "presence_penalty"),
        (SamplingParams(top_k=1.5), "top_k"),
        (SamplingParams(seed="1"), "seed"),
        (SamplingParams(max_new_tokens=-1), "max_new_tokens"),
        (SamplingParams(logprobs=21), "logprobs"),
        (SamplingParams(logit_bias={50: 1.0}), "logit_bias"),
        (SamplingParams(logit_bias={1: float("nan")}), "logit_bias"),
    ]:
        with pytest.raises(UserError, match=name):
            bad.checked(vocab)
