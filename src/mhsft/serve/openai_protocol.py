"""The OpenAI API's shapes as mhsft's server speaks them: request bodies (validated with pydantic; unknown fields
accepted, wrong types and ranges are 400s), the error type with OpenAI's JSON shape, SSE framing, and the
bookkeeping of one HTTP request's generation (its engine requests feeding one asyncio queue, and what each
choice accumulates)."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mhsft.serve.detok import TextStream
from mhsft.serve.engine import Engine, Event
from mhsft.serve.engine import Request as GenRequest
from mhsft.serve.sampling import SamplingParams
from mhsft.utils import UserError

DRAIN_LIMIT = 64 << 20  # read (and drop) at most this much of an oversized body so the client sees the 413

# ---------------------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are accepted (clients send many); wrong types and ranges are 400s.


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=16)
    ignore_eos: bool = False


class Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# One HTTP request's generation: several engine requests (prompts x n) feeding one asyncio queue.


class Job:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs: list[GenRequest] = []

    def add(self, index: int, prompt: list[int], params: SamplingParams, adapter) -> None:
        def emit(ev: Event, i=index) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

        req = GenRequest(prompt, params, emit, adapter=adapter)
        try:
            self.engine.submit(req)
        except UserError as e:
            self.cancel()
            raise ApiError(400, str(e), "prompt", "context_length_exceeded") from None
        except RuntimeError as e:
            self.cancel()
            raise ApiError(503, f"server busy: {e}; retry later", code="server_busy") from None
        self.reqs.append(req)

    def cancel(self) -> None:
        for r in self.reqs:
            self.engine.cancel(r)

    async def batches(self, request=None) -> AsyncIterator[list[tuple[int, Event]]]:
        """Events in arrival order, as lists of all that are ready. A stream that fell behind the engine sends
        what piled up as one chunk instead of one per token: the event loop's cost is per chunk, so a loaded
        server catches up instead of falling further behind."""
        left = len(self.reqs)
        while left:
            batch = []
            if self.queue.empty():
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout=1.0))
                except asyncio.TimeoutError:
                    # A non-streaming client that hung up is only noticed by asking.
                    if request is not None and await request.is_disconnected():
                        self.cancel()
                        return
                    continue
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            left -= sum(ev.kind in ("done", "error") for _, ev in batch)
            yield batch

    async def events(self, request=None) -> AsyncIterator[tuple[int, Event]]:
        async for batch in self.batches(request):
            for item in batch:
                yield item


@dataclass
class Choice:
    """What one choice accumulates: text (through TextStream, so stop strings and UTF-8 are handled once)
    and, when asked, logprobs in the completions API's parallel lists."""

    stream: TextStream
    prompt_len: int
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    chat_logprobs: list[dict] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_chunk(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def chunk_choice(i: int, delta: dict, logprobs=None, finish: str | None = None) -> dict:
    return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def raise_failed(choices: list[Choice]) -> None:
    for ch in choices:
        if ch.error:
            raise ApiError(500, ch.error, code="generation_failed")


# ---------------------------------------------------------------------------------------------------------
# Reading a request


def check_key(request, api_key: str | None) -> None:
    if not api_key:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        msg = "Missing API key" if not auth else "Incorrect API key provided"
        raise ApiError(401, f"{msg} (send `Authorization: Bearer KEY`)", code="invalid_api_key")


async def read_json(request, max_mb: float) -> Any:
    """The body as JSON: 413 past `max_mb` (checked while reading, whatever Content-Length says), 400 for bytes
    that are not UTF-8 JSON."""
    limit = int(max_mb * (1 << 20))
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"request body larger than {max_mb:g} MB", code="request_too_large")
    body = bytearray()
    if declared.isdigit() and int(declared) > limit:
        await _drain(request)
        raise too_big
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            await _drain(request, len(body))
            raise too_big
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


async def _drain(request, seen: int = 0) -> None:
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_LIMIT:
                return
    except Exception:  # the client gave up sending; the 413 still goes out if it can
        return


def validate(cls, data) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_type")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ()))
        raise ApiError(400, f"{param or 'body'}: {err.get('msg')}", param or None, "invalid_value") from None


def stops(body: Body) -> list[str]:
    s = body.stop
    out = [s] if isinstance(s, str) else list(s or [])
    if len(out) > 16:
        raise ApiError(400, "stop: at most 16 stop strings", "stop", "invalid_value")
    return out
