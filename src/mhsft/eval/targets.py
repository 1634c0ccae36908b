"""What gets evaluated: a model loaded in this process, or any OpenAI-compatible endpoint. Both answer the same
two questions: the log-likelihood of a continuation after a context, and a chat reply.

Log-likelihood follows lm-eval exactly, so that mhsft's numbers and an exported lm-eval task agree: trailing
spaces of the context move to the continuation; the context and context+continuation are tokenized separately
(no special tokens) and the continuation is the tail of the latter past the context's length; the input keeps
the last `max_length` tokens. Through an endpoint it is lm-eval's `local-completions` request: /v1/completions
with echo, logprobs=1 and max_tokens=1, summing the log-probabilities of the echoed continuation tokens.
"""

from __future__ import annotations

import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from mhsft.client import openai_client
from mhsft.model import load_for_inference
from mhsft.utils import UserError, get_logger, register_secret, scrub


class RequestError(Exception):
    """One request failed for good (after the client's retries); the item is left for a later run."""


def normalize_api_url(url: str) -> str:
    """`http://h:8000`, `http://h:8000/v1`, `.../v1/chat/completions` -> the base URL the OpenAI client wants."""
    u = url.strip().rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if u.endswith(tail):
            u = u[: -len(tail)]
    p = urlparse(u)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise UserError(f"API URL {url!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
    return u if p.path not in ("", "/") else u + "/v1"


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


class LocalTarget:
    """A causal LM (with its adapter, if any) in this process."""

    kind = "local"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, batch_size)
        cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = max_length or cfg_len or 2048

    @property
    def _cache_arg(self) -> str:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    @property
    def device(self):
        return next(self.model.parameters()).device

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """Requests sharing a context (the options of one question) run that context once: a batch of distinct
        contexts goes through the model with a KV cache, the first continuation token is scored from its last
        position, and any further continuation tokens run on the cache, one row per request."""
        import torch

        enc: list[tuple[tuple[int, ...], list[int]]] = []
        for ctx, cont in requests:
            c, k = encode_pair(self.tokenizer, ctx, cont)
            if not k or len(k) >= self.max_length:
                raise UserError(
                    f"the continuation {cont!r} is empty or longer than --max_length once tokenized"
                )
            inp = (c + k)[-self.max_length :]  # lm-eval keeps the last max_length tokens
            enc.append((tuple(inp[: len(inp) - len(k)]), k))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (c, _) in enumerate(enc):
            groups.setdefault(c, []).append(i)
        out = [0.0] * len(enc)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ctxs = sorted(groups, key=len, reverse=True)
        dev = self.device
        for s in range(0, len(ctxs), self.batch_size):
            batch = ctxs[s : s + self.batch_size]
            width = max(len(c) for c in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, c in enumerate(batch):  # left padding: every context ends at the last position
                ids[r, width - len(c) :] = torch.tensor(c)
                mask[r, width - len(c) :] = 1
            with torch.no_grad():
                o = self.model(
                    input_ids=ids.to(dev),
                    attention_mask=mask.to(dev),
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(dev),
                    use_cache=True,
                    logits_to_keep=1,  # a 150k vocabulary times the whole prompt would not fit
                )
            first = torch.log_softmax(o.logits[:, -1].float(), dim=-1).cpu()
            rows = [(r, i) for r, c in enumerate(batch) for i in groups[c]]
            for r, i in rows:
                out[i] = float(first[r, enc[i][1][0]])
            longer = [(r, i) for r, i in rows if len(enc[i][1]) > 1]
            if not longer:
                continue
            sel = torch.tensor([r for r, _ in longer])
            cache = getattr(o, "cache", None) or o.past_key_values  # transformers 5 renamed it `cache`
            cache.reorder_cache(sel.to(dev))  # one cache row per request that needs more tokens
            m = max(len(enc[i][1]) - 1 for _, i in longer)
            step = torch.full((len(longer), m), pad, dtype=torch.long)
            step_mask = torch.zeros((len(longer), m), dtype=torch.long)
            for row, (_, i) in enumerate(longer):
                k = enc[i][1][:-1]
                step[row, : len(k)] = torch.tensor(k)
                step_mask[row, : len(k)] = 1
            pos = mask[sel].sum(-1, keepdim=True) + torch.arange(m)[None]
            with torch.no_grad():
                o2 = self.model(
                    input_ids=step.to(dev),
                    attention_mask=torch.cat([mask[sel], step_mask], dim=1).to(dev),
                    position_ids=pos.to(dev),
                    use_cache=True,
                    **{self._cache_arg: cache},
                )
            logp = torch.log_softmax(o2.logits.float(), dim=-1).cpu()
            for row, (_, i) in enumerate(longer):
                k = enc[i][1]
                out[i] += float(logp[row, torch.arange(len(k) - 1), torch.tensor(k[1:])].sum())
        return out

    def chat(self, conversations: list[list[dict]], gen, max_new_tokens: int) -> list[str]:
        import torch

        tok = self.tokenizer
        texts = [
            tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations
        ]
        kwargs = gen.generate_kwargs(tok)
        kwargs["max_new_tokens"] = max_new_tokens
        if gen.seed is not None:
            torch.manual_seed(gen.seed)
        out = [""] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            enc = tok(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,
            ).to(self.device)
            with torch.no_grad():
                gen_ids = self.model.generate(**enc, **kwargs)
            for r, i in enumerate(idx):
                out[i] = tok.decode(gen_ids[r, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        return out


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
        self.concurrency = max(1, concurrency)
        self.model_name = model_name or self._first_model()

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
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


def load_local_target(args) -> LocalTarget:
    """The model (and adapter) named by --model / --adapters, ready for evaluation."""
    if len(args.adapters or []) > 1:
        raise UserError("--adapters: evaluate one adapter per run (run mhsft eval once for each)")
    model, tok, _ = load_for_inference(
        args.model,
        args.adapters or None,
        dtype=args.torch_dtype,
        attn_impl=args.attn_impl,
        device=args.device,
        use_hf=args.use_hf,
        token=args.hub_token,
    )
    get_logger().info(
        f"evaluating {args.model or args.adapters[0]} in-process on {next(model.parameters()).device}"
    )
    return LocalTarget(model, tok, batch_size=args.eval_batch_size, max_length=args.max_length)
