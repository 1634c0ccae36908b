"""`mhsft review stats` and `export`: what the raters said, per system, and how far to trust it.

- per system and dimension: the mean score with a seeded bootstrap 95% CI over the rated replies;
- per pair of systems: wins, ties, losses and "both unacceptable" from the overall preference, the win rate (a tie
  counts half) with its bootstrap CI; Bradley-Terry strengths (the `choix` library) with more than two systems;
- inter-rater agreement per dimension: Krippendorff's alpha, ordinal (the `krippendorff` library), over replies
  rated by two or more raters; alpha < 0.667 is below what Krippendorff accepts for tentative conclusions;
- judge vs humans, where the eval runs carried judge scores: per dimension Spearman's rho between the judge's score
  and the raters' mean (scipy), and alpha with the judge as one more rater, next to the raters' own alpha;
- the replies a rater flagged as unsafe, by item.

Systems are named here (and in `mhsft report`), never on the raters' pages.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections import defaultdict

import sqlalchemy as sa

from mhsft.eval.agreement import ALPHA_OK, alpha
from mhsft.eval.mcq import bootstrap_ci
from mhsft.review import store


def rating_rows(engine) -> list[dict]:
    """One row per rating and side: item, rater, system, its scores, the preference as seen from that side."""
    a, r, it, rep, sy, ra = (
        store.assignments,
        store.ratings,
        store.items,
        store.replies,
        store.systems,
        store.raters,
    )
    left, right = rep.alias("left"), rep.alias("right")
    lsys, rsys = sy.alias("lsys"), sy.alias("rsys")
    q = (sa.select(it.c.key, it.c.dataset, it.c.crisis, ra.c.name.label("rater"), lsys.c.name.label("left_system"),
                   rsys.c.name.label("right_system"), left.c.judge.label("left_judge"), right.c.judge.label("right_judge"),
                   r.c.left_scores, r.c.right_scores, r.c.preference, r.c.unsafe_left, r.c.unsafe_right, r.c.comment,
                   r.c.submitted, r.c.seconds)
         .select_from(r.join(a, a.c.id == r.c.assignment_id).join(it, it.c.id == a.c.item_id)
                      .join(ra, ra.c.id == a.c.rater_id).join(left, left.c.id == a.c.left_id)
                      .join(right, right.c.id == a.c.right_id).join(lsys, lsys.c.id == left.c.system_id)
                      .join(rsys, rsys.c.id == right.c.system_id))
         .order_by(it.c.key, ra.c.name))  # fmt: skip
    out = []
    with store.transaction(engine, "reading the ratings") as conn:
        for x in conn.execute(q):
            for side, other in (("left", "right"), ("right", "left")):
                pref = (
                    x.preference
                    if x.preference in ("tie", "neither")
                    else ("win" if x.preference == side else "loss")
                )
                out.append({"item": x.key, "dataset": x.dataset, "crisis": x.crisis, "rater": x.rater,
                            "system": getattr(x, f"{side}_system"), "versus": getattr(x, f"{other}_system"),
                            "side": side, "scores": json.loads(getattr(x, f"{side}_scores")),
                            "judge": json.loads(getattr(x, f"{side}_judge") or "null"), "preference": pref,
                            "unsafe": bool(getattr(x, f"unsafe_{side}")), "comment": x.comment,
                            "submitted": x.submitted, "seconds": x.seconds})  # fmt: skip
    return out


def compute(engine, settings: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    rows = rating_rows(engine)
    dims = list(settings["dims"])
    with store.transaction(engine, "reading the study") as conn:
        systems = [s for (s,) in conn.execute(sa.select(store.systems.c.name).order_by(store.systems.c.id))]
        n_items = conn.execute(sa.select(sa.func.count()).select_from(store.items)).scalar_one()
        n_assign = conn.execute(sa.select(sa.func.count()).select_from(store.assignments)).scalar_one()
    out = {"systems": systems, "dims": dims, "items": n_items, "assignments": n_assign, "ratings": len(rows) // 2,
           "raters": sorted({r["rater"] for r in rows})}  # fmt: skip
    if not rows:
        return out
    out["scores"] = _scores(rows, systems, dims, n_boot, seed)
    out["judge_means"] = _judge_means(rows, systems, dims)
    out["pairwise"] = _pairwise(rows, systems, n_boot, seed)
    if len(systems) > 2:
        out["bradley_terry"] = _bradley_terry(rows, systems)
    out["agreement"] = {d: _agreement(rows, d) for d in dims}
    out["judge_vs_human"] = {d: _judge_vs_human(rows, d) for d in dims}
    out["judge_trust"] = {
        d: trust(out["agreement"][d]["alpha"], out["judge_vs_human"][d]["alpha_with_judge"]) for d in dims
    }
    out["unsafe"] = [
        {k: r[k] for k in ("item", "dataset", "system", "rater", "comment")} for r in rows if r["unsafe"]
    ]
    low = [d for d, g in out["agreement"].items() if g["alpha"] is not None and g["alpha"] < ALPHA_OK]
    out["warnings"] = [f"inter-rater agreement on {d} is low (Krippendorff's alpha {out['agreement'][d]['alpha']:.2f}"
                       f" < {ALPHA_OK}): its means are not yet a basis for conclusions" for d in low]  # fmt: skip
    return out


def _scores(rows, systems, dims, n_boot, seed) -> dict:
    out: dict = {}
    for s in systems:
        mine = [r for r in rows if r["system"] == s]
        out[s] = {}
        for d in dims:
            vals = [float(r["scores"][d]) for r in mine if d in r["scores"]]
            mean = round(sum(vals) / len(vals), 4) if vals else None
            out[s][d] = {"mean": mean, "ci95": bootstrap_ci(vals, n_boot, seed), "n": len(vals)}
    return out


def _judge_means(rows, systems, dims) -> dict:
    """The judge's mean score per system and dimension over the replies the raters rated (None without a judge)."""
    out: dict = {}
    for s in systems:
        seen = {r["item"]: r["judge"] for r in rows if r["system"] == s and r["judge"]}
        out[s] = {d: (round(sum(v) / len(v), 4) if (v := [float(j[d]) for j in seen.values() if d in j]) else None)
                  for d in dims}  # fmt: skip
    return out


def _pairwise(rows, systems, n_boot, seed) -> list[dict]:
    out = []
    for a, b in itertools.combinations(systems, 2):
        prefs = [r["preference"] for r in rows if r["system"] == a and r["versus"] == b]
        counts = {k: prefs.count(k) for k in ("win", "tie", "loss", "neither")}
        decided = [1.0 if p == "win" else 0.5 if p == "tie" else 0.0 for p in prefs if p != "neither"]
        rate = round(sum(decided) / len(decided), 4) if decided else None
        out.append({"system": a, "versus": b, **counts, "n": len(prefs), "win_rate": rate,
                    "win_rate_ci95": bootstrap_ci(decided, n_boot, seed)})  # fmt: skip
    return out


def _bradley_terry(rows, systems) -> dict[str, float]:
    """Strengths (log scale, mean 0) from the pairwise preferences; a tie counts as a win each way."""
    import choix  # deferred: only studies of three or more systems need it

    idx = {s: i for i, s in enumerate(systems)}
    data = []
    for r in rows:
        if r["side"] != "left" or r["preference"] == "neither":
            continue  # each rating once (its left side), "both unacceptable" says nothing about the order
        a, b = idx[r["system"]], idx[r["versus"]]
        data += {"win": [(a, b)], "loss": [(b, a)], "tie": [(a, b), (b, a)]}[r["preference"]]
    params = choix.ilsr_pairwise(len(systems), data, alpha=0.01)
    return {s: round(float(params[idx[s]]), 4) for s in systems}


def trust(human: float | None, with_judge: float | None) -> str:
    """In words, whether the judge can stand in for the raters on a dimension: its agreement with them (alpha with
    the judge as one more rater) must reach Krippendorff's threshold and come within 0.1 of the raters' own."""
    if human is None or with_judge is None:
        return "unknown: too few replies both judged and rated twice"
    if human < ALPHA_OK:
        return f"unknown: the raters themselves disagree (alpha {human:.2f})"
    if with_judge >= ALPHA_OK and with_judge >= human - 0.1:
        return f"trusted: the judge agrees with the raters about as well as they agree with each other ({with_judge:.2f} vs {human:.2f})"
    return f"not trusted: the judge agrees with the raters less than they agree with each other ({with_judge:.2f} vs {human:.2f})"


def _reliability(rows, dim, extra: dict | None = None):
    """Raters x units (a unit: one item's reply of one system) matrix for Krippendorff's alpha; `extra` adds one
    more coder (the judge): {unit: score}."""
    raters = sorted({r["rater"] for r in rows})
    units = sorted({(r["item"], r["system"]) for r in rows if dim in r["scores"]})
    col = {u: j for j, u in enumerate(units)}
    m = [[math.nan] * len(units) for _ in raters]
    for r in rows:
        if dim in r["scores"]:
            m[raters.index(r["rater"])][col[(r["item"], r["system"])]] = float(r["scores"][dim])
    if extra is not None:
        m.append([float(extra[u]) if u in extra else math.nan for u in units])
    return m, units


def _agreement(rows, dim) -> dict:
    matrix, units = _reliability(rows, dim)
    twice = sum(sum(not math.isnan(m[j]) for m in matrix) >= 2 for j in range(len(units)))
    return {"alpha": alpha(matrix), "units_rated_twice": twice}


def _judge_vs_human(rows, dim) -> dict:
    from scipy.stats import spearmanr

    judge = {(r["item"], r["system"]): r["judge"][dim] for r in rows if r["judge"] and dim in r["judge"]}
    human = defaultdict(list)
    for r in rows:
        if dim in r["scores"]:
            human[(r["item"], r["system"])].append(float(r["scores"][dim]))
    units = [u for u in judge if u in human]
    if len(units) < 3:
        return {"n": len(units), "spearman": None, "alpha_with_judge": None}
    j, h = [judge[u] for u in units], [sum(human[u]) / len(human[u]) for u in units]
    rho = spearmanr(j, h).statistic if len(set(j)) > 1 and len(set(h)) > 1 else None  # constant: undefined
    matrix, _ = _reliability(rows, dim, extra=judge)
    rho = None if rho is None else round(float(rho), 4)
    return {"n": len(units), "spearman": rho, "alpha_with_judge": alpha(matrix)}


EXPORT_FIELDS = ("item", "dataset", "crisis", "rater", "system", "versus", "side", "preference", "unsafe", "comment",
                 "submitted", "seconds")  # fmt: skip


def export(engine, settings: dict, fmt: str) -> str:
    """Every rating, one row per rated reply: JSONL or CSV (one column per dimension)."""
    rows = rating_rows(engine)
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    dims = list(settings["dims"])
    w = csv.writer(buf)
    w.writerow([*EXPORT_FIELDS, *dims, *(f"judge_{d}" for d in dims)])
    for r in rows:
        judge = r["judge"] or {}
        w.writerow(
            [r[k] for k in EXPORT_FIELDS] + [r["scores"].get(d) for d in dims] + [judge.get(d) for d in dims]
        )
    return buf.getvalue()
