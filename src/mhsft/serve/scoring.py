"""Log-likelihoods of continuations after contexts, many per forward: how `mhsft eval` scores multiple choice.

lm-eval scores a question as the log-probability of each option after the question, one request per option. Through
the engine's ordinary path (a prefill per request, as `/v1/completions` with `echo` does for lm-eval) every option
pays a padded prefill of the whole question and a full-vocabulary log-softmax at every prompt token. Here instead:

- requests that share a context (the options of one question) run it once. An option's first token is read at the
  context's last position, so single-token options (" A") cost nothing beyond the context; a longer option adds one
  sequence, the context followed by the option without its last token;
- the sequences are packed into rows of `budget` tokens without padding (best fit decreasing), and the packed
  attention the trainer uses (mhsft.packed_attention) keeps them apart;
- the LM head and the log-softmax run only at the positions that are read.

The numbers are lm-eval's: the caller encodes each pair as lm-eval does (mhsft.eval.targets.encode_pair), and a
read is the log-softmax of the model's logits at the position before each continuation token, summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mhsft.data.binpack import pack_bfd
from mhsft.packed_attention import packed_mask_mapping

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
READ_CHUNK = 1024


def plan(pairs: Sequence[Pair]) -> tuple[list[tuple[int, ...]], list[list[tuple[int, int, int]]]]:
    """(the distinct sequences to run, and for each request its reads: (sequence, position, token)). The
    log-likelihood of request i is the sum over its reads of log p(token | the sequence up to position)."""
    sequences: list[tuple[int, ...]] = []
    index: dict[tuple[int, ...], int] = {}

    def seq(ids: tuple[int, ...]) -> int:
        if ids not in index:
            index[ids] = len(sequences)
            sequences.append(ids)
        return index[ids]

    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"request {i}: the context and the continuation must each have a token")
        by_context.setdefault(tuple(ctx), []).append(i)
    reads: list[list[tuple[int, int, int]]] = [[] for _ in pairs]
    for ctx, members in by_context.items():
        last = len(ctx) - 1
        anchor = None  # a sequence that starts with ctx: its position `last` sees exactly ctx
        for i in members:
            cont = tuple(pairs[i][1])
            if len(cont) > 1:
                s = seq(ctx + cont[:-1])
                reads[i] = [(s, last + j, t) for j, t in enumerate(cont)]
                anchor = s if anchor is None else anchor
        for i in members:
            if len(pairs[i][1]) == 1:
                if anchor is None:
                    anchor = seq(ctx)
                reads[i] = [(anchor, last, pairs[i][1][0])]
    return sequences, reads


def score(decoder, lm_head, config, pairs: Sequence[Pair], budget: int, device) -> list[float]:
    """The summed continuation log-probabilities of `pairs` under a decoder (the model without its LM head) whose
    attention is the packed one. `budget`: tokens per forward (a longer sequence gets a row of its own)."""
    sequences, reads = plan(pairs)
    by_seq: dict[int, list[tuple[int, int, int]]] = {}  # sequence -> (position, token, request)
    for i, rs in enumerate(reads):
        for s, pos, tok in rs:
            by_seq.setdefault(s, []).append((pos, tok, i))
    out = [0.0] * len(pairs)
    lengths = [len(s) for s in sequences]
    for row in pack_bfd(lengths, max(budget, max(lengths, default=1))):
        for i, value in _score_row(decoder, lm_head, config, [sequences[s] for s in row],
                                   [by_seq[s] for s in row], device):  # fmt: skip
            out[i] += value
    return out


def _score_row(decoder, lm_head, config, seqs: list[tuple[int, ...]], wanted: list[list[tuple[int, int, int]]],
               device) -> list[tuple[int, float]]:  # fmt: skip
    """One packed forward: (request, log-probability) for every read of these sequences."""
    ids, positions, starts, flat, tokens, owners = [], [], [], [], [], []
    for s, want in zip(seqs, wanted):
        starts.append(len(ids))
        ids.extend(s)
        positions.extend(range(len(s)))
        for pos, tok, i in want:
            flat.append(starts[-1] + pos)
            tokens.append(tok)
            owners.append(i)
    cu = torch.tensor([*starts, len(ids)], dtype=torch.int32)
    longest = max(len(s) for s in seqs)
    hidden = decoder(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        attention_mask=packed_mask_mapping(config),
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
        use_cache=False,
    ).last_hidden_state[0]  # fmt: skip
    flat_t = torch.tensor(flat, device=hidden.device)
    tokens_t = torch.tensor(tokens, device=hidden.device)[:, None]
    values = []
    for c in range(
        0, len(flat), READ_CHUNK
    ):  # float32 logits of a 152k vocabulary: a chunk of reads at a time
        logp = lm_head(hidden.index_select(0, flat_t[c : c + READ_CHUNK])).float().log_softmax(dim=-1)
        values.append(logp.gather(1, tokens_t[c : c + READ_CHUNK])[:, 0])
    return list(zip(owners, torch.cat(values).tolist()))  # one read back per row
