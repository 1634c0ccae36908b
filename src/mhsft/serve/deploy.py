"""`mhsft deploy`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on mhsft's batching engine, or the
vLLM / SGLang / LMDeploy server started with the matching flags (`--infer_backend`).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (SSE streaming ending in `data: [DONE]`),
POST /v1/completions (with `echo` + prompt-token `logprobs`, which lm-evaluation-harness's `local-completions`
uses to score multiple choice). Errors use OpenAI's JSON shape. Conversation text is never logged unless
`--log_requests true`.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mhsft.args import EngineArguments, GenerationArguments, ModelArguments, QuantArguments, parse_args
from mhsft.client import ensure_loopback_no_proxy, is_loopback
from mhsft.model import BASE, base_model_for, model_ids, parse_adapters
from mhsft.serve.backends import run_engine
from mhsft.serve.detok import TextStream
from mhsft.serve.engine import Engine, Event, encode_chat, engine_from_args
from mhsft.serve.openai_protocol import (
    ApiError,
    Body,
    ChatBody,
    Choice,
    CompletionBody,
    DetokenizeBody,
    Job,
    TokenizeBody,
    check_key,
    chunk_choice,
    error_chunk,
    raise_failed,
    read_json,
    sse,
    stops,
    validate,
)
from mhsft.serve.sampling import SamplingParams
from mhsft.utils import UserError, get_logger, register_secret, scrub


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
        top_k = body.top_k if body.top_k is not None else a.top_k
        return SamplingParams(
            max_new_tokens=asked if asked is not None else min(default_max or room, room),
            temperature=body.temperature if body.temperature is not None else a.temperature,
            top_p=body.top_p if body.top_p is not None else a.top_p,
            top_k=max(0, top_k or 0),
            repetition_penalty=body.repetition_penalty or a.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed if body.seed is not None else a.seed,
            ignore_eos=body.ignore_eos,
        )

    def messages(self, body: ChatBody) -> list[dict]:
        msgs = []
        for i, m in enumerate(body.messages):
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
        if chat:
            ch.chat_logprobs.append(
                {
                    "token": text,
                    "logprob": lp,
                    "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": self.token_text(t),
                            "logprob": v,
                            "bytes": list(self.token_text(t).encode()),
                        }
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


async def chat_completions(server: Server, request):
    t0 = time.monotonic()
    check_key(request, server.args.api_key)
    body = validate(ChatBody, await read_json(request, server.args.max_body_mb))
    adapter = server.resolve_model(body.model)
    msgs = server.messages(body)
    try:
        prompt = encode_chat(server.tok, msgs)
    except Exception as e:  # jinja errors from the template (e.g. roles it refuses)
        raise ApiError(400, f"messages: the chat template failed: {str(e)[:200]}", "messages") from None
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
    choices = [Choice(TextStream(server.tok, stop), len(prompt)) for _ in range(body.n)]
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}

    if not body.stream:
        await collect(server, job, request, choices, want_lp, chat=True)
        server.log_done("chat", body.model, choices, [len(prompt)] * body.n, t0, msgs)
        return {
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

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def gen():
        try:
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
            server.log_done("chat(stream)", body.model, choices, [len(prompt)] * body.n, t0, msgs)
        finally:  # also when the client disconnects mid-stream: free the slots
            job.cancel()

    return _stream(gen())


def _stream(gen):
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def completions(server: Server, request):
    t0 = time.monotonic()
    check_key(request, server.args.api_key)
    body = validate(CompletionBody, await read_json(request, server.args.max_body_mb))
    adapter = server.resolve_model(body.model)
    if body.suffix:
        raise ApiError(400, "suffix is not supported", "suffix", "invalid_value")
    prompts = _prompts(server, body.prompt)
    if len(prompts) * body.n > 1024:
        raise ApiError(400, "at most 1024 prompts x n per request", "prompt", "invalid_value")
    want_lp = body.logprobs is not None
    job = Job(server.engine)
    choices, lens, index = [], [], 0
    for ids in prompts:
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 is only allowed with echo", "max_tokens", "invalid_value")
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
    prefix = [
        server.tok.decode(job.reqs[i].prompt_ids, skip_special_tokens=False) if body.echo else ""
        for i in range(index)
    ]
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

    if not body.stream:
        await collect(server, job, request, choices, want_lp, chat=False)
        server.log_done("completion", body.model, choices, lens, t0, [body.prompt])
        return {
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

    async def gen():
        try:
            sent_lp = [0] * len(choices)
            for i in range(len(choices)):
                if prefix[i]:
                    yield sse(
                        {
                            **head,
                            "choices": [
                                {"index": i, "text": prefix[i], "logprobs": None, "finish_reason": None}
                            ],
                        }
                    )
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
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": server.usage(choices, lens)})
            yield "data: [DONE]\n\n"
            server.log_done("completion(stream)", body.model, choices, lens, t0, [body.prompt])
        finally:
            job.cancel()

    return _stream(gen())


def _prompts(server: Server, prompt) -> list[list[int]]:
    """The prompt field (text, texts, token ids, lists of token ids) as lists of token ids."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
    vocab = server.engine.vocab
    out = []
    for x in items:
        ids = server.tok(x, add_special_tokens=False)["input_ids"] if isinstance(x, str) else list(x)
        if not ids:
            raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt", "invalid_value")
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------------------------
# App and entry point


def build_app(server: Server):
    app = FastAPI(title="mhsft", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        server.log.info(f"{request.method} {request.url.path} -> {exc.status} {exc.code or ''}".rstrip())
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(ApiError(400, "invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        server.log.error(
            f"internal error on {request.url.path}: {type(exc).__name__}: {scrub(str(exc))[:300]}"
        )
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

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
        check_key(request, server.args.api_key)
        body = validate(TokenizeBody, await read_json(request, server.args.max_body_mb))
        if body.messages is not None:
            msgs = [m.model_dump(include={"role", "content"}) for m in body.messages]
            ids = encode_chat(server.tok, msgs)
        elif body.prompt is not None:
            ids = server.tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        else:
            raise ApiError(400, "give prompt or messages", "prompt", "invalid_value")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_key(request, server.args.api_key)
        body = validate(DetokenizeBody, await read_json(request, server.args.max_body_mb))
        if any(not 0 <= t < server.engine.vocab for t in body.tokens):
            raise ApiError(400, f"tokens must be in [0, {server.engine.vocab})", "tokens", "invalid_value")
        return {"prompt": server.tok.decode(body.tokens, clean_up_tokenization_spaces=False)}

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
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        engine.stop()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
