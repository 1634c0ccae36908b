"""mhsft/serve/openai_protocol.py: request validation, errors in OpenAI's shape, API keys, body limits, SSE, and one
HTTP request's generation (its engine requests and their events), without a server or a model."""

from __future__ import annotations

import asyncio
import json

import pytest

from mhsft.serve.engine import Event
from mhsft.serve.openai_protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    Job,
    check_key,
    read_json,
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


def test_api_error_body_has_openais_shape():
    assert ApiError(404, "no such model", "model", "model_not_found").body() == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                  "code": "model_not_found"}
    }  # fmt: skip
    assert ApiError(503, "busy").body()["error"]["type"] == "server_error"
    assert ApiError(413, "too big").body()["error"]["type"] == "invalid_request_error"


class _Request:
    def __init__(self, body: bytes = b"", headers: dict | None = None, chunk: int = 4):
        self.headers, self.body, self.chunk = headers or {}, body, chunk

    async def stream(self):
        for i in range(0, len(self.body), self.chunk):
            yield self.body[i : i + self.chunk]


def test_check_key():
    check_key(_Request(), None)  # no key configured: open
    check_key(_Request(headers={"authorization": "bearer sk-1"}), "sk-1")
    assert "Missing" in _error(check_key, _Request(), "sk-1").message
    e = _error(check_key, _Request(headers={"authorization": "Bearer sk-2"}), "sk-1")
    assert e.status == 401 and e.code == "invalid_api_key" and "sk-1" not in e.message


def test_read_json_limits_and_encoding():
    mb = 1 / 1024  # 1 KiB
    assert asyncio.run(read_json(_Request('{"消息": "你好"}'.encode()), mb)) == {"消息": "你好"}
    big = b'{"x": "' + b"a" * 2000 + b'"}'
    assert _run_error(read_json(_Request(big), mb)).status == 413  # counted while reading
    lying = _Request(b"{}", headers={"content-length": "999999"})
    assert _run_error(read_json(lying, mb)).code == "request_too_large"  # the declared length is enough
    assert _run_error(read_json(_Request(b'{"x": "\xff"}'), mb)).code == "invalid_json"
    assert _run_error(read_json(_Request(b"[" * 5000), 1.0)).code == "invalid_json"  # too deep to parse


def _run_error(coro) -> ApiError:
    with pytest.raises(ApiError) as e:
        asyncio.run(coro)
    return e.value


def test_sse_and_stops():
    assert sse({"text": "你好"}) == 'data: {"text": "你好"}\n\n'  # one event, Chinese as itself
    assert json.loads(sse({"a": 1})[6:]) == {"a": 1}
    assert stops(validate(CompletionBody, {"model": "m", "prompt": "x", "stop": "。"})) == ["。"]
    many = validate(CompletionBody, {"model": "m", "prompt": "x", "stop": [str(i) for i in range(17)]})
    assert _error(stops, many).param == "stop"


class _Engine:
    """Takes requests like the engine: refuses a too-long prompt (UserError) or a full queue (RuntimeError)."""

    def __init__(self, refuse: Exception | None = None):
        self.refuse, self.submitted, self.cancelled = refuse, [], []

    def submit(self, req):
        if self.refuse is not None and len(self.submitted) == 1:
            raise self.refuse
        self.submitted.append(req)

    def cancel(self, req):
        self.cancelled.append(req)


def test_job_collects_each_choices_events_until_all_are_done():
    async def run():
        engine = _Engine()
        job = Job(engine)
        for i in range(2):
            job.add(i, [1, 2, 3], SamplingParams(max_new_tokens=2), None)
        # the engine thread emits; events arrive through the loop in order
        a, b = engine.submitted
        a.emit(Event("token", token=7))
        b.emit(Event("token", token=8))
        a.emit(Event("done", finish_reason="length"))
        b.emit(Event("error", message="out of memory"))
        return [(i, ev.kind) for i, ev in [x async for x in job.events()]]

    assert asyncio.run(run()) == [(0, "token"), (1, "token"), (0, "done"), (1, "error")]


@pytest.mark.parametrize(("refuse", "status"), [(UserError("too long"), 400), (RuntimeError("full"), 503)])
def test_a_refused_request_cancels_the_ones_already_submitted(refuse, status):
    async def run():
        engine = _Engine(refuse)
        job = Job(engine)
        job.add(0, [1], SamplingParams(), None)
        with pytest.raises(ApiError) as e:
            job.add(1, [1], SamplingParams(), None)
        return e.value, engine

    err, engine = asyncio.run(run())
    assert err.status == status and engine.cancelled == engine.submitted
