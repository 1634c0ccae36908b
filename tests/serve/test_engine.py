"""mhsft/serve/engine.py: the continuous-batching engine against a plain forward pass: every token's logprob,
packed and padded batches, several adapters, asynchronous steps, bursts, cancellation and limits.
MHSFT_TEST_DEVICE=cuda runs them on a GPU (CUDA graphs, pinned copies and events included)."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from mhsft.serve.engine import BASE, Engine, Request, encode_chat
from mhsft.serve.sampling import RowState, SamplingParams


def _run(engine: Engine, reqs: list[Request]) -> list[list]:
    qs = []
    for r in reqs:
        q: queue.Queue = queue.Queue()
        r.emit = q.put
        engine.submit(r)
        qs.append(q)
    out = []
    for q in qs:
        evs = []
        while not evs or evs[-1].kind not in ("done", "error"):
            evs.append(q.get(timeout=60))
        out.append(evs)
    return out


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("pad_batches", [False, True])
def test_engine_matches_a_plain_forward_pass(loaded, pad_batches):
    """Rows of different lengths, base and adapter side by side, joining at different steps: every generated
    token's logprob and every prompt token's logprob equal a one-row forward pass over the same tokens. With
    padded batches (as for CUDA graphs) the padding rows write only to the scratch slot."""
    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=4, max_model_len=256, pad_batches=pad_batches).start()
    try:
        prompts = [
            encode_chat(tok, [{"role": "user", "content": c}]) for c in ("你好", "我最近睡不好，怎么办？")
        ]
        prompts.append(tok("今天心情不太好", add_special_tokens=False)["input_ids"])
        adapters = ["a", BASE, "a"]
        params = [
            SamplingParams(max_new_tokens=n, logprobs=2, prompt_logprobs=1, ignore_eos=True)
            for n in (9, 5, 7)
        ]
        reqs = [Request(p, sp, None, adapter=a) for p, sp, a in zip(prompts, params, adapters)]
        results = _run(engine, reqs)
    finally:
        engine.stop()
    for prompt, adapter_name, evs, sp in zip(prompts, adapters, results, params):
        assert evs[-1].kind == "done" and evs[-1].finish_reason == "length"
        toks = [e for e in evs if e.kind == "token"]
        assert len(toks) == sp.max_new_tokens
        ids = prompt + [e.token for e in toks]
        if adapter_name is BASE:
            with model.disable_adapter():
                ref = _reference_logprobs(model, ids)
        else:
            model.set_adapter(adapter_name)
            ref = _reference_logprobs(model, ids)
        (plp,) = [e.prompt_logprobs for e in evs if e.kind == "prompt_logprobs"]
        assert plp[0] == (None, None) and len(plp) == len(prompt)
        for i in range(1, len(prompt)):
            assert abs(plp[i][0] - ref[i - 1, prompt[i]].item()) < 1e-4
        for j, e in enumerate(toks):
            pos = len(prompt) - 1 + j
            assert abs(e.logprob - ref[pos, e.token].item()) < 1e-4
            assert e.top[0][0] == int(ref[pos].argmax())  # greedy: the chosen token is the top one
            assert e.token == e.top[0][0]


def test_engine_keeps_rows_packed_and_reads_them_as_a_view(loaded):
    """Requests of one adapter finishing at different steps: each finish moves the last running request into
    the freed slot, later steps read slots 0..n-1 as a view of the cache, and every token still has the
    logprob of a plain forward pass."""
    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=4, max_model_len=256, pad_batches=True)
    moves, views = [], []
    move, update = engine.cache.move, engine.cache.update
    engine.cache.move = lambda *a: (moves.append(a), move(*a))[1]

    def spy(*a, **kw):
        views.append(engine.cache.first_rows)
        return update(*a, **kw)

    engine.cache.update = spy
    engine.start()
    try:
        texts = ("你好", "我最近睡不好，怎么办？", "今天心情不太好", "谢谢你")
        prompts = [encode_chat(tok, [{"role": "user", "content": c}]) for c in texts]
        params = [SamplingParams(max_new_tokens=n, logprobs=1, ignore_eos=True) for n in (3, 9, 2, 6)]
        engine.batch_wait_s = 0.2  # all four in one prefill
        results = _run(engine, [Request(p, sp, None, adapter="a") for p, sp in zip(prompts, params)])
    finally:
        engine.stop()
    assert moves and any(v > 0 for v in views)
    model.set_adapter("a")
    for prompt, evs, sp in zip(prompts, results, params):
        toks = [e for e in evs if e.kind == "token"]
        assert len(toks) == sp.max_new_tokens
        ref = _reference_logprobs(model, prompt + [e.token for e in toks])
        for j, e in enumerate(toks):
            assert abs(e.logprob - ref[len(prompt) - 1 + j, e.token].item()) < 1e-4


def test_padding_rows_never_touch_another_adapters_slots(loaded):
    """Three rows of one adapter in slots 0-2 and a base row in slot 3: the adapter's batch is padded to 4, and
    its padding row must not write into slot 3, which the base row is using."""
    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=4, max_model_len=256, pad_batches=True)
    engine.batch_wait_s = 0.2  # all four in one prefill, in submission order
    engine.start()
    try:
        texts = ("你好", "我最近睡不好，怎么办？", "今天心情不太好", "谢谢你")
        prompts = [encode_chat(tok, [{"role": "user", "content": c}]) for c in texts]
        adapters = ["a", "a", "a", BASE]
        sp = SamplingParams(max_new_tokens=5, logprobs=1, ignore_eos=True)
        results = _run(engine, [Request(p, sp, None, adapter=a) for p, a in zip(prompts, adapters)])
    finally:
        engine.stop()
    for prompt, adapter_name, evs in zip(prompts, adapters, results):
        toks = [e for e in evs if e.kind == "token"]
        ids = prompt + [e.token for e in toks]
        if adapter_name is BASE:
            with model.disable_adapter():
                ref = _reference_logprobs(model, ids)
        else:
            model.base_model.enable_adapter_layers()  # the engine leaves them off after its last base step
            model.set_adapter(adapter_name)
            ref = _reference_logprobs(model, ids)
        for j, e in enumerate(toks):
            assert abs(e.logprob - ref[len(prompt) - 1 + j, e.token].item()) < 1e-4


def test_next_step_is_queued_before_the_last_one_is_reported(loaded):
    """Asynchronous scheduling: each decode step is queued before the previous step's tokens are read back.
    A row that stops on a token is already in the next step: that token is dropped, the row's slot goes to
    the last row (moved with what the queued step wrote), and every reported token keeps its exact logprob."""
    model, tok, names = loaded
    prompts = [
        encode_chat(tok, [{"role": "user", "content": c}]) for c in ("你好", "我最近睡不好，怎么办？", "谢谢")
    ]
    # Seeded sampling: the same tokens in both runs, and varied ones (greedy decoding of the tiny model
    # repeats one token, which would hide a row reading another row's token).
    sps = [
        SamplingParams(max_new_tokens=8, logprobs=1, ignore_eos=True, temperature=1.0, seed=s)
        for s in (1, 2, 3)
    ]
    engine = Engine(model, tok, names, max_batch_size=4, max_model_len=256, batch_wait_s=0.2).start()
    try:
        free_run = _run(engine, [Request(p, sp, None, adapter="a") for p, sp in zip(prompts, sps)])
    finally:
        engine.stop()
    first = [[e.token for e in evs if e.kind == "token"] for evs in free_run]
    assert len({t for row in first for t in row}) > 3  # varied tokens: a wrong input token would show
    engine = Engine(model, tok, names, max_batch_size=4, max_model_len=256, batch_wait_s=0.2)
    engine.eos_ids = {first[0][2]}  # row 0 stops on its 3rd token (seeded: the same tokens again)
    order = []
    decode, resolve = engine._decode, engine._resolve

    def spy_decode(*a):
        step = decode(*a)
        order.append(("queue", step))  # the object: an id could be reused
        return step

    def spy_resolve(step):
        order.append(("report", step))
        return resolve(step)

    engine._decode, engine._resolve = spy_decode, spy_resolve
    engine.start()
    try:
        stop_sp = SamplingParams(max_new_tokens=8, logprobs=1, temperature=1.0, seed=1)
        reqs = [Request(prompts[0], stop_sp, None, adapter="a")]
        reqs += [Request(p, sp, None, adapter="a") for p, sp in zip(prompts[1:], sps[1:])]
        results = _run(engine, reqs)
    finally:
        engine.stop()
    queued = [x for kind, x in order if kind == "queue"]
    reported = [x for kind, x in order if kind == "report"]
    # step k+1 is queued before step k is reported, at every step
    at = {(kind, id(x)): i for i, (kind, x) in enumerate(order)}
    assert all(at["queue", id(queued[k + 1])] < at["report", id(queued[k])] for k in range(len(queued) - 1))
    assert {id(x) for x in queued} <= {id(x) for x in reported}
    stopped = [e for e in results[0] if e.kind == "token"]
    assert [e.token for e in stopped] == first[0][: first[0].index(first[0][2]) + 1]
    assert stopped[-1].is_stop and results[0][-1].finish_reason == "stop"
    model.set_adapter("a")
    for prompt, evs, want in zip(prompts[1:], results[1:], first[1:]):
        toks = [e for e in evs if e.kind == "token"]
        assert [e.token for e in toks] == want
        ref = _reference_logprobs(model, prompt + want)
        for j, e in enumerate(toks):
            assert abs(e.logprob - ref[len(prompt) - 1 + j, e.token].item()) < 1e-4
    assert engine.load() == 0 and sorted(engine.free) == [0, 1, 2, 3]


def test_a_burst_of_requests_is_prefilled_as_one_batch(loaded):
    """Requests arriving a few ms apart, for longer than the first wait: the idle engine keeps waiting while
    they come, and prefills them together."""
    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=8, max_model_len=128, batch_wait_s=0.02).start()
    try:
        prompt = encode_chat(tok, [{"role": "user", "content": "你好"}])
        qs = []
        for _ in range(8):
            q: queue.Queue = queue.Queue()
            engine.submit(Request(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True), q.put))
            qs.append(q)
            time.sleep(0.005)  # 8 arrivals over 40 ms: twice the first wait
        for q in qs:
            while q.get(timeout=60).kind != "done":
                pass
    finally:
        engine.stop()
    assert engine.stats["prefill_batches"] == 1


def test_engine_cancel_and_limits(loaded):
    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=2, max_model_len=64).start()
    try:
        prompt = encode_chat(tok, [{"role": "user", "content": "你好"}])
        # the context bounds the reply
        (evs,) = _run(engine, [Request(prompt, SamplingParams(max_new_tokens=1000, ignore_eos=True), None)])
        assert evs[-1].finish_reason == "length"
        assert len(prompt) + sum(e.kind == "token" for e in evs) <= 64
        # a cancelled request stops and frees its slot
        q: queue.Queue = queue.Queue()
        r = Request(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True), q.put)
        engine.submit(r)
        assert q.get(timeout=30).kind == "token"
        engine.cancel(r)
        evs = []
        while not evs or evs[-1].kind != "done":
            evs.append(q.get(timeout=30))
        assert evs[-1].finish_reason == "cancelled"
        assert engine.load() == 0 and len(engine.free) == 2
        with pytest.raises(Exception, match="context"):
            engine.submit(Request(list(range(64)), SamplingParams(), None))
    finally:
        engine.stop()


def test_a_poisoned_row_fails_alone_and_its_batch_finishes_as_without_it(loaded, monkeypatch):
    """One batch with clean rows (greedy, seeded, penalized) and poisoned ones: values that once failed the whole
    batch (temperature 1e-300, top_k 10**20, seed 10**30: now computed safely), values refused at submit (a NaN
    temperature, a token id outside the vocabulary: nothing queued), and failures of one row's own state, its
    prompt's forward, its prompt logprobs or its consumer. Each poisoned row ends alone, every slot comes
    back, and the clean rows' tokens equal those of a run without the poisoned rows."""
    from mhsft.serve import engine as engine_module
    from mhsft.utils import UserError

    model, tok, names = loaded
    texts = ("你好", "我最近睡不好，怎么办？", "谢谢")
    prompts = [encode_chat(tok, [{"role": "user", "content": c}]) for c in texts]
    clean = [
        SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=1),
        SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=5),
        SamplingParams(
            max_new_tokens=8,
            ignore_eos=True,
            temperature=0.8,
            seed=9,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            logit_bias={3: 2.0},
        ),  # fmt: skip
    ]
    MARK = 7  # a prompt starting with this token breaks the forward of any batch it is in (below)
    real_create, real_forward, real_plp = RowState.create, Engine._prefill_forward, Engine._prompt_logprobs

    def create(params, *a):
        if params.seed == 666:
            raise RuntimeError("this row's state cannot be built")
        return real_create(params, *a)

    def forward(self, adapter, reqs):
        if any(r.prompt_ids[0] == MARK for r in reqs):
            raise RuntimeError("this prompt breaks the forward")
        return real_forward(self, adapter, reqs)

    def prompt_logprobs(self, hidden, req):
        if req.params.prompt_logprobs == 3:
            raise RuntimeError("this row's prompt logprobs fail")
        return real_plp(self, hidden, req)

    monkeypatch.setattr(engine_module.RowState, "create", staticmethod(create))
    monkeypatch.setattr(Engine, "_prefill_forward", forward)
    monkeypatch.setattr(Engine, "_prompt_logprobs", prompt_logprobs)

    def broken_consumer(ev):
        if ev.kind == "token":
            raise RuntimeError("the consumer is gone")

    def run(poisoned: bool):
        engine = Engine(model, tok, names, max_batch_size=8, max_model_len=256, batch_wait_s=0.3).start()
        try:
            reqs = [Request(p, sp, None, adapter="a") for p, sp in zip(prompts, clean)]
            bad = []
            if poisoned:
                p = prompts[0]
                extreme = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1e-300, top_k=10**20,
                                         seed=10**30)  # fmt: skip
                bad = [
                    Request(p, extreme, None, adapter="a"),
                    Request(
                        p, SamplingParams(max_new_tokens=8, temperature=1.0, seed=666), None, adapter="a"
                    ),
                    Request([MARK] + p, SamplingParams(max_new_tokens=8), None, adapter="a"),
                    Request(p, SamplingParams(max_new_tokens=8, prompt_logprobs=3), None, adapter="a"),
                ]
                for refused in (
                    Request(p, SamplingParams(temperature=float("nan")), None, adapter="a"),
                    Request(p[:-1] + [10**6], SamplingParams(), None, adapter="a"),
                ):
                    with pytest.raises(UserError):
                        engine.submit(refused)
                assert engine.load() == 0
                consumer = Request(p, SamplingParams(max_new_tokens=50, ignore_eos=True), broken_consumer)
                engine.submit(consumer)
            # interleaved, so that poisoned and clean rows share the prefill and the decode steps
            order = [r for pair in zip(reqs, bad + [None] * len(reqs)) for r in pair if r is not None] + bad[
                3:
            ]
            results = dict(zip(map(id, order), _run(engine, order)))
            deadline = time.monotonic() + 30
            while engine.load() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.load() == 0 and sorted(engine.free) == list(range(8))
        finally:
            engine.stop()
        return [results[id(r)] for r in reqs], [results[id(r)] for r in bad]

    want, _ = run(poisoned=False)
    got, bad = run(poisoned=True)
    tokens = [[e.token for e in evs if e.kind == "token"] for evs in want]
    assert all(len(t) == 8 for t in tokens)
    assert [[e.token for e in evs if e.kind == "token"] for evs in got] == tokens
    lps = [[e.logprob for e in evs if e.kind == "token"] for evs in (want[0], got[0])]
    assert all(abs(x - y) < 1e-5 for x, y in zip(*lps))
    extreme, no_state, no_forward, no_logprobs = bad
    assert extreme[-1].kind == "done" and sum(e.kind == "token" for e in extreme) == 8
    for evs in (no_state, no_forward, no_logprobs):
        assert [e.kind for e in evs] == ["error"] and evs[0].message.startswith("generation failed")
