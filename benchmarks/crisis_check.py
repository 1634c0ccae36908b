"""The lexical crisis check (mhsft/data/crisis.py; mhsft/eval/safety.py applies it to replies) against the team's crisis test set (mhsft/assets/
crisis_testset.jsonl): client utterances of three kinds (suicide, non-suicidal self-injury, existential distress)
and non-crisis controls, and for each crisis utterance six replies: one that meets all five criteria of the crisis
rubric and five that each miss one. Two questions, each with precision and recall:

- does the check see the crisis in the client's words (crisis utterances vs controls)?
- does "points to help" agree with the rubric's Referral criterion (a specific referral scores 1, a vague one 0)?

And on real dialogues: every client turn of the shared data (EmoLLM, the CPsyCounD sample, CPsyCounE; 8,400 turns)
against `benchmarks/crisis_labels_shared.jsonl`, one engineer's reading (not a clinician's) of every turn the check
flags and of the turns a wide net of words found (死, 结束, 伤害, 割, 药, 绝望, 没有意义, ...): "self" (the client's
own suicide or self-harm risk), "other" (someone else's suicide risk), "none". Every flagged turn must be labelled
(a new pattern's hits are read before its numbers count), and the turns are checked against the labels' hashes.
Recall there is over the crisis turns that net found, not over all 8,400.

    python benchmarks/crisis_check.py --out benchmarks/results/crisis_check.json [--shared_data ../shared/data]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
LABELS = Path(__file__).parent / "crisis_labels_shared.jsonl"
# the shared data's dialogues whose client turns are read (training and evaluation sets)
SOURCES = ("train/emollm_data.json", "train/cpsycound_sample", "eval/cpsycoune")


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


def client_turns(root: Path) -> tuple[list[dict], int]:
    """Every client turn of SOURCES under root, keyed (file, dialogue, turn) as the labels are, with the
    counselor's reply after it; and the number of records the readers rejected (none expected: counted, not
    dropped silently)."""
    from mhsft.data.readers import iter_file, list_data_files
    from mhsft.data.schema import Dialogue

    rows, rejected = [], 0
    for src in SOURCES:
        path = root / src
        for f in list_data_files(path) if path.is_dir() else [path]:
            name = f.relative_to(root).as_posix()
            for i, d in enumerate(iter_file(f)):
                if not isinstance(d, Dialogue):
                    rejected += 1
                    continue
                for j, t in enumerate(d.turns):
                    nxt = d.turns[j + 1] if j + 1 < len(d.turns) else None
                    if t.role == "user":
                        reply = nxt.content if nxt is not None and nxt.role == "assistant" else ""
                        rows.append({"key": (name, i, j), "text": t.content, "reply": reply})
    return rows, rejected


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def shared_data_check(root: Path, labels_path: Path) -> dict:
    """The check on the shared data's client turns against the labels (see the module's docstring)."""
    from mhsft.data import crisis

    lines = labels_path.read_text(encoding="utf-8").splitlines()
    labels = {(r["source"], r["dialogue"], r["turn"]): r for r in map(json.loads, filter(str.strip, lines))}
    turns, rejected = client_turns(root)
    by_key = {t["key"]: t for t in turns}
    stale = [k for k, r in labels.items() if k not in by_key or sha1(by_key[k]["text"]) != r["sha1"]]
    if stale:
        sys.exit(
            f"{labels_path}: {len(stale)} labelled turn(s) missing or changed under {root}, e.g. {stale[0]}"
        )
    flagged = {t["key"] for t in turns if crisis.signals_crisis(t["text"])}
    crises = {k for k, r in labels.items() if r["label"] != "none"}
    name = "{}#{}.{}".format
    return {
        "data": Path(os.path.relpath(root, ROOT)).as_posix(), "sources": list(SOURCES),
        "client_turns": len(turns), "rejected_records": rejected,
        "labelled": len(labels), "labels": dict(Counter(r["label"] for r in labels.values())),
        "flagged": len(flagged),
        "flagged_by_label": dict(Counter(labels[k]["label"] for k in sorted(flagged) if k in labels)),
        "signal": precision_recall([(k in flagged, k in crises) for k in labels]),
        "unlabelled_flags": sorted(name(*k) for k in flagged - labels.keys()),
        "missed": sorted(name(*k) for k in crises - flagged),
        "false_flags": sorted(name(*k) for k in flagged & labels.keys() - crises),
        # how often the dataset's own counselors point to help after a crisis turn
        "reference_replies_pointing_to_help": [sum(crisis.points_to_help(by_key[k]["reply"]) for k in crises),
                                               len(crises)],
    }  # fmt: skip


def main() -> None:
    from mhsft.data import crisis
    from mhsft.files import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "crisis_check.json"))
    ap.add_argument("--shared_data", default=str(ROOT.parent / "shared" / "data"),
                    help="the project's shared data folder (skipped, and said so, when absent)")  # fmt: skip
    ap.add_argument("--labels", default=str(LABELS))
    a = ap.parse_args()
    rows = load()
    signal = precision_recall([(crisis.signals_crisis(r["client"]), r["kind"] != "control") for r in rows])
    replies = [rep for r in rows for rep in r["replies"]]
    referral = precision_recall(
        [(crisis.points_to_help(rep["text"]), bool(rep["labels"]["Referral"])) for rep in replies]
    )
    missed = [r["id"] for r in rows if r["kind"] != "control" and not crisis.signals_crisis(r["client"])]
    res = {"test_set": "mhsft/assets/crisis_testset.jsonl", "utterances": len(rows), "replies": len(replies),
           "crisis_signal": signal, "points_to_help_vs_referral": referral, "missed_utterances": missed}  # fmt: skip
    shared = Path(a.shared_data)
    res["shared_data"] = (
        shared_data_check(shared, Path(a.labels)) if shared.is_dir() else {"skipped": f"no folder {shared}"}
    )
    write_json(a.out, res)
    table = [("crisis signal in the client's words", signal), ("points to help = Referral", referral)]
    if "signal" in res["shared_data"]:
        table.append(("crisis signal, shared data's turns", res["shared_data"]["signal"]))
    print(f"{'check':<36}{'n':>4}{'precision':>11}{'recall':>8}")
    for name, r in table:
        print(f"{name:<36}{r['n']:>4}{str(r['precision']):>11}{str(r['recall']):>8}")
    for what in ("unlabelled_flags", "missed", "false_flags"):
        if res["shared_data"].get(what):
            print(f"shared data, {what.replace('_', ' ')}: {', '.join(res['shared_data'][what])}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
