"""`mhsft deploy`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on mhsft's batching engine, or the
vLLM / SGLang / LMDeploy server started with the matching flags (`--infer_backend`).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (SSE streaming ending in `data: [DONE]`),
POST /v1/completions (with `echo` + prompt-token `logprobs`, which lm-evaluation-harness's `local-completions`
uses to score multiple choice), POST /tokenize, /detokenize. Errors use OpenAI's JSON shape. Conversation text is
never logged unless `--log_requests true`.

Every body is validated (openai_protocol's models) before anything reaches the tokenizer or the engine, and a
request's own fault is its own 400: the engine checks each request's sampling values once, when it is queued,
so none can fail the batch it runs in. Parsing, tokenizing and rendering a large body run on a small worker
pool (the tokenizer releases the GIL while it works): a 7.5 MB body delays only itself, where on the event
loop it held every other request for 9-16 s. Receive timeouts and the connection and request caps are
http_guard's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from mhsft.args import EngineArguments, GenerationArguments, ModelArguments, QuantArguments, parse_args
from mhsft.client import ensure_loopback_no_proxy, is_loopback
from mhsft.model import BASE, base_model_for, model_ids, parse_adapters
from mhsft.serve.backends import run_engine
from mhsft.serve.detok import TextStream, TokenBytes
from mhsft.serve.engine import Engine, Event, encode_chat, engine_from_args
from mhsft.serve.http_guard import HttpLimits, RequestGuard, guarded_protocol
from mhsft.serve.openai_protocol import (
    MAX_PROMPTS,
    ApiError,
    Body,
    ChatBody,
    Choice,
    CompletionBody,
    DetokenizeBody,
    Job,
    Message,
    TokenizeBody,
    check_key,
    chunk_choice,
    error_chunk,
    json_response,
    parse_json,
    raise_failed,
    read_body,
    sse,
    stops,
    validate,
)
from mhsft.serve.sampling import SamplingParams
from mhsft.utils import UserError, get_logger, register_secret, release_freed_memory, scrub

# Work for a body up to this size runs on the event loop (a thread hop costs more than it saves); a larger
# body's parsing, tokenizing and reply run on the worker pool. Tokenizing 16 KB takes ~15 ms on one core.
INLINE_BYTES = 16 << 10
# After work for a body past this size, freed memory goes back to the OS (utils.release_freed_memory): the pool
# threads' glibc arenas otherwise keep a 7.5 MB /tokenize's token lists resident (+600 MB after three).
RELEASE_BYTES = 1 << 20


@dataclass
class DeployArguments(EngineArguments, GenerationArguments, ModelArguments, QuantArguments):
    infer_backend: str = field(default="pt", metadata={"help": "pt (mhsft's own) | vllm | sglang | lmdeploy"})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 exposes the server)."})
    port: int = field(default=8000, metadata={"help": "Port."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model id clients send (default: the model's folder or hub name)."}
    )
    api_key: str | None = field(default=None, metadata={"help": "Require `Authorization: Bearer KEY`."})
    session_len: int | None = field(default=None, metadata={"help": "LMDeploy's name for --max_model_len."})
    tp: int = field(default=1, metadata={"help": "Tensor parallel GPUs (vllm, sglang, lmdeploy)."})
    cache_max_entry_count: float | None = field(
        default=None, metadata={"help": "LMDeploy: share of free GPU memory for the KV cache."}
    )
    gpu_memory_utilization: float | None = field(default=None, metadata={"help": "vLLM: GPU memory share."})
    merged_dir: str | None = field(
        default=None, metadata={"help": "LMDeploy: where to write the merged model (default CKPT-merged)."}
    )
    max_body_mb: float = field(default=8.0, metadata={"help": "Largest request body accepted (413 beyond)."})
    log_requests: bool = field(
        default=False, metadata={"help": "Log prompts and replies (off: counts only)."}
    )
    stream_interval: int = field(
        default=1,
        metadata={"help": "Tokens per streamed chunk (SGLang's --stream-interval); 1 streams every token."},
    )
    async_scheduling: bool = field(
        default=True,
        metadata={"help": "pt: queue the next decode step before reporting the last (false: one at a time)."},
    )
    max_queue: int = field(
        default=1024,
        metadata={
            "help": "Generations waiting for a slot beyond the running batch; past it 429 + Retry-After."
        },
    )
    max_concurrent_requests: int = field(
        default=256,
        metadata={
            "help": "POST requests handled at once (GETs are never refused); past it 429 + Retry-After."
        },
    )
    max_connections: int = field(
        default=1000,
        metadata={
            "help": "Open connections; a request on one past this is answered 429 and its connection closed."
        },
    )
    timeout_keep_alive: int = field(
        default=5, metadata={"help": "Seconds an idle kept-alive connection stays open (uvicorn's)."}
    )
    timeout_headers: float = field(
        default=10.0,
        metadata={"help": "Seconds a client has to send the request line and headers; then 408 and closed."},
    )
    timeout_body: float = field(
        default=60.0, metadata={"help": "Seconds a client has to send the body after its headers; then 408."}
    )
    max_header_kb: int = field(
        default=64, metadata={"help": "Largest request line + headers in KB; past it 431 and closed."}
    )


async def collect(server, job, request, choices, want_lp: bool, chat: bool) -> None:
    """Run a non-streamed request to the end (cancelled if the client goes away); raise if any choice failed."""
    try:
        async for i, ev in job.events(request):
            server.on_event(choices[i], ev, job, i, want_lp, chat=chat)
    finally:
        job.cancel()
    raise_failed(choices)


async def stream_updates(server, job, choices, want_lp: bool, chat: bool):
    """A streamed request's engine events folded into choices, as `(i, text, ended)` once choice i has
    --stream_interval new tokens or has ended, or `(None, message, True)` for a failed choice; the caller turns
    each into its API's chunk (the logprobs are in `choices[i]`)."""
    every = server.args.stream_interval
    pending: dict[int, str] = {}  # text not sent yet, per choice
    held = [0] * len(choices)  # tokens since the last update
    async for batch in job.batches():
        ended = set()
        for i, ev in batch:
            delta = server.on_event(choices[i], ev, job, i, want_lp, chat=chat)
            if ev.kind == "error":
                yield None, ev.message or "generation failed", True
                continue
            pending[i] = pending.get(i, "") + delta
            held[i] += ev.kind == "token"
            if ev.kind == "done":
                ended.add(i)
        for i in [i for i in pending if held[i] >= every or i in ended]:
            held[i] = 0
            yield i, pending.pop(i), i in ended


class Server:
    def __init__(self, engine: Engine, models: dict[str, str | None], args: DeployArguments):
        self.engine = engine
        self.tok = engine.tokenizer
        self.models = models
        self.args = args
        self.created = int(time.time())
        self.log = get_logger()
        self.token_text = lru_cache(maxsize=65536)(
            lambda i: self.tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )
        self.token_bytes = lru_cache(maxsize=65536)(TokenBytes(self.tok))
        self.pool = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mhsft-cpu"
        )

    async def offload(self, size: int, fn, *args):
        """fn(*args) for a request of `size` bytes: inline when small, else on the worker pool (its exceptions,
        ApiError included, come back here)."""
        if size <= INLINE_BYTES:
            return fn(*args)
        job = partial(_then_release, fn, *args) if size > RELEASE_BYTES else partial(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, job)

    async def body(self, request, cls):
        """(the body as model `cls`, its size in bytes): the key, size, JSON and fields checked in that order."""
        check_key(request, self.args.api_key)
        raw = await read_body(request, self.args.max_body_mb)
        return await self.offload(len(raw), _parse, cls, raw, self.engine.vocab), len(raw)

    def resolve_model(self, name: str):
        if name not in self.models:
            known = ", ".join(self.models)
            raise ApiError(
                404, f"The model `{name}` does not exist (served: {known})", "model", "model_not_found"
            )
        return self.models[name]

    def params(self, body: Body, prompt_len: int, default_max: int | None, param: str) -> SamplingParams:
        a = self.args
        room = self.engine.max_model_len - prompt_len
        if room <= 0:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.engine.max_model_len} tokens; the prompt has "
                f"{prompt_len}.",
                param,
                "context_length_exceeded",
            )
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.engine.max_model_len} tokens. However, you "
                f"requested {prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion).",
                "max_tokens",
                "context_length_exceeded",
            )

        def pick(given, default):
            return given if given is not None else default

        bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
        return SamplingParams(
            max_new_tokens=asked if asked is not None else min(default_max or room, room),
            temperature=pick(body.temperature, a.temperature),
            top_p=pick(body.top_p, a.top_p),
            top_k=max(0, pick(body.top_k, a.top_k) or 0),
            repetition_penalty=pick(body.repetition_penalty, a.repetition_penalty),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=pick(body.seed, a.seed),
            ignore_eos=body.ignore_eos,
            logit_bias=bias,
        )

    def encode_messages(self, messages: list[Message]) -> list[int]:
        """Prompt ids for a conversation under the chat template; a template that refuses it is a 400."""
        try:
            return encode_chat(self.tok, self.messages(messages))
        except ApiError:
            raise
        except Exception as e:  # jinja errors from the template (e.g. roles it refuses)
            raise ApiError(400, f"messages: the chat template failed: {str(e)[:200]}", "messages") from None

    def messages(self, messages: list[Message]) -> list[dict]:
        msgs = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                if any(p.type != "text" for p in content):
                    raise ApiError(400, f"messages.{i}.content: only text parts are supported", "messages")
                content = "".join(p.text or "" for p in content)
            role = "system" if m.role == "developer" else m.role
            msgs.append({"role": role, "content": content or ""})
        if self.args.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.args.system})
        return msgs

    # ----------------------------------------------------------------- choice bookkeeping

    def on_event(self, ch: Choice, ev: Event, job: Job, index: int, want_lp: bool, chat: bool) -> str:
        """Fold an engine event into a choice; return the new text delta."""
        if ev.kind == "prompt_logprobs":
            for tid, (lp, top) in zip(job.reqs[index].prompt_ids, ev.prompt_logprobs):
                self._add_lp(ch, tid, lp, top, chat=False)
            return ""
        if ev.kind == "error":
            ch.error, ch.finish_reason = ev.message, "error"
            return ""
        if ev.kind == "done":
            delta = ch.stream.flush()
            if ch.finish_reason is None:
                ch.finish_reason = "stop" if ev.finish_reason in ("stop", "cancelled") else ev.finish_reason
            return delta
        ch.completion_tokens += 1
        if want_lp:
            self._add_lp(ch, ev.token, ev.logprob, ev.top, chat=chat)
        if ev.is_stop or ch.stream.stopped:
            return ""
        delta = ch.stream.push(ev.token)
        if ch.stream.stopped:  # a stop string: no more tokens are needed
            ch.finish_reason = "stop"
            self.engine.cancel(job.reqs[index])
        return delta

    def _add_lp(self, ch: Choice, tid: int, lp, top, chat: bool) -> None:
        text = self.token_text(tid)
        if chat:  # `bytes` are the token's own (part of a character included), as OpenAI reports them
            ch.chat_logprobs.append(
                {
                    "token": text,
                    "logprob": lp,
                    "bytes": list(self.token_bytes(tid)),
                    "top_logprobs": [
                        {"token": self.token_text(t), "logprob": v, "bytes": list(self.token_bytes(t))}
                        for t, v in (top or [])
                    ],
                }
            )
            return
        ch.text_offset.append(ch.text_offset[-1] + len(ch.tokens[-1]) if ch.tokens else 0)
        ch.tokens.append(text)
        ch.token_logprobs.append(lp)
        ch.top_logprobs.append(None if top is None else {self.token_text(t): v for t, v in top})

    def completion_logprobs(self, ch: Choice, start: int = 0) -> dict:
        return {
            "tokens": ch.tokens[start:],
            "token_logprobs": ch.token_logprobs[start:],
            "top_logprobs": ch.top_logprobs[start:],
            "text_offset": ch.text_offset[start:],
        }

    def usage(self, choices: list[Choice], prompt_lens: list[int]) -> dict:
        p, c = sum(prompt_lens), sum(ch.completion_tokens for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def log_done(
        self, kind: str, model: str, choices: list[Choice], prompt_lens, t0: float, text=None
    ) -> None:
        u = self.usage(choices, prompt_lens)
        reasons = ",".join(sorted({str(c.finish_reason) for c in choices}))
        self.log.info(
            f"{kind} model={model} prompt_tokens={u['prompt_tokens']} completion_tokens={u['completion_tokens']} "
            f"finish={reasons} {time.monotonic() - t0:.2f}s"
        )
        if self.args.log_requests and text is not None:
            self.log.info(scrub(f"{kind} request: {json.dumps(text[0], ensure_ascii=False)[:4000]}"))
            self.log.info(
                scrub(
                    f"{kind} reply: {json.dumps([c.stream.text for c in choices], ensure_ascii=False)[:4000]}"
                )
            )


def _then_release(fn, *args):
    try:
        return fn(*args)
    finally:
        release_freed_memory(collect=False)


def _parse(cls, raw: bytes, vocab: int):
    return validate(cls, parse_json(raw), vocab)


async def chat_completions(server: Server, request):
    t0 = time.monotonic()
    body, size = await server.body(request, ChatBody)
    adapter = server.resolve_model(body.model)
    prompt = await server.offload(size, server.encode_messages, body.messages)
    params = server.params(body, len(prompt), server.args.max_new_tokens, "messages")
    want_lp = bool(body.logprobs)
    if want_lp:
        params.logprobs = body.top_logprobs or 0
    stop = stops(body)
    job = Job(server.engine)
    for i in range(body.n):
        p = SamplingParams(**vars(params))
        if p.seed is not None:
            p.seed += i
        job.add(i, prompt, p, adapter)
    job.submit()
    choices = [Choice(TextStream(server.tok, stop), len(prompt)) for _ in range(body.n)]
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
    log_text = server.messages(body.messages) if server.args.log_requests else None

    if not body.stream:
        await collect(server, job, request, choices, want_lp, chat=True)
        server.log_done("chat", body.model, choices, [len(prompt)] * body.n, t0, log_text)
        reply = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": ch.stream.text},
                    "logprobs": {"content": ch.chat_logprobs} if want_lp else None,
                    "finish_reason": ch.finish_reason,
                }
                for i, ch in enumerate(choices)
            ],
            "usage": server.usage(choices, [len(prompt)] * body.n),
        }
        return await server.offload(_reply_size(choices), json_response, reply)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def gen():
        for i in range(body.n):
            yield sse({**head, "choices": [chunk_choice(i, {"role": "assistant", "content": ""})]})
        n_lp = [0] * body.n  # logprobs sent, per choice
        async for i, delta, ended in stream_updates(server, job, choices, want_lp, chat=True):
            if i is None:
                yield error_chunk(delta)
                continue
            ch = choices[i]
            new_lp, n_lp[i] = ch.chat_logprobs[n_lp[i] :], len(ch.chat_logprobs)
            lp = {"content": new_lp} if want_lp and new_lp else None
            if delta or lp:
                yield sse({**head, "choices": [chunk_choice(i, {"content": delta}, lp)]})
            if ended:
                yield sse({**head, "choices": [chunk_choice(i, {}, None, ch.finish_reason)]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": server.usage(choices, [len(prompt)] * body.n)})
        yield "data: [DONE]\n\n"
        server.log_done("chat(stream)", body.model, choices, [len(prompt)] * body.n, t0, log_text)

    return JobStream(gen(), job)


def _reply_size(choices: list[Choice]) -> int:
    """About how many bytes a reply's JSON takes: its text and its logprob entries."""
    return sum(len(c.stream.text) * 3 + 64 * (len(c.chat_logprobs) + len(c.tokens)) for c in choices)


class JobStream(StreamingResponse):
    """An SSE response that cancels its job however it ends: finished, failed, or its client gone, even before
    the generator first ran (its own `finally` would then never run)."""

    def __init__(self, gen, job: Job):
        super().__init__(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


async def completions(server: Server, request):
    t0 = time.monotonic()
    body, size = await server.body(request, CompletionBody)
    adapter = server.resolve_model(body.model)
    if body.suffix:
        raise ApiError(400, "suffix is not supported", "suffix", "invalid_value")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens 0 is only allowed with echo", "max_tokens", "invalid_value")
    single = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
    if (1 if single else len(body.prompt)) * body.n > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts x n per request", "prompt", "invalid_value")
    prompts = await server.offload(size, _prompts, server, body.prompt)
    want_lp = body.logprobs is not None
    job = Job(server.engine)
    choices, lens, index = [], [], 0
    for ids in prompts:
        params = server.params(body, len(ids), 16, "prompt")  # OpenAI's default max_tokens for completions
        if want_lp:
            params.logprobs = body.logprobs
            if body.echo:
                params.prompt_logprobs = body.logprobs
        for j in range(body.n):
            p = SamplingParams(**vars(params))
            if p.seed is not None:
                p.seed += j
            choices.append(Choice(TextStream(server.tok, stops(body)), len(ids)))
            lens.append(len(ids))
            job.add(index, ids, p, adapter)
            index += 1
    job.submit()
    prefix = [
        server.tok.decode(job.reqs[i].prompt_ids, skip_special_tokens=False) if body.echo else ""
        for i in range(index)
    ]
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    log_text = [body.prompt] if server.args.log_requests else None

    if not body.stream:
        await collect(server, job, request, choices, want_lp, chat=False)
        server.log_done("completion", body.model, choices, lens, t0, log_text)
        reply = {
            **head,
            "choices": [
                {
                    "index": i,
                    "text": prefix[i] + ch.stream.text,
                    "logprobs": server.completion_logprobs(ch) if want_lp else None,
                    "finish_reason": ch.finish_reason,
                }
                for i, ch in enumerate(choices)
            ],
            "usage": server.usage(choices, lens),
        }
        return await server.offload(_reply_size(choices), json_response, reply)

    async def gen():
        sent_lp = [0] * len(choices)
        for i in range(len(choices)):
            if prefix[i]:
                choice = {"index": i, "text": prefix[i], "logprobs": None, "finish_reason": None}
                yield sse({**head, "choices": [choice]})
        async for i, delta, ended in stream_updates(server, job, choices, want_lp, chat=False):
            if i is None:
                yield error_chunk(delta)
                continue
            ch = choices[i]
            lp = None
            if want_lp and len(ch.tokens) > sent_lp[i]:
                lp = server.completion_logprobs(ch, sent_lp[i])
                sent_lp[i] = len(ch.tokens)
            if delta or lp or ended:
                fin = ch.finish_reason if ended else None
                choice = {"index": i, "text": delta, "logprobs": lp, "finish_reason": fin}
                yield sse({**head, "choices": [choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": server.usage(choices, lens)})
        yield "data: [DONE]\n\n"
        server.log_done("completion(stream)", body.model, choices, lens, t0, log_text)

    return JobStream(gen(), job)


def _prompts(server: Server, prompt) -> list[list[int]]:
    """The prompt field (text, texts, token ids, lists of token ids; validated non-empty and within the
    vocabulary) as lists of token ids."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for x in items:
        ids = server.tok(x, add_special_tokens=False)["input_ids"] if isinstance(x, str) else list(x)
        if not ids:  # text that tokenizes to nothing
            raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------------------------
# App and entry point


def build_app(server: Server):
    app = FastAPI(title="mhsft", docs_url=None, redoc_url=None, openapi_url=None)
    # Past the endpoints' own errors: a cap on requests in flight, and any other exception as one log line
    # and a 500 in OpenAI's shape (Starlette's own handler for Exception would log a traceback per request).
    app.add_middleware(RequestGuard, max_concurrent_requests=server.args.max_concurrent_requests)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        server.log.info(f"{request.method} {request.url.path} -> {exc.status} {exc.code or ''}".rstrip())
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return ApiError(400, "invalid request").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": server.engine.load(), **server.engine.stats}

    # vLLM's tokenizer endpoints: lm-eval's local-completions detects them and then needs no local tokenizer.
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_key(request, server.args.api_key)
        tok = server.tok
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": server.engine.max_model_len,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body, size = await server.body(request, TokenizeBody)
        return await server.offload(size, _tokenize, server, body)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body, size = await server.body(request, DetokenizeBody)
        text = await server.offload(
            size, partial(server.tok.decode, clean_up_tokenization_spaces=False), body.tokens
        )
        return await server.offload(size, json_response, {"prompt": text})

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, server.args.api_key)
        return {"object": "list", "data": [_model_card(server, m) for m in server.models]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request, server.args.api_key)
        server.resolve_model(name)
        return _model_card(server, name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completions(server, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await completions(server, request)

    return app


def _tokenize(server: Server, body: TokenizeBody):
    """/tokenize's reply (rendered here: on the worker pool for a large body, with its millions of ids)."""
    if body.messages is not None:
        ids = server.encode_messages(body.messages)
    elif body.prompt is not None:
        ids = server.tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
    else:
        raise ApiError(400, "give prompt or messages", "prompt", "invalid_value")
    # Rendered in slices: one json.dumps of millions of ids holds the GIL (and so the event loop) for ~0.2 s
    tokens = ",".join(
        json.dumps(ids[i : i + 65536], separators=(",", ":"))[1:-1] for i in range(0, len(ids), 65536)
    )
    tail = f'],"count":{len(ids)},"max_model_len":{server.engine.max_model_len}}}'
    return Response(f'{{"tokens":[{tokens}{tail}'.encode(), media_type="application/json")


def _model_card(server: Server, name: str) -> dict:
    adapter = server.models[name]
    base = next((m for m, a in server.models.items() if a is BASE), None)
    card = {"id": name, "object": "model", "created": server.created, "owned_by": "mhsft"}
    card["max_model_len"] = server.engine.max_model_len
    if adapter is not BASE and base:
        card["parent"] = base
    return card


def main(argv: list[str]) -> int:
    args = parse_args(DeployArguments, argv, "mhsft deploy")
    register_secret(args.api_key)
    ensure_loopback_no_proxy()
    if args.max_body_mb <= 0:
        raise UserError("--max_body_mb must be positive")
    if args.stream_interval < 1:
        raise UserError("--stream_interval must be at least 1")
    _check_limits(args)
    base = base_model_for(args.model, parse_adapters(args.adapters))
    args.max_model_len = args.max_model_len or args.session_len
    if args.infer_backend != "pt":
        return run_engine(args, base)
    if args.tp != 1:
        get_logger().info("--tp applies to vllm, sglang and lmdeploy; the pt backend uses one device")
    if args.cache_max_entry_count is not None:
        get_logger().info(
            "--cache_max_entry_count applies to lmdeploy; the pt backend sizes its cache from "
            "--max_batch_size x --max_model_len"
        )
    models = model_ids(base, args.adapters, args.served_model_name)
    engine, device = engine_from_args(base, args, cuda_graphs=args.cuda_graphs)
    try:  # the flags' sampling values are every request's defaults: refuse bad ones now, not per request
        SamplingParams.of(args).checked(engine.vocab)
    except UserError as e:
        engine.stop()
        raise UserError(f"--{e}") from None
    server = Server(engine, models, args)
    log = get_logger()
    log.info(
        f"serving {', '.join(models)} at http://{_url_host(args.host)}:{args.port}/v1 (pt backend, {device}, "
        f"batch {engine.max_batch_size}, context {engine.max_model_len} tokens)"
    )
    if not is_loopback(args.host) and not args.api_key:
        log.warning(f"listening on {args.host} without --api_key: anyone who can reach it can use it")
    import uvicorn  # deferred: only the pt backend's server needs it

    # The engine thread and the event loop share the GIL: at Python's default 5 ms switch interval a finished
    # GPU step can wait that long for the thread that streams its tokens, or the reverse.
    sys.setswitchinterval(0.0005)
    limits = HttpLimits(args.timeout_headers, args.timeout_body, args.max_header_kb << 10, args.max_connections,
                        args.max_concurrent_requests)  # fmt: skip
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning", access_log=False,
                    http=guarded_protocol(limits), timeout_keep_alive=args.timeout_keep_alive)  # fmt: skip
    finally:
        engine.stop()
        server.pool.shutdown(wait=False, cancel_futures=True)
    return 0


def _check_limits(args: DeployArguments) -> None:
    for name in (
        "max_queue",
        "max_concurrent_requests",
        "max_connections",
        "max_header_kb",
        "timeout_keep_alive",
    ):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise UserError(f"--{name} must be {'0 or more' if name == 'max_queue' else 'at least 1'}")
    for name in ("timeout_headers", "timeout_body"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be positive (seconds)")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
