"""Per-request sampling for a batch whose rows each carry their own settings (temperature, top-p, top-k,
penalties, seed), as a serving engine needs: one logits tensor in, one token per row out.

transformers' LogitsProcessors apply one setting to the whole batch, so they cannot serve a batch that mixes
greedy lm-eval requests with sampled chat requests; this module applies each row's own values, vectorized
where the values allow and per row only where they must be (a seeded generator, penalties, logit bias).

One row must never fail the batch it is sampled in, so every value is checked once, when its request is
submitted (`SamplingParams.checked`), against ranges in which the arithmetic stays finite: no accepted value can
make an inf or NaN probability (before this check, a temperature of 1e-300 failed every request of its batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mhsft.utils import UserError

# The values a setting may take (inclusive): OpenAI's ranges where its API has the setting; for the others, ranges
# that keep every logit finite in float32 (a logit is scaled by at most 1 / MIN_TEMPERATURE or 100). The server's
# request models use the same bounds, so a value the engine would refuse is a 400 naming its field.
LIMITS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "repetition_penalty": (0.01, 100.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "logit_bias": (-100.0, 100.0),
}
# Below this a temperature samples greedily (vLLM's _SAMPLING_EPS): 1e-300 would become 0 in float32 and turn
# the logits into inf / NaN; at 1e-5 float32 logits scaled by 1e5 stay finite and the softmax is already one-hot.
MIN_TEMPERATURE = 1e-5
SEED_RANGE = 1 << 64  # torch.Generator takes seeds in [0, 2**64): any integer seed is taken modulo this
MAX_LOGIT_BIAS = 1024  # entries per request
MAX_LOGPROBS = 20  # alternatives per token


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # transformers' (CTRL) penalty over prompt + reply tokens; 1: off
    presence_penalty: float = 0.0  # OpenAI's, over the reply's tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # report each generated token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # report the prompt tokens' logprobs (echo) and this many alternatives
    logit_bias: dict[int, float] | None = None  # added to these tokens' logits before sampling (OpenAI's)

    @classmethod
    def of(cls, gen, max_new_tokens: int | None = None) -> SamplingParams:
        """The settings of a GenerationArguments (`mhsft infer`'s and `mhsft eval`'s flags)."""
        return cls(max_new_tokens=max_new_tokens or gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                   top_k=gen.top_k, repetition_penalty=gen.repetition_penalty, seed=gen.seed)  # fmt: skip

    @property
    def greedy(self) -> bool:
        return not self.temperature or self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def adjusted(self) -> bool:
        """Whether this row's logits change before sampling (penalties, logit bias): those rows take a per-row
        step; the others are sampled with the whole batch."""
        return self.penalized or bool(self.logit_bias)

    def checked(self, vocab: int) -> SamplingParams:
        """A copy the sampler can always compute, or UserError naming the first setting out of range. Checked once,
        when a request is submitted, so no request can fail a batch later: a temperature under MIN_TEMPERATURE
        is greedy and top_k past the vocabulary (or negative) is off; any integer seed is accepted (RowState
        takes it modulo 2**64)."""
        for name, (lo, hi) in LIMITS.items():
            if name == "logit_bias":
                continue
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise UserError(f"{name} must be a number in [{lo:g}, {hi:g}] (got {v!r})")
        _check_int("max_new_tokens", self.max_new_tokens, 0)
        _check_int("top_k", self.top_k, None)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, MAX_LOGPROBS)
        if self.seed is not None:
            _check_int("seed", self.seed, None)
        bias = _checked_bias(self.logit_bias, vocab)
        return dataclasses.replace(
            self,
            temperature=0.0 if self.temperature < MIN_TEMPERATURE else float(self.temperature),
            top_k=self.top_k if 0 < self.top_k < vocab else 0,
            logit_bias=bias,
        )


def _check_int(name: str, v, lo: int | None, hi: int | None = None) -> None:
    if (
        isinstance(v, bool)
        or not isinstance(v, int)
        or (lo is not None and v < lo)
        or (hi is not None and v > hi)
    ):
        where = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise UserError(f"{name} must be an integer{where} (got {v!r})")


def _checked_bias(bias: dict | None, vocab: int) -> dict[int, float] | None:
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise UserError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens (got {len(bias)})")
    lo, hi = LIMITS["logit_bias"]
    out = {}
    for k, v in bias.items():
        tid = int(k) if isinstance(k, str) and k.isdigit() and len(k) < 20 else k
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab:
            raise UserError(f"logit_bias: {k!r} is not a token id in [0, {vocab})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
            raise UserError(f"logit_bias: the bias of token {tid} must be in [{lo:g}, {hi:g}] (got {v!r})")
        out[tid] = float(v)
    return out


@dataclass
class RowState:
    """What sampling needs to remember about one request between steps."""

    params: SamplingParams
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # (vocab,) how often each token was generated (OpenAI penalties)
    seen: torch.Tensor | None = None  # (vocab,) bool: token in prompt or reply (repetition penalty)
    bias: torch.Tensor | None = None  # (vocab,) float32: logit_bias, dense

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], vocab: int, device) -> RowState:
        """The state of a request's row, from params that passed `SamplingParams.checked`."""
        st = cls(params)
        if params.seed is not None and not params.greedy:
            st.generator = torch.Generator(device=device).manual_seed(params.seed % SEED_RANGE)
        if params.logit_bias:
            st.bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            ids, values = list(params.logit_bias), list(params.logit_bias.values())
            st.bias[to_device(ids, device)] = to_device(values, device, torch.float32)
        if params.presence_penalty or params.frequency_penalty:
            st.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if params.repetition_penalty != 1.0:
            st.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            st.seen[to_device([i for i in prompt_ids if 0 <= i < vocab], device)] = True
        return st

    def observe(self, token: int | torch.Tensor) -> None:
        """Count a generated token: an int, or a one-element tensor still on the device (no read-back)."""
        if self.counts is None and self.seen is None:
            return
        buf = self.counts if self.counts is not None else self.seen
        if not isinstance(token, torch.Tensor):
            if not 0 <= token < buf.numel():
                return
            token = torch.tensor([token], device=buf.device)
        if self.counts is not None:
            self.counts.index_add_(0, token, torch.ones(1, device=token.device))
        if self.seen is not None:
            self.seen.index_fill_(0, token, True)


def _adjust(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Each adjusted row's penalties and logit bias, applied to its own row."""
    for i, r in enumerate(rows):
        p = r.params
        if not p.adjusted:
            continue
        row = logits[i]
        if r.seen is not None:
            pen = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(r.seen, pen, row)
        if r.counts is not None:
            row = row - p.frequency_penalty * r.counts - p.presence_penalty * (r.counts > 0).float()
        if r.bias is not None:  # last: a bias of -100 lowers the final logit by exactly that
            row = row + r.bias
        logits[i] = row
    return logits


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what each row's top-k and top-p exclude; top_k 0 and top_p 1 are off. Always keeps the
    most likely token."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)[None]
    drop = ranks >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above
    drop |= before > top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float | None]  # the chosen token's logprob under the model (raw, before any processing)
    top: list[list[tuple[int, float]] | None]  # alternatives, most likely first


def to_device(values: list, device, dtype=torch.long) -> torch.Tensor:
    """A small host list on `device` without waiting for the device: a plain `torch.tensor(..., device=cuda)`
    copies from pageable memory and synchronizes the stream, which would wait for every step already queued."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class Pending:
    """One batch's sampled tokens, still being computed on the device. `tokens` stays on the device (the next
    step's input); `result()` waits for this batch only, not for steps queued after it, and reads it back."""

    def __init__(self, tokens: torch.Tensor, chosen, top_v, top_i, ks: list[int | None]):
        self.tokens = tokens
        self.ks = ks
        parts = [t for t in (tokens, chosen, top_v, top_i) if t is not None]
        self.event = None
        if tokens.is_cuda:
            # Pinned host buffers and an event recorded behind the copies: reading them waits for this batch
            # only. `tolist()` on a device tensor would synchronize the whole stream.
            parts = [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in parts
            ]
            self.event = torch.cuda.Event()
            self.event.record()
        self.host = parts

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL: the server streams earlier tokens meanwhile

    def result(self) -> Sampled:
        self.wait()
        toks = self.host[0].tolist()
        n = len(toks)
        lps: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]] | None] = [None] * n
        if len(self.host) > 1:
            chosen = self.host[1].tolist()
            top_v, top_i = (self.host[2].tolist(), self.host[3].tolist()) if len(self.host) > 2 else ([], [])
            for i, k in enumerate(self.ks):
                if k is None:
                    continue
                lps[i] = chosen[i]
                tops[i] = list(zip(top_i[i][:k], top_v[i][:k])) if k else []
        return Sampled(toks, lps, tops)


def sample_async(logits: torch.Tensor, rows: list[RowState]) -> Pending:
    """One token per row of `logits` (B, V), each row under its own settings, queued on the device without
    waiting for it: every per-row value goes to the device through `to_device`, no result is read back."""
    logits = logits.float()
    dev = logits.device
    ks = [r.params.logprobs for r in rows]
    raw_lp = logits.log_softmax(dim=-1) if any(k is not None for k in ks) else None
    if any(r.params.adjusted for r in rows):
        logits = _adjust(logits.clone(), rows)
    tokens = logits.argmax(dim=-1)
    idx = [i for i, r in enumerate(rows) if not r.params.greedy]
    if idx:
        idx_t = to_device(idx, dev)
        sub = logits.index_select(0, idx_t)
        sub = sub / to_device([rows[i].params.temperature for i in idx], dev, torch.float32)[:, None]
        top_k = [int(rows[i].params.top_k or 0) for i in idx]
        top_p = [float(rows[i].params.top_p) for i in idx]
        if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
            sub = _filter_top_k_top_p(sub, to_device(top_k, dev), to_device(top_p, dev, torch.float32))
        probs = sub.softmax(dim=-1)
        unseeded = [j for j, i in enumerate(idx) if rows[i].generator is None]
        if unseeded:
            picks = torch.multinomial(probs.index_select(0, to_device(unseeded, dev)), 1).squeeze(-1)
            tokens.index_copy_(0, to_device([idx[j] for j in unseeded], dev), picks)
        for j, i in enumerate(idx):
            if (
                rows[i].generator is not None
            ):  # a per-request generator makes `seed` reproducible in any batch
                tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    chosen = top_v = top_i = None
    if raw_lp is not None:
        chosen = raw_lp.gather(-1, tokens[:, None]).squeeze(-1)
        kmax = max(k or 0 for k in ks)
        if kmax:
            top_v, top_i = raw_lp.topk(kmax, dim=-1)
    for i, r in enumerate(rows):
        r.observe(tokens[i : i + 1])
    return Pending(tokens, chosen, top_v, top_i, ks)


def sample(logits: torch.Tensor, rows: list[RowState]) -> Sampled:
    """`sample_async`, waited for."""
    return sample_async(logits, rows).result()


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's (Qwen lists <|im_end|> and <|endoftext|>) and the
    tokenizer's."""
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    for x in eos if isinstance(eos, (list, tuple)) else [eos]:
        if x is not None:
            ids.add(int(x))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
