"""What gets evaluated: a model in this process (on the generation engine `infer` and `deploy` use), or any
OpenAI-compatible endpoint. Both answer the same two questions: the log-likelihood of a continuation after a
context, and a chat reply.

Log-likelihood follows lm-eval exactly, so that mhsft's numbers and an exported lm-eval task agree: trailing
spaces of the context move to the continuation; the context and context+continuation are tokenized separately
(no special tokens) and the continuation is the tail of the latter past the context's length; the input keeps
the last `max_length` tokens. Through an endpoint it is lm-eval's `local-completions` request: /v1/completions
with echo, logprobs=1 and max_tokens=1, summing the log-probabilities of the echoed continuation tokens.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor

from mhsft.client import normalize_api_url, openai_client
from mhsft.model import BASE, inference_quant, load_for_inference
from mhsft.serve.engine import Engine, Request, encode_chat
from mhsft.serve.kv_cache import kv_cache_bytes
from mhsft.serve.sampling import SamplingParams
from mhsft.utils import UserError, get_logger, register_secret, scrub


class RequestError(Exception):
    """One request failed for good (after the client's retries); the item is left for a later run."""


def make_client(api_url: str, api_key: str | None, timeout: float = 120.0, max_retries: int = 5):
    """An OpenAI client (mhsft.client's: a loopback URL never goes through a proxy). Retries with exponential
    backoff are the client's own (429, 5xx, dropped connections)."""
    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    register_secret(key)
    return openai_client(normalize_api_url(api_url), key, timeout=timeout, max_retries=max_retries)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return scrub(lines[0] if lines else type(e).__name__)[:300]


class EngineTarget:
    """A model in this process, on mhsft's generation engine (the one `infer` and `deploy` run: continuous
    batching, CUDA graphs, per-row sampling); `adapter` is the system evaluated (BASE: the base model). Several
    targets share one engine: the base and each adapter, in one load."""

    kind = "local"

    def __init__(self, engine, adapter=BASE, max_length: int | None = None):
        self.engine, self.adapter, self.tokenizer = engine, adapter, engine.tokenizer
        # scoring reads no KV cache: its limit is the model's own, as lm-eval's (not the engine's --max_model_len)
        self.max_length = max_length or int(getattr(engine.config, "max_position_embeddings", 0) or 2048)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """lm-eval's loglikelihood of each (context, continuation), batched by the engine (mhsft.serve.scoring)."""
        pairs = []
        for ctx, cont in requests:
            c, k = encode_pair(self.tokenizer, ctx, cont)
            if not k or len(k) >= self.max_length:
                raise UserError(
                    f"the continuation {cont!r} is empty or longer than --max_length once tokenized"
                )
            inp = (c + k)[-self.max_length :]  # lm-eval keeps the last max_length tokens
            pairs.append((inp[: len(inp) - len(k)], k))
        return self.engine.score(pairs, self.adapter)

    def chat(self, conversations: list[list[dict]], gen, max_new_tokens: int) -> list[str | RequestError]:
        """Replies to all conversations, generated together (the engine batches them as they fit); a request the
        engine refuses (longer than its context) or that fails gets its RequestError."""
        events: queue.Queue = queue.Queue()
        out: list = [None] * len(conversations)
        tokens: list[list[int]] = [[] for _ in conversations]
        reqs, waiting = [], 0
        for i, msgs in enumerate(conversations):
            params = SamplingParams.of(gen, max_new_tokens)
            req = Request(encode_chat(self.tokenizer, msgs), params, lambda ev, i=i: events.put((i, ev)),
                          adapter=self.adapter)  # fmt: skip
            try:
                self.engine.submit(req)
            except (UserError, RuntimeError) as e:
                out[i] = RequestError(str(e))
                continue
            reqs.append(req)
            waiting += 1
        try:
            while waiting:
                i, ev = events.get()
                if ev.kind == "token" and not ev.is_stop:
                    tokens[i].append(ev.token)
                elif ev.kind in ("done", "error"):
                    waiting -= 1
                    out[i] = RequestError(ev.message or "generation failed") if ev.kind == "error" else None
        finally:
            for r in reqs:  # an interrupted evaluation frees its slots
                self.engine.cancel(r)
        return [o if o is not None else self._text(t) for o, t in zip(out, tokens)]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class EndpointTarget:
    """An OpenAI-compatible server: `mhsft deploy`, vLLM, a hosted model."""

    kind = "endpoint"

    def __init__(
        self,
        api_url: str,
        api_key: str | None,
        model_name: str | None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
    ):
        self.api_url = normalize_api_url(api_url)
        self.client = make_client(api_url, api_key, timeout, max_retries)
        # one try, a short wait: a server that is down is said in seconds, before any work (the retries with
        # backoff are for requests to a server that is up)
        self.quick = self.client.with_options(max_retries=0, timeout=min(timeout, 10.0))
        self.concurrency = max(1, concurrency)
        self.model_name = model_name or self._first_model()
        if model_name:
            self._check_up()

    def _check_up(self) -> None:
        import openai

        try:
            self.quick.models.list()
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise UserError(
                f"{self.api_url}: cannot connect ({_first_line(e)}); start the server, then rerun (done items "
                "are kept)"
            ) from e
        except (
            openai.APIError
        ):  # up, but without /v1/models (or it needs other rights): its requests will tell
            pass

    def _first_model(self) -> str:
        try:
            models = self.quick.models.list().data
        except Exception as e:  # connection refused, 404 from a server without /models, auth
            raise UserError(
                f"{self.api_url}: cannot list models ({_first_line(e)}); is the server up? "
                "Pass --served_model_name to skip this"
            ) from e
        if not models:
            raise UserError(f"{self.api_url} serves no model; pass --served_model_name")
        return models[0].id

    def _call(self, fn, *args):
        import openai

        try:
            return fn(*args)
        except openai.APIConnectionError as e:
            raise UserError(
                f"{self.api_url}: cannot connect ({_first_line(e)}); start the server, then rerun (done items "
                "are kept)"
            ) from e
        except openai.AuthenticationError as e:
            raise UserError(f"{self.api_url}: authentication failed; check --api_key") from e
        except openai.APIError as e:
            raise RequestError(_first_line(e)) from e

    def map(self, fn, items: list) -> list:
        """fn over items, `concurrency` at a time, in order; an item whose request failed for good gets its
        RequestError in place of a result (a lost connection stops everything with a UserError)."""

        def one(x):
            try:
                return self._call(fn, x)
            except RequestError as e:
                return e

        if len(items) <= 1 or self.concurrency == 1:
            return [one(x) for x in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, items))

    def _one_loglikelihood(self, req: tuple[str, str]) -> float:
        ctx, cont = req
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        resp = self.client.completions.create(
            model=self.model_name,
            prompt=ctx + cont,
            echo=True,
            logprobs=1,
            max_tokens=1,
            temperature=0,
        )
        return continuation_logprob(resp, cont)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float | RequestError]:
        return self.map(self._one_loglikelihood, requests)

    def chat_one(self, messages: list[dict], gen, max_new_tokens: int) -> str:
        extra = {}
        if gen.top_k:
            extra["top_k"] = gen.top_k
        if gen.repetition_penalty != 1.0:
            extra["repetition_penalty"] = gen.repetition_penalty
        resp = self.client.chat.completions.create(
            model=self.model_name,
            messages=messages,
            temperature=gen.temperature,
            top_p=gen.top_p,
            max_tokens=max_new_tokens,
            seed=gen.seed,
            extra_body=extra or None,
        )
        if not resp.choices:
            raise RequestError("the server returned no choices")
        return (resp.choices[0].message.content or "").strip()

    def chat(self, conversations: list[list[dict]], gen, max_new_tokens: int) -> list[str | RequestError]:
        return self.map(lambda m: self.chat_one(m, gen, max_new_tokens), conversations)

    def probe_loglikelihood(self) -> str | None:
        """None when the endpoint scores echoed prompts, else why not (for `--mcq_mode auto`)."""
        try:
            self._call(self._one_loglikelihood, ("答案：", " A"))
        except RequestError as e:
            return str(e)
        return None


def continuation_logprob(resp, continuation: str) -> float:
    """Sum of the log-probabilities of the echoed continuation tokens in a /v1/completions reply (echo=True,
    logprobs=1, max_tokens=1): the last echoed tokens whose texts spell the continuation. The generated token is
    left out by usage.completion_tokens (else assumed to be one, as lm-eval does). Text offsets are not used:
    servers (vLLM, mhsft deploy) compute them from per-token decoded text, which drifts on partial UTF-8 bytes."""
    choice = resp.choices[0]
    lp = choice.logprobs
    if lp is None or not lp.token_logprobs or not lp.tokens or len(lp.tokens) != len(lp.token_logprobs):
        raise RequestError("the endpoint returned no logprobs for the echoed prompt (echo=True, logprobs=1)")
    gen = getattr(getattr(resp, "usage", None), "completion_tokens", None)
    end = len(lp.tokens) - (gen if isinstance(gen, int) and 0 <= gen <= 1 else 1)
    start, text = end, ""
    while start > 1 and len(text) < len(continuation):
        start -= 1
        text = lp.tokens[start] + text
    values = lp.token_logprobs[start:end]
    if text != continuation or any(v is None for v in values):
        raise RequestError(f"cannot find the continuation {continuation!r} at the end of the echoed tokens")
    return float(sum(values))


def load_engine_for(args, adapters: dict[str, str]):
    """The engine an in-process evaluation runs on: --model with `adapters` ({name: checkpoint}) loaded beside
    it. --max_model_len defaults to the model's limit (at most 4096); --max_batch_size to 8 on the CPU and on a GPU
    to as many requests as the KV cache holds in 70% of the memory the weights leave free, at most 256 (an
    evaluation's prompts are many and short: a larger batch is faster)."""
    import torch  # deferred: an evaluation of an endpoint never loads it

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = [f"{n}={p}" for n, p in adapters.items()]
    model, tok, names = load_for_inference(args.model, specs, args.torch_dtype, args.attn_impl, device,
                                           use_hf=args.use_hf, token=args.hub_token,
                                           quant=inference_quant(args, adapters))  # fmt: skip
    batch = args.max_batch_size or _batch_that_fits(model, args.max_model_len, device)
    engine = Engine(model, tok, names, max_batch_size=batch, max_model_len=args.max_model_len,
                    cuda_graphs=getattr(args, "cuda_graphs", True)).start()  # fmt: skip
    get_logger().info(
        f"evaluating in-process on {device}: {args.model or 'the base model'}"
        + (f" and {', '.join(adapters)}" if adapters else "")
        + f" (batch {engine.max_batch_size}, context {engine.max_model_len} tokens)"
    )
    return engine


def _batch_that_fits(model, max_model_len: int | None, device: str) -> int:
    import torch

    if not device.startswith("cuda"):
        return 8
    cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
    length = min(int(max_model_len or min(limit, 4096)), limit)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_request = kv_cache_bytes(cfg, 1, length, dtype)
    return int(max(8, min(256, 0.7 * free // per_request - 1)))
