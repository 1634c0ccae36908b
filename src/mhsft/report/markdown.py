"""report.md: the report's contents as Markdown, for a paper draft or a repository."""

from __future__ import annotations

import datetime
from pathlib import Path

from mhsft.files import write_text
from mhsft.report.contents import (
    Report,
    data_rows,
    fmt_ci,
    fmt_delta,
    fmt_value,
    judge_rows,
    review_rows,
    settings_rows,
)


def write_markdown(rep: Report, figures: dict[str, str], out: Path, title: str) -> Path:
    L = [f"# {title}", "", f"_Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by mhsft report._", ""]
    if rep.warnings:
        L += ["## Warnings", ""] + [f"- **{s}**: {t}" for s, t in rep.warnings] + [""]
    L += ["## Settings", "", "| setting | value |", "|---|---|"]
    L += [f"| {_md(k)} | {_md(v)} |" for k, v in settings_rows(rep)] + [""]
    if dr := data_rows(rep):
        L += (
            ["## Data", "", "| statistic | value |", "|---|---|"]
            + [f"| {_md(k)} | {_md(v)} |" for k, v in dr]
            + [""]
        )
    if "curves" in figures:
        L += ["## Training", "", f"![training curves]({figures['curves']})", ""]
    if rep.comparison:
        L += evaluation_markdown(rep, figures)
    L += samples_markdown(rep)
    L += pairwise_markdown(rep)
    L += review_markdown(rep)
    L += safety_markdown(rep)
    path = out / "report.md"
    write_text(path, "\n".join(L))
    return path


def evaluation_markdown(rep: Report, figures: dict[str, str]) -> list[str]:
    """The comparison table (values with CIs, deltas against the baseline) and its figures."""
    names = [e.name for e in rep.evals]
    L = ["## Evaluation", ""]
    base = rep.baseline.name if rep.baseline else None
    others = [n for n in names if n != base]
    head = ["dataset", "metric", "n"] + [f"{n}" for n in names] + [f"Δ {n} vs {base}" for n in others if base]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rep.comparison:
        n = next((v["n"] for v in row["values"].values() if v.get("n")), "")
        cells = [row["dataset"], row["label"], str(n)]
        for nm in names:
            v = row["values"].get(nm)
            cells.append(
                f"{fmt_value(v['value'], row['fmt'])} {fmt_ci(v['ci'], row['fmt'])}".strip() if v else ""
            )
        if base:
            cells += [fmt_delta(row["deltas"].get(nm, {}), row["fmt"]) for nm in others]
        L.append("| " + " | ".join(_md(c) for c in cells) + " |")
    L += [
        "",
        "Values with 95% bootstrap CIs; deltas with paired bootstrap 95% CIs over the items both answered "
        "(pt = percentage points).",
        "",
    ]
    for key in ("subjects", "radar"):
        if key in figures:
            L += [f"![{key}]({figures[key]})", ""]
    return L


def samples_markdown(rep: Report) -> list[str]:
    if not rep.samples:
        return []
    L = ["## Sample replies", ""]
    for s in rep.samples:
        L += [
            f"### {s['dataset']} {s['id']}" + (f" (crisis signal: {s['crisis']})" if s["crisis"] else ""),
            "",
        ]
        L += [
            f"> **{'client' if r == 'user' else 'counselor'}**: {_md(t, pipe=False)}" for r, t in s["context"]
        ]
        L += ["", f"- **reference**: {_md(s['reference'], pipe=False)}"]
        L += [f"- **{n}**: {_md(v['text'], pipe=False)}" for n, v in s["replies"].items()] + [""]
    return L


def safety_markdown(rep: Report) -> list[str]:
    L = ["## Crisis safety", ""]
    if rep.safety:
        L += [
            f"- {f['eval']} / {f['dataset']} {f['id']} ({f['signal']}): client: {_md(f['client'], pipe=False)} — "
            f"reply: {_md(f['reply'], pipe=False)}"
            for f in rep.safety
        ]
    else:
        n = sum(
            (m.get("counseling") or {}).get("safety", {}).get("n_crisis_turns", 0)
            for e in rep.evals
            for m in e.results.get("metrics", {}).values()
        )
        L.append(
            f"No failures ({n} crisis turns checked)." if n else "No crisis turn in the evaluation sets."
        )
    return [*L, ""]


def pairwise_markdown(rep: Report) -> list[str]:
    tables = judge_rows(rep)
    if not tables:
        return []
    L = ["## Pairwise judge", ""]
    for title, head, rows in tables:
        L += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        L += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows] + [""]
    return L


def review_markdown(rep: Report) -> list[str]:
    rv = rep.review
    if rv is None:
        return []
    L = ["## Human review", "", f"Study `{rv['study']}`: {rv['ratings']} of {rv['assignments']} ratings by "
         f"{len(rv['raters'])} raters over {rv['items']} items (blind, sides at random).", ""]  # fmt: skip
    if not rv["ratings"]:
        return L + ["No ratings yet.", ""]
    head, rows, phead, prows = review_rows(rep)
    for h, rs in ((head, rows), (phead, prows)):
        L += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)] + [
            "| " + " | ".join(_md(c) for c in r) + " |" for r in rs
        ]
        L.append("")
    if rv.get("bradley_terry"):
        L += [
            "Bradley-Terry strengths: " + ", ".join(f"{s} {v:+.2f}" for s, v in rv["bradley_terry"].items()),
            "",
        ]
    L += [f"- judge on {d}: {t}" for d, t in rv.get("judge_trust", {}).items()] + [""]
    L += [f"- flagged unsafe by {u['rater']}: {u['dataset']} `{u['item']}` ({u['system']}) {_md(u['comment'], pipe=False)}"
          for u in rv["unsafe"]]  # fmt: skip
    return L + [
        "",
        "Alpha: Krippendorff's, ordinal; below 0.667 the raters do not agree enough for conclusions.",
        "",
    ]


def _md(s, pipe: bool = True) -> str:
    s = str(s).replace("\n", " ")
    return s.replace("|", "\\|") if pipe else s
