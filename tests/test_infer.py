"""Generation: the engine (against a plain forward pass), sampling, streaming text, and `mhsft infer`."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mhsft.detok import TextStream
from mhsft.engine import BASE, Engine, Request, encode_chat
from mhsft.sampling import RowState, SamplingParams, sample

REPO = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("MHSFT_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from mhsft.cli import main

    out = tmp_path_factory.mktemp("sft")
    rc = main(
        ["sft", "--model", "builtin:tiny", "--dataset", str(REPO / "examples/data/demo_sharegpt.jsonl"),
         "--max_steps", "2", "--output_dir", str(out), "--report_to", "none", "--max_length", "256",
         "--learning_rate", "1e-2"]
    )  # fmt: skip
    assert rc == 0
    return next(out.glob("v*/checkpoint-2"))


@pytest.fixture(scope="module")
def loaded(adapter):
    from mhsft.model import load_for_inference

    # MHSFT_TEST_DEVICE=cuda runs the engine tests on a GPU: CUDA graphs, pinned copies and events included
    return load_for_inference(None, [f"a={adapter}"], device=DEVICE)


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


def test_text_stream_never_splits_a_character(tiny_model_dir):
    from mhsft.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    text = "你好龘靐，世界"  # rare characters: not in the tiny BPE, so each is split into byte tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the test needs a character split across tokens"
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_window_stays_short_when_tokens_make_no_text(tiny_model_dir):
    from mhsft.detok import MAX_PENDING
    from mhsft.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    silent = tok.convert_tokens_to_ids("<|im_end|>")  # a special token: decodes to nothing
    stream = TextStream(tok)
    out = "".join(stream.push(i) for i in tok("你好", add_special_tokens=False)["input_ids"])
    for _ in range(200):
        out += stream.push(silent)
        assert len(stream.ids) - stream.prefix <= 2 * MAX_PENDING + 2
    out += "".join(stream.push(i) for i in tok("，世界", add_special_tokens=False)["input_ids"])
    assert out + stream.flush() == "你好，世界"


def test_text_stream_stop_strings(tiny_model_dir):
    from mhsft.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    ids = tok("我很好。来访者：还有", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=["来访者："])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "来" not in shown  # the start of the stop string is never shown
        if stream.stopped:
            break
    shown += stream.flush()
    assert stream.stopped and shown == "我很好。" and stream.text == "我很好。"
    # text that only looks like the start of a stop string is released at the end
    stream = TextStream(tok, stop=["来访者：你"])
    out = "".join(stream.push(i) for i in tok("好的来访者", add_special_tokens=False)["input_ids"])
    assert out + stream.flush() == "好的来访者" and not stream.stopped


def _env() -> dict:
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}
    env.pop("PYTHONUTF8", None)
    return env


def test_interactive_chat_under_lang_c(adapter):
    """Commands and Chinese text through a pipe under LANG=C; --model comes from the checkpoint."""
    script = "你好，我最近压力很大\nmulti-line\n第一行\n第二行#\nsingle-line#\nreset-system\n你是一位心理咨询师\nclear\n谢谢\nexit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "mhsft", "infer", "--adapters", str(adapter), "--max_new_tokens", "6",
         "--stream", "true", "--max_model_len", "512"],
        input=script.encode("utf-8"), capture_output=True, env=_env(), timeout=120,
    )  # fmt: skip
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out.count(">>> ") == 3  # three questions answered, commands are not sent to the model
    assert "(multi-line input" in out and "(system prompt set" in out and "(conversation cleared)" in out
    assert "<<<[M] " in out


def test_batch_inference_file_and_stdin(adapter, tmp_path):
    data = tmp_path / "in.jsonl"
    rows = [
        {"id": 1, "messages": [{"role": "user", "content": "你好"}]},
        {"conversations": [{"from": "human", "value": "失眠怎么办"}, {"from": "gpt", "value": "参考回答"}]},
        {"query": "考试焦虑", "history": [["在吗", "在的"]], "system": "你是咨询师"},
        {"messages": [{"role": "assistant", "content": "只有回答"}]},
    ]
    data.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\nnot json\n", encoding="utf-8"
    )
    out = tmp_path / "out.jsonl"
    from mhsft.cli import main

    rc = main(["infer", "--adapters", str(adapter), "--infer_data", str(data), "--result_path", str(out),
               "--max_new_tokens", "5", "--max_batch_size", "2"])  # fmt: skip
    assert rc == 0
    res = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(res) == 3
    assert res[0]["id"] == "1" and res[0]["messages"][-1] == {
        "role": "assistant",
        "content": res[0]["response"],
    }
    assert res[1]["labels"] == "参考回答" and [m["role"] for m in res[1]["messages"]] == ["user", "assistant"]
    assert [m["role"] for m in res[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    # stdin in, JSONL out on stdout; greedy, so the same replies
    proc = subprocess.run(
        [sys.executable, "-m", "mhsft", "infer", "--adapters", str(adapter), "--infer_data", "-",
         "--max_new_tokens", "5"],
        input=data.read_bytes(), capture_output=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    again = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert [r["response"] for r in again] == [r["response"] for r in res]
    assert "not json" not in proc.stdout.decode() and "invalid JSON" in proc.stderr.decode()


def test_infer_errors_are_one_line(tmp_path, monkeypatch):
    from mhsft.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["infer", "--infer_backend", "vllm", "--model", "builtin:tiny"]) == 2
    assert main(["infer"]) == 2  # no model, no adapter
    assert main(["infer", "--model", "builtin:tiny", "--infer_data", str(tmp_path / "missing.jsonl")]) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written for a run that could not start


@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa_with_repeated_kv_heads(masked):
    from transformers.integrations.sdpa_attention import repeat_kv

    from mhsft.kernels import decode_attention_forward

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
