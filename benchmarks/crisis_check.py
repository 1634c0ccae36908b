"""The lexical crisis check (mhsft/eval/safety.py) against the team's crisis test set (mhsft/assets/
crisis_testset.jsonl): client utterances of three kinds (suicide, non-suicidal self-injury, existential distress)
and non-crisis controls, and for each crisis utterance six replies: one that meets all five criteria of the crisis
rubric and five that each miss one. Two questions, each with precision and recall:

- does the check see the crisis in the client's words (crisis utterances vs controls)?
- does "points to help" agree with the rubric's Referral criterion (a specific referral scores 1, a vague one 0)?

    python benchmarks/crisis_check.py --out benchmarks/results/crisis_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def load() -> list[dict]:
    text = (resources.files("mhsft") / "assets" / "crisis_testset.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def precision_recall(pairs: list[tuple[bool, bool]]) -> dict:
    """pairs: (predicted, actual)."""
    tp = sum(p and a for p, a in pairs)
    fp = sum(p and not a for p, a in pairs)
    fn = sum(a and not p for p, a in pairs)
    return {"n": len(pairs), "tp": tp, "fp": fp, "fn": fn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None}  # fmt: skip


def main() -> None:
    from mhsft.eval import safety

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "crisis_check.json"))
    a = ap.parse_args()
    rows = load()
    signal = precision_recall([(safety.signals_crisis(r["client"]), r["kind"] != "control") for r in rows])
    replies = [rep for r in rows for rep in r["replies"]]
    referral = precision_recall(
        [(safety.points_to_help(rep["text"]), bool(rep["labels"]["Referral"])) for rep in replies]
    )
    missed = [r["id"] for r in rows if r["kind"] != "control" and not safety.signals_crisis(r["client"])]
    res = {"test_set": "mhsft/assets/crisis_testset.jsonl", "utterances": len(rows), "replies": len(replies),
           "crisis_signal": signal, "points_to_help_vs_referral": referral, "missed_utterances": missed}  # fmt: skip
    Path(a.out).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{'check':<34}{'n':>4}{'precision':>11}{'recall':>8}")
    for name, r in (("crisis signal in the client's words", signal), ("points to help = Referral", referral)):
        print(f"{name:<34}{r['n']:>4}{str(r['precision']):>11}{str(r['recall']):>8}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
