"""mhsft/serve/scoring.py and Engine.score: many continuations per packed forward give the log-likelihoods of one
plain forward per request, for the base model and each adapter, on the scheduler thread while it generates."""

from __future__ import annotations

import queue

import torch

from mhsft.model import BASE
from mhsft.serve import scoring
from mhsft.serve.engine import Engine, Request
from mhsft.serve.sampling import SamplingParams


def test_plan_runs_a_shared_context_once():
    ctx = (5, 6, 7)
    pairs = [(ctx, (1,)), (ctx, (2,)), (ctx, (3, 4)), ((9,), (8,)), (ctx, (3, 4))]
    seqs, reads = scoring.plan(pairs)
    assert seqs == [
        (5, 6, 7, 3),
        (9,),
    ]  # single-token options read the context's last position of (5, 6, 7, 3)
    assert reads[0] == [(0, 2, 1)] and reads[1] == [(0, 2, 2)]
    assert reads[2] == reads[4] == [(0, 2, 3), (0, 3, 4)]
    assert reads[3] == [(1, 0, 8)]
    seqs, reads = scoring.plan([((1, 2), (3,)), ((1, 2), (4,))])
    assert seqs == [(1, 2)] and reads == [[(0, 1, 3)], [(0, 1, 4)]]


def _reference(model, ctx, cont) -> float:
    """One plain forward of context + continuation: the sum of log p(continuation token | everything before)."""
    ids = torch.tensor([list(ctx) + list(cont)], device=model.device)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def _pairs(vocab: int, n: int = 40) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for q in range(n):
        ctx = torch.randint(0, vocab, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
        for k in range(4 if q % 3 else 2):  # options of one question share its context
            cont = torch.randint(0, vocab, (1 if q % 4 else 1 + k,), generator=g).tolist()
            out.append((ctx, cont))
    return out


def test_engine_scores_equal_a_plain_forward_per_request(loaded, monkeypatch):
    model, tok, names = loaded
    if (
        model.device.type == "cuda"
    ):  # float32 on a GPU packs through flex_attention, which Inductor cannot build
        # for the tiny model's head size 16; per-sample SDPA scores the same packed rows exactly
        monkeypatch.setattr("mhsft.serve.engine.select_attn_backend", lambda device: ("sdpa", None))
    pairs = _pairs(int(model.config.vocab_size) if hasattr(model, "config") else 300)
    engine = Engine(model, tok, names, max_batch_size=2, max_prefill_tokens=256)  # several packed rows
    for adapter in (BASE, names[0]):
        got = engine.score(pairs, adapter)  # not started: runs in this thread
        engine._use_adapter(adapter)
        with torch.inference_mode():
            want = [_reference(model, c, k) for c, k in pairs]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=2e-4)
    base, ft = engine.score(pairs[:8], BASE), engine.score(pairs[:8], names[0])
    assert max(abs(a - b) for a, b in zip(base, ft)) > 1e-3  # the adapter is really applied


def test_scoring_runs_on_the_scheduler_while_it_generates(loaded):
    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=2).start()
    try:
        events: queue.Queue = queue.Queue()
        engine.submit(
            Request([1, 2, 3, 4], SamplingParams(max_new_tokens=30, ignore_eos=True), events.put, names[0])
        )
        pairs = _pairs(300, 6)
        got = engine.score(pairs, BASE)
        kinds = []
        while not kinds or kinds[-1] not in ("done", "error"):
            kinds.append(events.get(timeout=60).kind)
        assert kinds.count("token") == 30 and kinds[-1] == "done"  # generation went on around the scoring
        alone = Engine(model, tok, names).score(pairs, BASE)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), rtol=0, atol=1e-5)
    finally:
        engine.stop()
