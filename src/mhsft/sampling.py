"""Per-request sampling for a batch whose rows each carry their own settings (temperature, top-p, top-k,
penalties, seed), as a serving engine needs: one logits tensor in, one token per row out.

transformers' LogitsProcessors apply one setting to the whole batch, so they cannot serve a batch that mixes
greedy lm-eval requests with sampled chat requests; this module applies each row's own values, vectorized
where the values allow and per row only where they must be (a seeded generator, penalties).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def greedy(self) -> bool:
        return not self.temperature or self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)


@dataclass
class RowState:
    """What sampling needs to remember about one request between steps."""

    params: SamplingParams
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # (vocab,) how often each token was generated (OpenAI penalties)
    seen: torch.Tensor | None = None  # (vocab,) bool: token in prompt or reply (repetition penalty)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], vocab: int, device) -> RowState:
        st = cls(params)
        if params.seed is not None and not params.greedy:
            st.generator = torch.Generator(device=device).manual_seed(int(params.seed))
        if params.presence_penalty or params.frequency_penalty:
            st.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if params.repetition_penalty != 1.0:
            st.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.long, device=device)
            st.seen[ids] = True
        return st

    def observe(self, token: int) -> None:
        if self.counts is not None and 0 <= token < self.counts.numel():
            self.counts[token] += 1
        if self.seen is not None and 0 <= token < self.seen.numel():
            self.seen[token] = True


def _apply_penalties(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    for i, r in enumerate(rows):
        p = r.params
        if not p.penalized:
            continue
        row = logits[i]
        if r.seen is not None:
            pen = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(r.seen, pen, row)
        if r.counts is not None:
            row = row - p.frequency_penalty * r.counts - p.presence_penalty * (r.counts > 0).float()
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


def sample(logits: torch.Tensor, rows: list[RowState]) -> Sampled:
    """One token per row of `logits` (B, V), each row under its own settings."""
    logits = logits.float()
    want_lp = [r.params.logprobs is not None for r in rows]
    raw_lp = logits.log_softmax(dim=-1) if any(want_lp) else None
    if any(r.params.penalized for r in rows):
        logits = _apply_penalties(logits.clone(), rows)
    greedy = [r.params.greedy for r in rows]
    tokens = logits.argmax(dim=-1)
    if not all(greedy):
        idx = [i for i, g in enumerate(greedy) if not g]
        sub = logits[idx]
        dev = logits.device
        temp = torch.tensor([rows[i].params.temperature for i in idx], device=dev, dtype=torch.float32)
        sub = sub / temp[:, None]
        top_k = torch.tensor([int(rows[i].params.top_k or 0) for i in idx], device=dev)
        top_p = torch.tensor([float(rows[i].params.top_p) for i in idx], device=dev, dtype=torch.float32)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            sub = _filter_top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        unseeded = [j for j, i in enumerate(idx) if rows[i].generator is None]
        if unseeded:
            picks = torch.multinomial(probs[unseeded], 1).squeeze(-1)
            tokens[[idx[j] for j in unseeded]] = picks
        for j, i in enumerate(idx):
            if (
                rows[i].generator is not None
            ):  # a per-request generator makes `seed` reproducible in any batch
                tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    if tokens.is_cuda:
        # Wait for the step here, where PyTorch releases the GIL, rather than inside `tolist()`, which holds it:
        # the server's event loop streams the previous tokens meanwhile.
        torch.cuda.current_stream(tokens.device).synchronize()
    toks = tokens.tolist()
    lps: list[float | None] = [None] * len(rows)
    tops: list[list[tuple[int, float]] | None] = [None] * len(rows)
    if raw_lp is not None:
        chosen = raw_lp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
        kmax = max((r.params.logprobs or 0) for r in rows)
        top_v, top_i = raw_lp.topk(kmax, dim=-1) if kmax else (None, None)
        for i, r in enumerate(rows):
            if not want_lp[i]:
                continue
            lps[i] = chosen[i]
            k = r.params.logprobs or 0
            tops[i] = list(zip(top_i[i, :k].tolist(), top_v[i, :k].tolist())) if k else []
    for r, t in zip(rows, toks):
        r.observe(t)
    return Sampled(toks, lps, tops)


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
