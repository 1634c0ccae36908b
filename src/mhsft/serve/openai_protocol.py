"""The OpenAI API's shapes as mhsft's server speaks them: request bodies (validated with pydantic before anything
reaches the tokenizer or the engine: strict types, so `"stream": "yes"` and `"n": "2"` are refused; ranges;
token ids within the vocabulary; unknown fields accepted), the error type with OpenAI's JSON shape, reading a
body (size, JSON, nesting depth, lone UTF-16 surrogates), SSE framing, and the bookkeeping of one HTTP
request's generation (its engine requests feeding one asyncio queue, and what each choice accumulates)."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from mhsft.serve.detok import TextStream
from mhsft.serve.engine import Busy, Engine, Event
from mhsft.serve.engine import Request as GenRequest
from mhsft.serve.sampling import LIMITS, MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from mhsft.utils import UserError

DRAIN_LIMIT = 64 << 20  # read (and drop) at most this much of an oversized body so the client sees the 413
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a body (OpenAI bodies need a handful)
MAX_PROMPTS = 1024  # prompts (x n) in one completions request
MAX_MESSAGES = 4096
MAX_STOPS, MAX_STOP_CHARS = 16, 512
SEED = (-(1 << 63), (1 << 63) - 1)  # a 64-bit integer, as vLLM takes it; a larger seed is a 400

# ---------------------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are accepted (clients send many); wrong types and ranges are 400s. Types are
# strict: a string is not a number or a boolean, a float is not an integer.

STRICT = ConfigDict(extra="allow", strict=True)
Stop = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
TokenKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]
Bias = Annotated[float, Field(ge=LIMITS["logit_bias"][0], le=LIMITS["logit_bias"][1])]


def _range(name: str) -> dict:
    lo, hi = LIMITS[name]
    return {"ge": lo, "le": hi}


def _check_ids(ids: list[int], info: ValidationInfo) -> None:
    vocab = (info.context or {}).get("vocab")
    if not ids:
        raise ValueError("a token-id list is empty")
    if vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab})")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class Body(BaseModel):
    model_config = STRICT
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, **_range("temperature"))
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 and 0: off; past the vocabulary: the whole vocabulary
    repetition_penalty: float | None = Field(None, **_range("repetition_penalty"))
    presence_penalty: float | None = Field(None, **_range("presence_penalty"))
    frequency_penalty: float | None = Field(None, **_range("frequency_penalty"))
    seed: int | None = Field(None, ge=SEED[0], le=SEED[1])
    logit_bias: dict[TokenKey, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    stop: Stop | list[Stop] | None = Field(None, union_mode="left_to_right")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, v, info: ValidationInfo):
        if v:
            _check_ids([int(k) for k in v], info)
        return v


class Part(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(union_mode="left_to_right")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        items = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if not items:
            raise ValueError("the prompt is empty")
        if len(items) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts")
        for x in items:
            if isinstance(x, str):
                if not x:
                    raise ValueError("the prompt is empty")
            else:
                _check_ids(x, info)
        return v


class TokenizeBody(BaseModel):
    model_config = STRICT
    model: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = False


class DetokenizeBody(BaseModel):
    model_config = STRICT
    model: str | None = Field(None, max_length=256)
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v, info: ValidationInfo):
        if v:
            _check_ids(v, info)
        return v


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return json_response(self.body(), self.status, self.headers)


def busy(message: str) -> ApiError:
    """429 with Retry-After: the same request may succeed in a moment."""
    return ApiError(429, f"{message}; retry later", code="server_busy", headers={"Retry-After": "1"})


def json_response(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`obj` as a JSON response, rendered here (FastAPI's default walks every value of a returned dict with
    jsonable_encoder first: seconds for a reply holding millions of token ids)."""
    try:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: JSON's \u escapes carry it
        data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return Response(data, status, headers, media_type="application/json")


# ---------------------------------------------------------------------------------------------------------
# One HTTP request's generation: several engine requests (prompts x n) feeding one asyncio queue.


class Job:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs: list[GenRequest] = []

    def add(self, index: int, prompt: list[int], params: SamplingParams, adapter) -> None:
        """One more engine request (choice `index`); `submit` queues them all."""

        def emit(ev: Event, i=index) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

        self.reqs.append(GenRequest(prompt, params, emit, adapter=adapter))

    def submit(self) -> None:
        """Queue every request of the job, or none: 400 for one the engine refuses, 429 when its queue is full."""
        try:
            self.engine.submit(*self.reqs)
        except UserError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        except Busy as e:
            raise busy(f"server busy: {e}") from None
        except RuntimeError as e:
            raise ApiError(503, f"{e}; retry later", code="server_unavailable") from None

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


async def read_body(request, max_mb: float) -> bytes:
    """The body's bytes: 413 past `max_mb` (checked while reading, whatever Content-Length says). A client that
    leaves while sending is a 400 that nobody reads, not an internal error."""
    limit = int(max_mb * (1 << 20))
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"request body larger than {max_mb:g} MB", code="request_too_large")
    body = bytearray()
    if declared.isdigit() and int(declared) > limit:
        await _drain(request)
        raise too_big
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                await _drain(request, len(body))
                raise too_big
    except ClientDisconnect:
        raise ApiError(
            400, "the client disconnected while sending the body", code="client_disconnected"
        ) from None
    return bytes(body)


async def _drain(request, seen: int = 0) -> None:
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_LIMIT:
                return
    except Exception:  # the client gave up sending; the 413 still goes out if it can
        return


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400: bytes that are not UTF-8 JSON (NaN and Infinity are not JSON), nesting deeper
    than MAX_JSON_DEPTH, or a string holding a lone UTF-16 surrogate (`"\\ud83d"` is valid JSON but no text:
    the tokenizer and the log cannot take it)."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    _check_tree(data)
    return data


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _check_tree(data) -> None:
    """Depth and text of every value, without recursion. Only containers are stacked; a path is spelled out only
    for the value at fault."""
    stack = [(data, 1, "")] if isinstance(data, (dict, list)) else []
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            top = path.split(".")[0] or None
            raise ApiError(
                400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", top, "invalid_json"
            )
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if type(key) is str and not _is_text(key):
                raise _surrogate(path, key)
            if type(value) is str:
                if not _is_text(value):
                    raise _surrogate(path, key)
            elif isinstance(value, (dict, list)):
                stack.append((value, depth + 1, f"{path}.{key}" if path else str(key)))


def _surrogate(path: str, key) -> ApiError:
    where = f"{path}.{key}" if path else str(key)
    where = where.encode("utf-8", "backslashreplace").decode("utf-8")  # a key may hold the surrogate itself
    return ApiError(400, f"{where}: the text holds a lone UTF-16 surrogate (not valid Unicode)", where,
                    "invalid_value")  # fmt: skip


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(cls, data, vocab: int | None = None) -> Any:
    """`data` as the request model `cls` (token ids checked against `vocab`), or a 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_type")
    try:
        return cls.model_validate(data, context={"vocab": vocab})
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: list[dict]) -> ApiError:
    """One 400 for pydantic's errors, about the first one's field: a value's own fault (a range, a length) when
    there is one, else the types the value could have had (`prompt`, `stop` and `content` take several)."""

    def where(err) -> tuple[list[str], str | None]:
        # pydantic puts the union member it tried into the location (`prompt.list[int].0`): keep the field path
        loc = [str(x) for x in err.get("loc", ())]
        tags = [x for x in loc if "[" in x or x in _TYPE_TAGS]
        tag = tags[0].replace("constrained-", "") if tags else None
        return [x for x in loc if x not in tags], tag

    path, _ = where(errors[0])
    same = [e for e in errors if where(e)[0][: len(path)] == path]  # this field's, all members tried
    param = ".".join(path) or None
    own = [e for e in same if not str(e.get("type", "")).endswith("_type")]
    tried = list(dict.fromkeys(t for e in same for t in [where(e)[1]] if t))
    if own or len(tried) < 2:
        msg = str((own or same)[0].get("msg", "invalid value")).removeprefix("Value error, ")
    else:
        msg = "expected " + " or ".join(tried)
    return ApiError(400, f"{param or 'body'}: {msg}", param, "invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str"}


def stops(body: Body) -> list[str]:
    s = body.stop
    return [s] if isinstance(s, str) else list(s or [])
