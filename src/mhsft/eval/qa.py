"""Open-question metrics: ROUGE (rouge-chinese) on jieba words and on characters, BLEU-4 (sacrebleu's zh
tokenizer), and the key-point hit rate. Each number is reported with the tokenization it was computed on.

Several references per question (PsyQA's answers): ROUGE takes, per metric, the best-matching reference (as
Google's rouge-score `score_multi` does; rouge-chinese compares one pair at a time), BLEU uses them all as
sacrebleu's multiple reference streams (a question with fewer references gets None in the others)."""

from __future__ import annotations

import logging
import unicodedata

from mhsft.eval.mcq import bootstrap_ci

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
WORDS = "jieba words (rouge-chinese)"
CHARS = "characters (rouge-chinese)"
BLEU_TOKENIZATION = "sacrebleu corpus BLEU-4, tokenize=zh (0-100)"
KEYPOINT_RULE = (
    "lexical: with whitespace and punctuation removed, a key point is hit when it appears in the answer verbatim "
    "or when at least half of its character bigrams appear in the answer"
)
KEYPOINT_BIGRAM_SHARE = 0.5


def words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(text) if w.strip()]


def chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def rouge_f(hyp_tokens: list[str], ref_tokens: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 as rouge-chinese computes them on these tokens (0 when either side is empty: rouge-chinese
    refuses an empty hypothesis)."""
    from rouge_chinese import Rouge

    if not hyp_tokens or not ref_tokens:
        return dict.fromkeys(ROUGE_KEYS, 0.0)
    scores = Rouge().get_scores(" ".join(hyp_tokens), " ".join(ref_tokens))[0]
    return {k: float(scores[k]["f"]) for k in ROUGE_KEYS}


MULTI_REFERENCE_RULE = (
    "ROUGE: the best-matching reference per metric; BLEU: all references (sacrebleu streams)"
)


def bleu4(hyps: list[str], refs: list[str] | list[list[str]]) -> float:
    """Corpus BLEU-4; `refs` holds one reference per hypothesis, or a list of references per hypothesis."""
    import sacrebleu

    if not hyps:
        return 0.0
    per_hyp = [r if isinstance(r, list) else [r] for r in refs]
    width = max(len(r) for r in per_hyp)
    streams = [[r[k] if k < len(r) else None for r in per_hyp] for k in range(width)]
    return float(sacrebleu.corpus_bleu(hyps, streams, tokenize="zh").score)


def _norm(s: str) -> str:
    return "".join(c for c in s if not c.isspace() and unicodedata.category(c)[0] not in "PS")


def _bigrams(s: str) -> set[str]:
    return {s[i : i + 2] for i in range(len(s) - 1)}


def keypoint_hits(answer: str, key_points: list[str]) -> list[bool]:
    """Which key points the answer covers, by KEYPOINT_RULE."""
    a = _norm(answer)
    ab = _bigrams(a)
    out = []
    for kp in key_points:
        k = _norm(kp)
        if not k:
            out.append(False)
        elif k in a:
            out.append(True)
        else:
            kb = _bigrams(k)
            out.append(bool(kb) and len(kb & ab) / len(kb) >= KEYPOINT_BIGRAM_SHARE)
    return out


def score_answer(answer: str, reference: str | list[str]) -> dict:
    """Per-item ROUGE on words and characters; against several references, each metric's best."""
    refs = [reference] if isinstance(reference, str) else reference
    out: dict[str, float] = {}
    for suffix, tok in (("words", words), ("chars", chars)):
        hyp = tok(answer)
        for ref in refs:
            for k, v in rouge_f(hyp, tok(ref)).items():
                key = f"{k}_{suffix}"
                out[key] = max(out.get(key, 0.0), round(v, 6))
    return out


def summarize(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of QA prediction rows (each with output, reference, the per-item ROUGE and key-point hits)."""
    if not rows:
        return {}
    out: dict = {"n": len(rows)}
    for suffix, name in (("words", WORDS), ("chars", CHARS)):
        block: dict = {"tokenization": name}
        for k in ROUGE_KEYS:
            vals = [r[f"{k}_{suffix}"] for r in rows]
            block[k] = round(sum(vals) / len(vals), 4)
            block[f"{k}_ci95"] = bootstrap_ci(vals, n_boot, seed)
        out[f"rouge_{suffix}"] = block
    out["bleu4"] = {
        "score": round(
            bleu4([r["output"] for r in rows], [r.get("references") or r["reference"] for r in rows]), 4
        ),
        "tokenization": BLEU_TOKENIZATION,
    }
    if any(len(r.get("references") or ()) > 1 for r in rows):
        out["multi_reference"] = MULTI_REFERENCE_RULE
    kp_rows = [r for r in rows if r.get("key_points")]
    if kp_rows:
        per_item = [sum(r["keypoint_hits"]) / len(r["key_points"]) for r in kp_rows]
        block = {
            "n_items": len(kp_rows),
            "n_key_points": sum(len(r["key_points"]) for r in kp_rows),
            "hit_rate": round(sum(per_item) / len(per_item), 4),
            "hit_rate_ci95": bootstrap_ci(per_item, n_boot, seed),
            "matcher": kp_rows[0].get("keypoint_matcher", KEYPOINT_RULE),
        }
        weighted = [r for r in kp_rows if r.get("key_point_weights")]
        if weighted:
            # PCEB essays: the share of the marks (分) whose key points are hit
            got = sum(w for r in weighted for w, h in zip(r["key_point_weights"], r["keypoint_hits"]) if h)
            block["marks_share"] = round(got / sum(w for r in weighted for w in r["key_point_weights"]), 4)
        out["keypoints"] = block
    return out
