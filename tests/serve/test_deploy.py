"""`mhsft deploy`: the real server process on the tiny model with two adapters, driven by the real `openai`
client and by raw HTTP; lm-eval's local-completions against it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO
from mhsft.client import (
    DeployProcess,
    ensure_loopback_no_proxy,
    get_json,
    openai_client,
)

KEY = "test-key-1234"
MAX_LEN = 512


def _sft(out: Path, lr: str, seed: str) -> Path:
    from mhsft.cli import main

    rc = main(
        ["sft", "--model", "builtin:tiny", "--dataset", str(REPO / "examples/data/demo_sharegpt.jsonl"),
         "--max_steps", "2", "--output_dir", str(out), "--report_to", "none", "--max_length", "256",
         "--learning_rate", lr, "--seed", seed]
    )  # fmt: skip
    assert rc == 0
    return next(out.glob("v*/checkpoint-2"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    a, b = _sft(tmp / "a", "1e-2", "1"), _sft(tmp / "b", "5e-2", "2")
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    argv = ["--adapters", f"a={a}", f"b={b}", "--served_model_name", "tiny-base", "--api_key", KEY,
            "--max_model_len", str(MAX_LEN), "--max_batch_size", "4"]  # fmt: skip
    with DeployProcess(argv, tmp / "server.log", env=env, timeout=120) as srv:
        yield {"url": srv.url, "a": a, "b": b, "proc": srv.proc, "log": tmp / "server.log"}
    text = (tmp / "server.log").read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in text and "internal error" not in text and "generation failed" not in text
    assert "completion_tokens=" in text and "压力很大" not in text  # counts are logged, conversations are not


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server["url"] + "/v1", api_key=KEY, timeout=60)


def _raw(server, method: str, path: str, body=None, headers=None, key: str | None = KEY):
    """(status, parsed JSON or raw text) over a plain socket (no proxy, full control of the bytes sent)."""
    port = int(server["url"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    text = r.read().decode("utf-8")
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


CHAT = [{"role": "user", "content": "你好，我最近压力很大"}]


def test_health_and_models(server, client):
    status, body = get_json(server["url"] + "/health")  # no key needed
    assert status == 200 and body["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny-base", "a", "b"]
    status, _ = _raw(server, "GET", "/v1/models", key=None)
    assert status == 401


def test_chat_and_adapters_by_name(client):
    replies = {}
    for name in ("tiny-base", "a", "b"):
        r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0)
        assert r.model == name and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("length", "stop")
        assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        replies[name] = r.choices[0].message.content
    assert len(set(replies.values())) == 3, replies
    again = client.chat.completions.create(model="a", messages=CHAT, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == replies["a"]  # greedy is deterministic


def test_streaming_matches_the_whole_reply(server, client):
    kw = dict(model="a", messages=CHAT, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens >= 1
    status, raw = _raw(server, "POST", "/v1/chat/completions", {**kw, "stream": True})
    assert status == 200 and raw.rstrip().endswith("data: [DONE]")
    assert raw.count("data: ") >= 3


def test_stream_interval_sends_that_many_tokens_a_chunk(tmp_path):
    argv = ["--model", "builtin:tiny", "--stream_interval", "4", "--max_batch_size", "2"]
    with DeployProcess(argv, tmp_path / "server.log", timeout=120) as srv:
        c = openai_client(srv.v1, timeout=60)
        kw = dict(model="tiny", prompt="你好", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        whole = c.completions.create(**kw).choices[0].text
        chunks = list(c.completions.create(stream=True, logprobs=0, **kw))
    per_chunk = [len(ch.choices[0].logprobs.tokens) for ch in chunks if ch.choices[0].logprobs]
    assert per_chunk == [4, 4, 2]
    assert "".join(ch.choices[0].text for ch in chunks) == whole


def test_stop_strings(client):
    kw = dict(model="a", messages=CHAT, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    assert len(whole) >= 3
    stop = whole[1:3]
    want = whole[: whole.index(stop)]
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="b", messages=CHAT, max_tokens=10, temperature=1.0, seed=11)
    one = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == one
    r = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1]


def _local_logprobs(server, adapter: str, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel

    from mhsft.model import load_model

    model = PeftModel.from_pretrained(
        load_model("builtin:tiny", dtype="float32"), str(server[adapter])
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_completions_echo_logprobs_as_lm_eval_sends_them(server):
    """lm-eval 0.4's loglikelihood request: token-id prompts, max_tokens 1, logprobs 1, echo. The prompt comes
    back with every token's logprob (None first) plus exactly one generated token; the values equal a local
    forward pass with the same adapter."""
    from mhsft.model import load_tokenizer

    tok = load_tokenizer(str(server["a"]))
    texts = ["问题：哪一种回应体现了共情？\n答案： 听起来你真的很辛苦", "来访者：我睡不着"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    body = {
        "model": "a",
        "prompt": prompts,
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "temperature": 0,
        "seed": 1234,
    }
    status, out = _raw(server, "POST", "/v1/completions", body)
    assert status == 200, out
    for ids, choice in zip(prompts, sorted(out["choices"], key=lambda c: c["index"])):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and all(
            isinstance(t, dict) and len(t) == 1 for t in lp["top_logprobs"][1:]
        )
        ref = _local_logprobs(server, "a", ids)
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - ref[i - 1, ids[i]].item()) < 1e-4
        # the generated token is the greedy one, and lm-eval's is_greedy test holds for it
        assert abs(lp["token_logprobs"][-1] - ref[-1].max().item()) < 1e-4
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
        assert choice["text"].startswith(tok.decode(ids))
    # text prompts (tokenized_requests=False) score the same tokens
    status, out2 = _raw(server, "POST", "/v1/completions", {**body, "prompt": texts})
    assert status == 200
    assert (
        out2["choices"][0]["logprobs"]["token_logprobs"][:-1]
        == out["choices"][0]["logprobs"]["token_logprobs"][:-1]
    )
    # echo with max_tokens 0 scores the prompt alone
    status, out3 = _raw(server, "POST", "/v1/completions", {**body, "prompt": prompts[1], "max_tokens": 0})
    assert status == 200 and len(out3["choices"][0]["logprobs"]["tokens"]) == len(prompts[1])


def test_completions_text_and_stream(client):
    r = client.completions.create(
        model="tiny-base", prompt="来访者：你好\n咨询师：", max_tokens=6, temperature=0
    )
    assert r.object == "text_completion" and r.usage.completion_tokens <= 6
    chunks = list(
        client.completions.create(
            model="tiny-base", prompt="来访者：你好\n咨询师：", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_hostile_inputs_get_their_4xx_and_the_server_keeps_serving(server, client):
    ok = {"model": "a", "messages": CHAT, "max_tokens": 2}
    cases = [
        ("malformed JSON", b'{"model": "a", "messages": [', KEY, 400),
        ("invalid UTF-8", b'{"model": "\xff\xfe"}', KEY, 400),
        ("not an object", json.dumps([1, 2]).encode(), KEY, 400),
        ("messages of the wrong type", {"model": "a", "messages": "hi"}, KEY, 400),
        ("max_tokens of the wrong type", {**ok, "max_tokens": "many"}, KEY, 400),
        ("negative temperature", {**ok, "temperature": -1}, KEY, 400),
        ("unknown role", {"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, KEY, 400),
        ("empty messages", {"model": "a", "messages": []}, KEY, 400),
        ("huge max_tokens", {**ok, "max_tokens": 10**12}, KEY, 400),
        (
            "prompt longer than the context",
            {**ok, "messages": [{"role": "user", "content": "好" * 3000}]},
            KEY,
            400,
        ),
        ("unknown model", {**ok, "model": "gpt-5"}, KEY, 404),
        ("missing key", ok, None, 401),
        ("wrong key", ok, "wrong-key-000", 401),
        ("10 MB body", b'{"model": "a", "pad": "' + b"x" * (10 << 20) + b'"}', KEY, 413),
        ("stream as a string", {**ok, "stream": "yes"}, KEY, 400),
        ("n as a string", {**ok, "n": "2"}, KEY, 400),
        ("seed past int64", {**ok, "temperature": 1, "seed": 10**30}, KEY, 400),
        ("seed 2**64", {**ok, "temperature": 1, "seed": 2**64}, KEY, 400),
        ("NaN temperature", b'{"model": "a", "messages": [], "temperature": NaN}', KEY, 400),
        ("deep JSON", b'{"model": "a", "x": ' + b"[" * 200 + b"]" * 200 + b"}", KEY, 400),
        ("lone surrogate", b'{"model": "a", "messages": [{"role": "user", "content": "\\ud83d"}]}', KEY, 400),
        ("surrogate in a stop", {**ok, "stop": ["\ud83d"]}, KEY, 400),
        ("too many stops", {**ok, "stop": ["x"] * 17}, KEY, 400),
        ("logit_bias past the vocabulary", {**ok, "logit_bias": {str(10**6): 1}}, KEY, 400),
        ("logit_bias too large", {**ok, "logit_bias": {"5": 101}}, KEY, 400),
        ("top_logprobs 21", {**ok, "logprobs": True, "top_logprobs": 21}, KEY, 400),
    ]
    for what, body, key, want in cases:
        status, out = _raw(server, "POST", "/v1/chat/completions", body, key=key)
        assert status == want, (what, status, out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], what
    for what, body, want in [
        ("token id out of range", {"model": "a", "prompt": [[10**9]], "max_tokens": 1}, 400),
        ("empty prompt", {"model": "a", "prompt": "", "max_tokens": 1}, 400),
        ("prompt of the wrong type", {"model": "a", "prompt": {"x": 1}}, 400),
        ("token-id prompt longer than the context", {"model": "a", "prompt": [1] * (MAX_LEN + 5)}, 400),
        ("lone surrogate", {"model": "a", "prompt": "\ud83d", "max_tokens": 1}, 400),
        ("surrogate in a list", {"model": "a", "prompt": ["ok", "\udc00"], "max_tokens": 1}, 400),
        ("a float token id", {"model": "a", "prompt": [1.0], "max_tokens": 1}, 400),
    ]:
        status, out = _raw(server, "POST", "/v1/completions", body)
        assert status == want and "error" in out, (what, status, out)
    for path, body in [
        ("/tokenize", {"prompt": "\ud83d"}),
        ("/tokenize", {"messages": [{"role": "user", "content": "\udfff"}]}),
        ("/tokenize", {"prompt": 5}),
        ("/detokenize", {"tokens": [10**9]}),
        ("/detokenize", {"tokens": ["1"]}),
        ("/detokenize", {"tokens": [1], "model": "\ud83d"}),
    ]:
        status, out = _raw(server, "POST", path, body)
        assert status == 400 and set(out["error"]) == {"message", "type", "param", "code"}, (path, body, out)
    status, out = _raw(server, "GET", "/v1/models/%ED%A0%BD")  # a surrogate's UTF-8 bytes in the path
    assert status == 404 and "error" in out
    status, out = _raw(server, "GET", "/v1/no-such-route")
    assert status == 404 and "error" in out
    assert get_json(server["url"] + "/health")[0] == 200
    assert client.chat.completions.create(**ok).choices[0].message.content is not None
    assert server["proc"].poll() is None


def test_client_that_leaves_mid_stream_frees_its_slot(server):
    before = get_json(server["url"] + "/health")[1]["cancelled"]
    port = int(server["url"].rsplit(":", 1)[1])
    body = {"model": "a", "messages": CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(6) == b"data: "
    t0 = time.monotonic()
    health = get_json(server["url"] + "/health")  # answered while it generates
    assert health[0] == 200 and time.monotonic() - t0 < 2
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        h = get_json(server["url"] + "/health")[1]
        if h["cancelled"] > before and h["in_flight"] == 0:
            break
        time.sleep(0.05)
    assert h["cancelled"] > before and h["in_flight"] == 0


def test_requests_sent_together_are_batched(server):
    results, errors = [], []

    def one(i):
        try:
            c = openai_client(server["url"] + "/v1", api_key=KEY)
            msgs = [{"role": "user", "content": f"第{i}个问题"}]
            r = c.chat.completions.create(model="ab"[i % 2], messages=msgs, max_tokens=30, temperature=0)
            results.append(r.usage.completion_tokens)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 6
    assert get_json(server["url"] + "/health")[1]["max_running"] >= 2


def test_tokenizer_endpoints(server):
    status, info = _raw(server, "GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|im_end|>"
    status, out = _raw(server, "POST", "/tokenize", {"prompt": "你好世界"})
    assert status == 200 and out["count"] == len(out["tokens"])
    status, back = _raw(server, "POST", "/detokenize", {"tokens": out["tokens"]})
    assert back["prompt"] == "你好世界"


def _lm_eval_exe() -> str | None:
    import importlib.util

    exe = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    return exe if Path(exe).exists() and importlib.util.find_spec("tenacity") else None


@pytest.mark.skipif(
    _lm_eval_exe() is None, reason="lm-eval is not installed (pip install 'lm-eval[api]==0.4.*')"
)
def test_lm_eval_local_completions_multiple_choice(server, tmp_path):
    """lm-eval's own local-completions model scores a multiple-choice task through the server (it finds the
    server's /tokenize endpoints, so no local tokenizer); its loglikelihoods equal a local forward pass."""
    from mhsft.model import load_tokenizer

    docs = [
        {
            "question": "来访者说最近总是失眠，咨询师首先应该怎么做？",
            "choices": ["倾听并了解情况", "立刻开药"],
            "answer": 0,
        },
        {"question": "哪一种回应体现了共情？", "choices": ["你想太多了", "听起来你真的很辛苦"], "answer": 1},
    ]
    (tmp_path / "mcq.jsonl").write_text(
        "\n".join(json.dumps(d, ensure_ascii=False) for d in docs), encoding="utf-8"
    )
    (tmp_path / "mhsft_mcq.yaml").write_text(
        "task: mhsft_mcq\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mcq.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "问题：{{question}}\\n答案："\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    ensure_loopback_no_proxy(env)
    exe = _lm_eval_exe()
    args = f"base_url={server['url']}/v1/completions,model=a,auth_token={KEY},tokenized_requests=True"
    proc = subprocess.run(
        [exe, "--model", "local-completions", "--model_args", args, "--tasks", "mhsft_mcq",
         "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = list((tmp_path / "out").rglob("samples_mhsft_mcq_*.jsonl"))
    tok = load_tokenizer(str(server["a"]))
    for line in samples.read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        for k, (ll, _greedy) in enumerate(s["filtered_resps"]):
            ctx, cont = s["arguments"][f"gen_args_{k}"]["arg_0"], s["arguments"][f"gen_args_{k}"]["arg_1"]
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
            ref = _local_logprobs(server, "a", whole)
            want = sum(ref[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
            assert abs(float(ll) - want) < 1e-3


def test_poisoned_neighbours_fail_alone_over_http(server):
    """Chats decoded beside hostile requests (a seed past int64, a NaN, a lone surrogate: 400s; a temperature of
    1e-300 and a top_k of 10**20: answered, as greedy and as the whole vocabulary) get exactly the reply each
    gets alone, and nothing is left in flight."""
    clean = [{"model": "a", "messages": [{"role": "user", "content": f"第{i}个问题"}], "max_tokens": 12,
              "temperature": 0, "ignore_eos": True} for i in range(3)]  # fmt: skip
    alone = [
        _raw(server, "POST", "/v1/chat/completions", b)[1]["choices"][0]["message"]["content"] for b in clean
    ]
    ok = clean[0]
    poison = [
        ({**ok, "temperature": 1, "seed": 10**30}, 400),
        ({**ok, "temperature": 1e-300}, 200),
        ({**ok, "temperature": 1, "top_k": 10**20, "seed": 3}, 200),
        (b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400),
        ({**ok, "messages": [{"role": "user", "content": "\ud83d"}]}, 400),
        ({**ok, "logit_bias": {"5": 1e9}}, 400),
    ]
    results: dict = {}

    def send(key, body):
        results[key] = _raw(server, "POST", "/v1/chat/completions", body)

    threads = [threading.Thread(target=send, args=(("clean", i), b)) for i, b in enumerate(clean)]
    threads += [threading.Thread(target=send, args=(("poison", i), b)) for i, (b, _) in enumerate(poison)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, want in enumerate(alone):
        status, out = results["clean", i]
        assert status == 200 and out["choices"][0]["message"]["content"] == want
    for i, (_, status) in enumerate(poison):
        got, out = results["poison", i]
        assert got == status, (i, out)
        assert ("error" in out) == (status != 200)
    deadline = time.monotonic() + 10
    while get_json(server["url"] + "/health")[1]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert get_json(server["url"] + "/health")[1]["in_flight"] == 0


def test_streamed_logprobs_carry_a_partial_characters_own_bytes(server, client):
    """A token holding one byte of a character (forced here with logit_bias) reports that byte, not the three
    bytes of the U+FFFD that decoding it alone gives."""
    from mhsft.model import load_tokenizer

    tok = load_tokenizer(str(server["a"]))
    (first, *_) = tok("龘", add_special_tokens=False)["input_ids"]  # a rare character: one token per byte
    assert tok.decode([first]) == "\ufffd"
    chunks = list(client.chat.completions.create(
        model="a", messages=CHAT, max_tokens=3, stream=True, logprobs=True, top_logprobs=2,
        logit_bias={str(first): 100}))  # fmt: skip
    entries = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == 3
    for e in entries:
        assert e.bytes == list("龘".encode()[:1]) and e.bytes != list("\ufffd".encode())
        assert all(t.bytes is not None for t in e.top_logprobs)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One slot and no queue: a second generation is refused with 429."""
    tmp = tmp_path_factory.mktemp("small")
    argv = ["--model", "builtin:tiny", "--max_batch_size", "1", "--max_queue", "0", "--max_model_len", "512"]
    with DeployProcess(argv, tmp / "server.log", timeout=120) as srv:
        yield {"url": srv.url, "log": tmp / "server.log"}
    text = (tmp / "server.log").read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in text and "internal error" not in text


def test_a_full_queue_answers_429_with_retry_after(small_server):
    port = int(small_server["url"].rsplit(":", 1)[1])
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(6) == b"data: "
    try:
        c2 = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c2.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": False, "max_tokens": 2}),
                   {"Content-Type": "application/json"})  # fmt: skip
        r2 = c2.getresponse()
        out = json.loads(r2.read())
        assert (
            r2.status == 429 and r2.getheader("Retry-After") == "1" and out["error"]["code"] == "server_busy"
        )
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    deadline = time.monotonic() + 15
    while get_json(small_server["url"] + "/health")[1]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
    assert _raw({"url": small_server["url"]}, "POST", "/v1/chat/completions", ok, key=None)[0] == 200


def test_a_large_body_delays_only_itself(small_server):
    """A 3 MB /tokenize (one 3 MB word: ~3 s of tokenizing) runs off the event loop: GET /v1/models stays fast
    meanwhile (on the loop, it waited for the whole tokenization)."""
    prompt = "x" * 3_000_000
    result = {}
    t = threading.Thread(target=lambda: result.update(r=_raw({"url": small_server["url"]}, "POST", "/tokenize",
                                                             {"prompt": prompt}, key=None)))  # fmt: skip
    t.start()
    worst = 0.0
    while t.is_alive():
        t0 = time.monotonic()
        assert get_json(small_server["url"] + "/v1/models")[0] == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    status, out = result["r"]
    assert status == 200 and out["count"] == 3_000_000
    assert worst < 1.0, worst


def test_an_unexpected_exception_in_deploy_is_a_500_and_one_line(loaded, monkeypatch):
    """deploy's app in this process (uvicorn on a thread, the real engine) with an endpoint's helper made to
    raise: the client gets a 500 in OpenAI's shape naming a request id, the log one line with that id, and no
    traceback; the next request is served."""
    import logging

    import uvicorn

    from mhsft.client import free_port
    from mhsft.serve.deploy import DeployArguments, Server, build_app
    from mhsft.serve.engine import BASE, Engine
    from mhsft.utils import get_logger

    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=2, max_model_len=256).start()
    server = Server(engine, {"tiny": BASE}, DeployArguments(model="builtin:tiny"))
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage() + ("\nTraceback" if r.exc_info else ""))
    get_logger()
    for name in ("mhsft", "uvicorn.error"):
        logging.getLogger(name).addHandler(handler)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.02)
        url = {"url": f"http://127.0.0.1:{port}"}
        real = server.encode_messages
        monkeypatch.setattr(server, "encode_messages", lambda m: 1 / 0)
        status, out = _raw(url, "POST", "/v1/chat/completions", {"model": "tiny", "messages": CHAT}, key=None)
        err = out["error"]
        assert status == 500 and err["type"] == "server_error" and "request id req-" in err["message"]
        rid = err["message"].split("request id ")[1].rstrip(")")
        assert [x for x in lines if rid in x] == [
            f"internal error {rid} on POST /v1/chat/completions: ZeroDivisionError: division by zero"
        ]
        monkeypatch.setattr(server, "encode_messages", real)
        ok = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
        assert _raw(url, "POST", "/v1/chat/completions", ok, key=None)[0] == 200
        assert not any("Traceback" in x for x in lines)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        engine.stop()
        for name in ("mhsft", "uvicorn.error"):
            logging.getLogger(name).removeHandler(handler)
