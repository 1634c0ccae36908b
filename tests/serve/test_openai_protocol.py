"""mhsft/serve/openai_protocol.py: request validation (strict types, ranges, token ids, stop lists, JSON depth, lone
surrogates), errors in OpenAI's shape, API keys, body limits, SSE, and one HTTP request's generation (its engine
requests and their events), without a server or a model."""

from __future__ import annotations

import asyncio
import json

import pytest

from mhsft.serve.engine import Busy, Event
from mhsft.serve.openai_protocol import (
    MAX_JSON_DEPTH,
    ApiError,
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    Job,
    TokenizeBody,
    check_key,
    parse_json,
    read_body,
    sse,
    stops,
    validate,
)
from mhsft.serve.sampling import SamplingParams
from mhsft.utils import UserError


def _error(fn, *a) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*a)
    return e.value


def test_validate_accepts_unknown_fields_and_rejects_wrong_values():
    body = validate(ChatBody, {"model": "m", "messages": [{"role": "user", "content": "你好"}], "user": "x"})
    assert body.messages[0].content == "你好" and body.n == 1 and body.stream is False
    e = _error(validate, ChatBody, {"model": "m", "messages": [{"role": "user"}], "temperature": 3})
    assert e.status == 400 and e.param == "temperature" and e.code == "invalid_value"
    assert _error(validate, ChatBody, {"model": "m", "messages": []}).param == "messages"
    assert _error(validate, ChatBody, {"model": "m", "messages": [{"role": "tool"}]}).status == 400
    assert _error(validate, CompletionBody, ["not", "an", "object"]).code == "invalid_type"
    ok = validate(CompletionBody, {"model": "m", "prompt": [[1, 2], [3]], "logprobs": 5, "echo": True})
    assert ok.prompt == [[1, 2], [3]] and ok.logprobs == 5


CHAT = {"model": "m", "messages": [{"role": "user", "content": "你好"}]}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),  # strict types: no string for a boolean or a number, no float for an integer
        ("stream", 1),
        ("n", "2"),
        ("n", 2.0),
        ("n", 17),
        ("max_tokens", "many"),
        ("max_tokens", -1),
        ("temperature", True),
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_k", -2),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("seed", 10**30),  # past int64: refused (vLLM's rule), never an overflow in the engine
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"100": 1}),  # token id outside the vocabulary of 100
        ("logit_bias", {str(i): 1 for i in range(1025)}),
        ("logprobs", 1),
        ("top_logprobs", 21),
        ("stop", ["s"] * 17),
        ("stop", "x" * 513),
        ("stop", 5),
        ("stream_options", {"include_usage": "yes"}),
        ("model", "m" * 300),
    ],
)
def test_each_chat_field_is_checked(field, value):
    e = _error(validate, ChatBody, {**CHAT, field: value}, 100)
    assert e.status == 400 and e.param.split(".")[0] == field and e.code == "invalid_value", e.message


def test_values_at_the_limits_are_accepted():
    body = validate(ChatBody, {**CHAT, "temperature": 2, "top_p": 1e-300, "top_k": 10**20, "seed": 2**63 - 1,
                               "repetition_penalty": 0.01, "logit_bias": {"99": -100}, "stop": ["s"] * 16,
                               "top_logprobs": 20, "logprobs": True, "n": 16}, 100)  # fmt: skip
    assert body.top_k == 10**20 and body.seed == 2**63 - 1  # the engine clamps top_k to the vocabulary
    assert validate(ChatBody, {**CHAT, "temperature": 1e-300}).temperature == 1e-300  # sampled greedily


@pytest.mark.parametrize(
    "prompt",
    ["", [], [[]], [[1], []], [1, "a"], {"x": 1}, [[1, 100]], [-1], [1.0], [True], ["a"] * 1025],
)
def test_completion_prompts_are_checked(prompt):
    e = _error(validate, CompletionBody, {"model": "m", "prompt": prompt}, 100)
    assert e.status == 400 and e.param == "prompt", e.message


def test_completion_prompt_forms():
    for prompt in ("你好", ["a", "b"], [1, 99], [[1], [2, 3]]):
        assert validate(CompletionBody, {"model": "m", "prompt": prompt}, 100).prompt == prompt


def test_tokenizer_bodies():
    assert validate(TokenizeBody, {"prompt": "你好"}).prompt == "你好"
    assert _error(validate, TokenizeBody, {"prompt": 5}).param == "prompt"
    assert _error(validate, TokenizeBody, {"messages": []}).param == "messages"
    assert validate(DetokenizeBody, {"tokens": [0, 99]}, 100).tokens == [0, 99]
    for tokens in ([100], [-1], ["1"], [1.5]):
        assert _error(validate, DetokenizeBody, {"tokens": tokens}, 100).param.startswith("tokens")


def test_parse_json_refuses_surrogates_depth_and_non_json_numbers():
    assert parse_json('{"消息": "你好 😊"}'.encode()) == {"消息": "你好 😊"}
    assert parse_json(b'{"a": "\\ud83d\\ude0a"}') == {"a": "😊"}  # a surrogate pair is a character
    for raw, param in [
        (b'{"messages": [{"content": "\\ud83d"}]}', "messages.0.content"),
        (b'{"prompt": ["ok", "x\\udc00y"]}', "prompt.1"),
        (b'{"\\ud83d": 1}', "\\ud83d"),  # spelled out: the error's own JSON must stay valid
    ]:
        e = _error(parse_json, raw)
        assert e.status == 400 and e.param == param and "surrogate" in e.message
    nested = b'{"x": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    assert _error(parse_json, nested).code == "invalid_json"
    ok = b'{"x": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert parse_json(ok)["x"]
    for raw in (b'{"t": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}', b'{"x": "\xff"}', b"[" * 5000):
        assert _error(parse_json, raw).code == "invalid_json"


def test_api_error_body_has_openais_shape():
    assert ApiError(404, "no such model", "model", "model_not_found").body() == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                  "code": "model_not_found"}
    }  # fmt: skip
    assert ApiError(503, "busy").body()["error"]["type"] == "server_error"
    assert ApiError(413, "too big").body()["error"]["type"] == "invalid_request_error"


class _Request:
    def __init__(
        self, body: bytes = b"", headers: dict | None = None, chunk: int = 4, gone_after: int | None = None
    ):
        self.headers, self.body, self.chunk, self.gone_after = headers or {}, body, chunk, gone_after

    async def stream(self):
        from starlette.requests import ClientDisconnect

        for n, i in enumerate(range(0, len(self.body), self.chunk)):
            if n == self.gone_after:
                raise ClientDisconnect()
            yield self.body[i : i + self.chunk]


def test_check_key():
    check_key(_Request(), None)  # no key configured: open
    check_key(_Request(headers={"authorization": "bearer sk-1"}), "sk-1")
    assert "Missing" in _error(check_key, _Request(), "sk-1").message
    e = _error(check_key, _Request(headers={"authorization": "Bearer sk-2"}), "sk-1")
    assert e.status == 401 and e.code == "invalid_api_key" and "sk-1" not in e.message


def test_read_body_limits():
    mb = 1 / 1024  # 1 KiB
    assert asyncio.run(read_body(_Request('{"消息": "你好"}'.encode()), mb)) == '{"消息": "你好"}'.encode()
    big = b'{"x": "' + b"a" * 2000 + b'"}'
    assert _run_error(read_body(_Request(big), mb)).status == 413  # counted while reading
    lying = _Request(b"{}", headers={"content-length": "999999"})
    assert _run_error(read_body(lying, mb)).code == "request_too_large"  # the declared length is enough
    # a client that leaves while sending: a 400 that nobody reads, not an internal error
    assert _run_error(read_body(_Request(b"{" * 10, gone_after=1), mb)).code == "client_disconnected"


def _run_error(coro) -> ApiError:
    with pytest.raises(ApiError) as e:
        asyncio.run(coro)
    return e.value


def test_sse_and_stops():
    assert sse({"text": "你好"}) == 'data: {"text": "你好"}\n\n'  # one event, Chinese as itself
    assert json.loads(sse({"a": 1})[6:]) == {"a": 1}
    assert stops(validate(CompletionBody, {"model": "m", "prompt": "x", "stop": "。"})) == ["。"]
    assert stops(validate(CompletionBody, {"model": "m", "prompt": "x", "stop": ["a", "b"]})) == ["a", "b"]


class _Engine:
    """Takes requests like the engine: all of a job or none (UserError: one can never run; Busy: the queue is
    full; RuntimeError: stopping)."""

    def __init__(self, refuse: Exception | None = None):
        self.refuse, self.submitted, self.cancelled = refuse, [], []

    def submit(self, *reqs):
        if self.refuse is not None:
            raise self.refuse
        self.submitted += reqs

    def cancel(self, req):
        self.cancelled.append(req)


def test_job_collects_each_choices_events_until_all_are_done():
    async def run():
        engine = _Engine()
        job = Job(engine)
        for i in range(2):
            job.add(i, [1, 2, 3], SamplingParams(max_new_tokens=2), None)
        job.submit()
        # the engine thread emits; events arrive through the loop in order
        a, b = engine.submitted
        a.emit(Event("token", token=7))
        b.emit(Event("token", token=8))
        a.emit(Event("done", finish_reason="length"))
        b.emit(Event("error", message="out of memory"))
        return [(i, ev.kind) for i, ev in [x async for x in job.events()]]

    assert asyncio.run(run()) == [(0, "token"), (1, "token"), (0, "done"), (1, "error")]


@pytest.mark.parametrize(
    ("refuse", "status"), [(UserError("too long"), 400), (Busy("full"), 429), (RuntimeError("stopping"), 503)]
)
def test_a_refused_job_submits_nothing(refuse, status):
    async def run():
        engine = _Engine(refuse)
        job = Job(engine)
        job.add(0, [1], SamplingParams(), None)
        job.add(1, [1], SamplingParams(), None)
        with pytest.raises(ApiError) as e:
            job.submit()
        return e.value, engine

    err, engine = asyncio.run(run())
    assert err.status == status and engine.submitted == []
    assert (err.headers or {}).get("Retry-After") == ("1" if status == 429 else None)
    assert err.response().status_code == status and b'"error"' in err.response().body
