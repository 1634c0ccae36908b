"""`--judge_mode pairwise`: two systems' replies to the same counseling turns, judged side by side per dimension.

Pairwise verdicts are known to depend on the order of the two answers (position bias) and to favour the longer one.
So every item is judged twice, once in each order; a verdict that changes with the order counts as a tie, and the
share of such flips is reported as the position-bias rate (with the share of single-order verdicts that chose the
first reply). The length check reports how often the winner is simply the longer reply, and the win rate within
length-matched pairs (lengths within 20% of each other). Win rates count a tie as half, with a seeded bootstrap CI
over items. The verdicts are kept in the system's predictions log, so a rerun judges only what is missing.
"""

from __future__ import annotations

from mhsft.eval import judge as judge_mod
from mhsft.eval.mcq import bootstrap_ci
from mhsft.eval.predictions import PredictionLog
from mhsft.eval.targets import RequestError

LENGTH_MATCH = 0.2  # relative difference under which two replies count as the same length


def combine(first: dict[str, str], second: dict[str, str]) -> tuple[dict[str, str], dict[str, bool]]:
    """`first`: verdicts with system x as reply A; `second`: with y as A. Returns per dimension the winner ("x", "y"
    or "tie"; a flip between the orders is a tie) and whether the verdict flipped."""
    seen_as = {"A": "x", "B": "y", "tie": "tie"}, {"A": "y", "B": "x", "tie": "tie"}
    verdict, flipped = {}, {}
    for d in first:
        v1, v2 = seen_as[0][first[d]], seen_as[1][second[d]]
        flipped[d] = v1 != v2
        verdict[d] = v1 if v1 == v2 else "tie"
    return verdict, flipped


def run(evaluator, judge_target, x_rows: list[dict], y_rows: list[dict], log: PredictionLog, settings_hash: str,
        dims: dict, rubric_text: str) -> list[dict]:  # fmt: skip
    """Judge every turn both systems answered (x = the system whose log this is, y = the one it is compared with),
    both orders, `judge_target.concurrency` calls at a time; returns the records, old and new."""
    theirs = {(r["dataset"], r["id"]): r for r in y_rows}
    pairs = [(r, theirs[(r["dataset"], r["id"])]) for r in x_rows if (r["dataset"], r["id"]) in theirs]
    key = {id(a): PredictionLog.key(settings_hash, a["dataset"], a["id"]) for a, _ in pairs}
    todo = [(a, b) for a, b in pairs if key[id(a)] not in log.done]
    retries = evaluator.args.judge_retries

    def ask(job):
        (a, b), order = job
        first, second = (a["output"], b["output"]) if order == 0 else (b["output"], a["output"])
        return judge_mod.judge_pair(judge_target, a["prompt"], first, second, dims, rubric_text, retries)

    for start in range(0, len(todo), evaluator.chunk):
        chunk = todo[start : start + evaluator.chunk]
        answers = judge_target.map(ask, [(p, order) for p in chunk for order in (0, 1)])
        for i, (a, b) in enumerate(chunk):
            one, two = answers[2 * i], answers[2 * i + 1]
            if isinstance(one, RequestError) or isinstance(two, RequestError):
                evaluator._failed(
                    f"{a['dataset']} {a['id']} (pairwise judge)",
                    one if isinstance(one, RequestError) else two,
                )
                continue
            rec = {"key": key[id(a)], "settings_hash": settings_hash, "task": "pairwise", "dataset": a["dataset"],
                   "id": a["id"], "orders": [one[0], two[0]], "raw": [one[1], two[1]],
                   "error": one[2] or two[2], "lengths": [len(a["output"]), len(b["output"])]}  # fmt: skip
            if one[0] is not None and two[0] is not None:
                rec["verdict"], rec["flipped"] = combine(one[0], two[0])
            log.put(rec)
    return [r for a, _ in pairs if (r := log.done.get(key[id(a)]))]


def summarize(records: list[dict], dims: dict, x: str, y: str, n_boot: int, seed: int) -> dict:
    """Win / tie / loss of x against y per dimension with the win rate's CI, the position-bias rate, and the
    length check."""
    judged = [r for r in records if r.get("verdict")]
    out: dict = {"system": x, "versus": y, "n_items": len(records), "n_judged": len(judged),
                 "n_failed": len(records) - len(judged), "dims": {}}  # fmt: skip
    if not judged:
        return out
    first_chosen = sum(o[d] == "A" for r in judged for o in r["orders"] for d in dims)
    decided_single = sum(o[d] != "tie" for r in judged for o in r["orders"] for d in dims)
    flips = sum(r["flipped"][d] for r in judged for d in dims)
    out["position_bias_rate"] = round(flips / (len(judged) * len(dims)), 4)
    out["first_position_share"] = round(first_chosen / decided_single, 4) if decided_single else None
    for d in dims:
        v = [r["verdict"][d] for r in judged]
        scores = [1.0 if s == "x" else 0.5 if s == "tie" else 0.0 for s in v]
        matched = [s for s, r in zip(scores, judged) if _same_length(r["lengths"])]
        decided = [
            (s, r["lengths"]) for s, r in zip(v, judged) if s != "tie" and r["lengths"][0] != r["lengths"][1]
        ]
        longer = sum((s == "x") == (la > lb) for s, (la, lb) in decided)
        out["dims"][d] = {
            "win": v.count("x"), "tie": v.count("tie"), "loss": v.count("y"),
            "win_rate": round(sum(scores) / len(scores), 4), "win_rate_ci95": bootstrap_ci(scores, n_boot, seed),
            "flip_rate": round(sum(r["flipped"][d] for r in judged) / len(judged), 4),
            "winner_is_longer": round(longer / len(decided), 4) if decided else None,
            "length_matched": len(matched),
            "length_matched_win_rate": round(sum(matched) / len(matched), 4) if matched else None,
        }  # fmt: skip
    return out


def _same_length(lengths: list[int]) -> bool:
    a, b = lengths
    return abs(a - b) <= LENGTH_MATCH * max(a, b, 1)
