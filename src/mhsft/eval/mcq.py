"""Exam multiple choice: prompts, scoring by log-likelihood or by generation + answer extraction, and metrics.

Standard accuracy is an exact match of the answered option set with the gold set. Elastic accuracy gives partial
credit on multiple-answer questions (ELASTIC_FORMULA). Single-answer questions score the same under both.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

from mhsft.eval.datasets import MCQItem

PROMPT_VERSION = 1
HEADERS = {
    "single": "以下是心理学考试的单项选择题，请选出唯一正确的答案。",
    "multi": "以下是心理学考试的多项选择题，请选出所有正确的答案。",
}
GEN_INSTRUCTIONS = {
    "single": "请直接给出答案，格式为“答案：选项字母”，例如“答案：B”。",
    "multi": "请给出所有正确选项，字母连写，格式为“答案：选项字母”，例如“答案：AC”。",
}
ANSWER_CUE = "答案："
# lm-eval's default target_delimiter: the continuation scored after "答案：" is " A" (as lm-eval's C-Eval/CMMLU do).
TARGET_DELIMITER = " "
ELASTIC_FORMULA = (
    "elastic = 1 if pred == gold; |pred|/|gold| if pred is a non-empty strict subset of gold; "
    "0 if pred contains any wrong option or is empty"
)


# ---------------------------------------------------------------------------------------------------------
# Prompts


def format_question(item: MCQItem) -> str:
    return item.question + "\n" + "\n".join(f"{k}. {v}" for k, v in item.options.items())


def loglikelihood_context(item: MCQItem, shots: list[MCQItem]) -> str:
    """Completion-style prompt ending in `答案：`; each exemplar is followed by its answer."""
    parts = [HEADERS[item.qtype]]
    parts += [f"{format_question(s)}\n{ANSWER_CUE}{TARGET_DELIMITER}{s.answer}" for s in shots]
    parts.append(f"{format_question(item)}\n{ANSWER_CUE}")
    return "\n\n".join(parts)


def generation_messages(item: MCQItem, shots: list[MCQItem], system: str | None = None) -> list[dict]:
    """Chat messages; exemplars are earlier user/assistant turns answered as `答案：X`."""
    msgs = [{"role": "system", "content": system}] if system else []

    def ask(it: MCQItem) -> str:
        return f"{HEADERS[it.qtype]}\n\n{format_question(it)}\n\n{GEN_INSTRUCTIONS[it.qtype]}"

    for s in shots:
        msgs += [{"role": "user", "content": ask(s)}, {"role": "assistant", "content": ANSWER_CUE + s.answer}]
    msgs.append({"role": "user", "content": ask(item)})
    return msgs


def pick_fewshot(item: MCQItem, pool: list[MCQItem], k: int, seed: int) -> list[MCQItem]:
    """k exemplars from the pool (never the item itself or one with the same question text), preferring the
    same subject and question type; deterministic per item."""
    if k <= 0 or not pool:
        return []
    cands = [p for p in pool if p.id != item.id and p.question != item.question]
    rng = random.Random(f"{seed}:{item.dataset}:{item.id}")
    ranked: list[MCQItem] = []
    for tier in (
        lambda p: p.subject == item.subject and p.multi == item.multi,
        lambda p: p.multi == item.multi,
        lambda p: True,
    ):
        group = [p for p in cands if tier(p) and p not in ranked]
        rng.shuffle(group)
        ranked += group
        if len(ranked) >= k:
            break
    return ranked[:k]


# ---------------------------------------------------------------------------------------------------------
# Answer extraction

_FULLWIDTH = str.maketrans(
    {chr(0xFF21 + i): chr(0x41 + i) for i in range(26)} | {chr(0xFF41 + i): chr(0x61 + i) for i in range(26)}
)
# A group of option letters: "B", "BC", "A、C", "B和C", "A, C, D" (never inside a Latin word).
_GROUP = r"(?<![A-Za-z])([A-J](?:\s*(?:[、,，/和与及]|以及)?\s*[A-J])*)(?![A-Za-z])"
_CUE_RES = [
    re.compile(
        r"(?:正确答案|最终答案|答案|正确选项|answer)(?:\s+is)?\s*(?:应该|应当|应)?\s*(?:是|为|选)?\s*[:：]?\s*[\(（\[【]?\s*"
        + _GROUP,
        re.I,
    ),
    re.compile(r"(?:应该|应当|应)?选(?:择|项)?\s*[:：]?\s*[\(（\[【]?\s*" + _GROUP),
]
_ONLY_RE = re.compile(r"^[\s\(（\[【“\"']*" + _GROUP + r"[\s\)）\]】”\"'.。,，、!！项]*$")
_LEAD_RE = re.compile(r"^\s*[\(（\[【]?\s*" + _GROUP + r"\s*[\)）\]】.．、:：]")
_THINK_RE = re.compile(r"<think>.*?</think>", re.S)


def _letters(group: str) -> str:
    return "".join(sorted(set(re.findall(r"[A-J]", group))))


def extract_answer(text: str, options: dict[str, str], multi: bool) -> str | None:
    """The option letters a free-text answer gives, sorted ("B", "AC"), or None when none can be read.

    Tried in order: the last `答案：B` / `答案是A、C` / `正确选项为B和C` cue; `选B` / `应选择BC`; a reply that is
    only letters (`BC`, `A、C`, `(B)`); a leading `B.` / `(B)`; the text of one option restated (single answer)
    or of several (multiple answer). Reasoning inside <think>...</think> is ignored."""
    t = _THINK_RE.sub("", text or "").translate(_FULLWIDTH).strip()
    if not t:
        return None
    for rx in _CUE_RES:
        hits = list(rx.finditer(t))
        if hits:
            return _letters(hits[-1].group(1))
    for rx in (_ONLY_RE, _LEAD_RE):
        m = rx.match(t)
        if m:
            return _letters(m.group(1))
    found = [k for k, v in options.items() if len(v) >= 2 and v in t]
    # an option that is part of another found option ("焦虑" in "焦虑症") does not count on its own
    found = [k for k in found if not any(k != o and options[k] in options[o] for o in found)]
    if found and (multi or len(found) == 1):
        return "".join(sorted(found))
    return None


def score(pred: str | None, gold: str) -> tuple[float, float]:
    """(exact, elastic) for a predicted letter set against the gold set."""
    p, g = set(pred or ""), set(gold)
    if not p:
        return 0.0, 0.0
    if p == g:
        return 1.0, 1.0
    if p < g:
        return 0.0, len(p) / len(g)
    return 0.0, 0.0


def pick_by_loglikelihood(letters: list[str], logprobs: list[float]) -> str:
    best = max(range(len(letters)), key=lambda i: logprobs[i])  # first of equals, as argmax does
    return letters[best]


# ---------------------------------------------------------------------------------------------------------
# Metrics


def bootstrap_ci(
    values: list[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap confidence interval of the mean (None for fewer than 2 values)."""
    import numpy as np

    if len(values) < 2 or n_boot <= 0:
        return None
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def summarize(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of scored MCQ prediction rows (each with exact, elastic, invalid, qtype, subject, kind, method)."""
    if not rows:
        return {}
    exact = [r["exact"] for r in rows]
    elastic = [r["elastic"] for r in rows]
    gen_rows = [r for r in rows if r["method"] == "generation"]
    out = {
        "n": len(rows),
        "accuracy": _mean(exact),
        "accuracy_ci95": bootstrap_ci(exact, n_boot, seed),
        "elastic_accuracy": _mean(elastic),
        "elastic_accuracy_ci95": bootstrap_ci(elastic, n_boot, seed),
        "invalid_rate": _mean([float(r["invalid"]) for r in gen_rows]) if gen_rows else None,
        "num_invalid": sum(bool(r["invalid"]) for r in gen_rows),
        "elastic_formula": ELASTIC_FORMULA,
    }
    for key in ("qtype", "kind", "subject", "method"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            groups[r.get(key) or "-"].append(r)
        if len(groups) > 1 or key in ("qtype", "method"):
            out[f"by_{key}"] = {
                g: {
                    "n": len(rs),
                    "accuracy": _mean([r["exact"] for r in rs]),
                    "elastic_accuracy": _mean([r["elastic"] for r in rs]),
                }
                for g, rs in sorted(groups.items())
            }
    return out
