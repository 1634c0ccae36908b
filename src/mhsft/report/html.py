"""The report's figures (matplotlib, Agg: no display needed) and its self-contained HTML page.

Every figure is written as a PNG under OUTPUT/figures/ (report.md links them) and embedded in report.html as a
base64 data URI, so the page opens offline and can be mailed as one file. Chinese labels need a CJK font: one is
looked for among the installed fonts (Noto CJK, Source Han, WenQuanYi, ...); without one, plot labels fall back to
ASCII names (EmoE, S1, ...) rather than drawing empty boxes, and the tables keep the Chinese text.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
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
    significant,
)

CJK_FONT_NAMES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Noto Serif CJK SC",
    "Noto Serif CJK JP",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Heiti SC",
    "Droid Sans Fallback",
    "AR PL UMing CN",
)
CJK_FILE_RE = re.compile(
    r"(notosanscjk|notoserifcjk|sourcehansans|wqy|simhei|msyh|pingfang|droidsansfallback|uming|ukai)", re.I
)
_CJK_RE = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]")
_font: list = []  # cached result of cjk_font()
COLORS = ("#8c8c8c", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def cjk_font() -> str | None:
    """The name of an installed font with Chinese glyphs, made matplotlib's default sans-serif; None if none.
    Fonts installed after matplotlib built its font cache are found by a scan of the system font folders."""
    if _font:
        return _font[0]
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager, rcParams

    have = {f.name for f in font_manager.fontManager.ttflist}
    name = next((n for n in CJK_FONT_NAMES if n in have), None)
    if name is None:

        def regular_first(path: str) -> tuple:
            n = Path(path).name.lower()
            return ("regular" not in n, "bold" in n or "black" in n, n)

        for path in sorted(font_manager.findSystemFonts(), key=regular_first):
            if CJK_FILE_RE.search(Path(path).name):
                try:
                    font_manager.fontManager.addfont(path)
                    name = font_manager.FontProperties(fname=path).get_name()
                    break
                except (RuntimeError, OSError, ValueError):
                    continue
    if name:
        rcParams["font.sans-serif"] = [name, "DejaVu Sans"]
        rcParams["font.family"] = "sans-serif"
        rcParams["axes.unicode_minus"] = False
    _font.append(name)
    return name


def label(text: str, fallback: str) -> str:
    """`text` when it can be drawn, else the ASCII fallback."""
    return text if not _CJK_RE.search(text) or cjk_font() else fallback


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    cjk_font()
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------- figures
def fig_curves(rows: list[dict]) -> bytes | None:
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "eval_loss" in r]
    if not train and not val:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    panels = (
        (axes[0][0], "loss", [("loss", train, "training"), ("eval_loss", val, "validation")]),
        (axes[0][1], "learning rate", [("lr", train, None)]),
        (axes[1][0], "gradient norm (before clipping)", [("grad_norm", train, None)]),
        (axes[1][1], "tokens / s", [("tokens_per_s", train, None)]),
    )
    for ax, title, series in panels:
        drawn = False
        for key, rs, name in series:
            pts = [(r["step"], r[key]) for r in rs if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3, label=name)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn and any(n for _, _, n in series) and len(series) > 1:
            ax.legend()
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return _png(fig)


def fig_headline(rep: Report) -> bytes | None:
    """The higher-is-better percentages of every dataset, one bar per evaluation with its 95% CI."""
    rows = [r for r in rep.comparison if r["fmt"] == "pct" and r["higher"] and r["key"] != "elastic"]
    rows = [r for r in rows if any(v["value"] is not None for v in r["values"].values())]
    if not rows:
        return None
    plt = _plt()
    names = [e.name for e in rep.evals]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) * max(len(names), 1) + 1.2))
    h = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        ys, xs, err = [], [], [[], []]
        for i, r in enumerate(rows):
            v = r["values"].get(name)
            if not v or v["value"] is None:
                continue
            y = i + (j - (len(names) - 1) / 2) * h
            ys.append(y)
            xs.append(100 * v["value"])
            lo, hi = v["ci"] or (v["value"], v["value"])
            err[0].append(100 * (v["value"] - lo))
            err[1].append(100 * (hi - v["value"]))
        ax.barh(ys, xs, height=h * 0.9, xerr=err, capsize=3, color=COLORS[j % len(COLORS)], label=name)
        for y, x in zip(ys, xs):
            ax.text(x + 1, y, f"{x:.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(
        [
            label(f"{r['dataset']}: {r['label']}", f"{_ascii(r['dataset'])}: {_ascii(r['label'])}")
            for r in rows
        ]
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("% (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)


def subject_groups(rep: Report) -> tuple[str, dict[str, dict[str, float]]]:
    """Multiple-choice accuracy per subject (per question type when no set names subjects): (by, group ->
    evaluation -> accuracy), groups prefixed with their dataset when there are several sets."""
    metrics = [(e.name, ds, m["multiple_choice"]) for e in rep.evals
               for ds, m in e.results.get("metrics", {}).items() if m.get("multiple_choice")]  # fmt: skip
    by = "by_subject" if any("by_subject" in mc for _, _, mc in metrics) else "by_qtype"
    several = len({ds for _, ds, _ in metrics}) > 1
    groups: dict[str, dict[str, float]] = {}
    for name, ds, mc in metrics:
        for g, v in (mc.get(by) or {}).items():
            groups.setdefault(f"{ds}/{g}" if several else g, {})[name] = v["accuracy"]
    return by, dict(sorted(groups.items())[:40])


def fig_subjects(rep: Report) -> tuple[bytes | None, str]:
    by, groups = subject_groups(rep)
    if not groups:
        return None, by
    plt = _plt()
    names = [e.name for e in rep.evals]
    keys = list(groups)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(keys) * max(len(names), 1) + 2), 4.2))
    w = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * w for i in range(len(keys))]
        ax.bar(
            xs,
            [100 * groups[k].get(name, 0) for k in keys],
            width=w * 0.9,
            color=COLORS[j % len(COLORS)],
            label=name,
        )
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(
        [label(k, f"S{i + 1}") for i, k in enumerate(keys)],
        rotation=30 if len(keys) > 4 else 0,
        ha="right" if len(keys) > 4 else "center",
    )
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title("multiple choice by " + ("subject" if by == "by_subject" else "question type"))
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig), by


def radar_data(rep: Report) -> tuple[list[str], list[str], dict[str, list[float]], str]:
    """(dimension keys, their labels, evaluation -> mean scores, dataset) of the first dataset with judged
    counseling replies."""
    for e in rep.evals:
        for ds, m in e.results.get("metrics", {}).items():
            j = (m.get("counseling") or {}).get("judge") or {}
            dims = [k for k, v in j.items() if isinstance(v, dict) and v.get("mean") is not None]
            if len(dims) < 3:
                continue
            labels = [label(f"{k} {j[k]['title']}", k) for k in dims]
            vals = {}
            for e2 in rep.evals:
                j2 = ((e2.results.get("metrics", {}).get(ds) or {}).get("counseling") or {}).get(
                    "judge"
                ) or {}
                if all(isinstance(j2.get(k), dict) and j2[k].get("mean") is not None for k in dims):
                    vals[e2.name] = [j2[k]["mean"] for k in dims]
            return dims, labels, vals, ds
    return [], [], {}, ""


def fig_radar(rep: Report) -> bytes | None:
    dims, labels, vals, ds = radar_data(rep)
    if not vals:
        return None
    plt = _plt()
    angles = [2 * math.pi * i / len(dims) for i in range(len(dims))]
    fig = plt.figure(figsize=(6, 5.5))
    ax = fig.add_subplot(111, polar=True)
    names = [e.name for e in rep.evals]
    for name, v in vals.items():
        c = COLORS[names.index(name) % len(COLORS)]
        ax.plot(angles + angles[:1], v + v[:1], color=c, label=name)
        ax.fill(angles + angles[:1], v + v[:1], color=c, alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels(labels)
    ax.set_ylim(0, 5)
    ax.set_title(
        label(f"counseling dimensions ({ds}, judge, 1-5)", f"counseling dimensions ({_ascii(ds)}, 1-5)")
    )
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1))
    return _png(fig)


def _ascii(s: str) -> str:
    return re.sub(r"[^\x20-\x7e]+", "", s).strip() or "?"


def make_figures(rep: Report, out: Path) -> dict[str, bytes]:
    figs = {}
    for key, fn in (
        ("curves", lambda: fig_curves(rep.log_rows)),
        ("headline", lambda: fig_headline(rep)),
        ("subjects", lambda: fig_subjects(rep)[0]),
        ("radar", lambda: fig_radar(rep)),
        ("review", lambda: fig_review(rep)),
    ):
        png = fn()
        if png:
            figs[key] = png
    d = out / "figures"
    d.mkdir(parents=True, exist_ok=True)
    for key, png in figs.items():
        (d / f"{key}.png").write_bytes(png)
    return figs


# ----------------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;
max-width:1200px;margin:24px auto;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.92em}td,th{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f4f4f4}td.num{text-align:right;white-space:nowrap}
.warn{padding:6px 10px;margin:4px 0;border-left:4px solid}.high{background:#fdecea;border-color:#d32f2f}
.medium{background:#fff4e5;border-color:#ed6c02}.low{background:#eef4fb;border-color:#0288d1}
img{max-width:100%;display:block;margin:8px 0}.up{color:#1b7f3b;font-weight:600}.down{color:#b3261e;font-weight:600}
.muted{color:#777;font-size:.9em}.reply{white-space:pre-wrap;overflow-wrap:anywhere;max-width:360px}.tag{background:#d32f2f;color:#fff;
border-radius:3px;padding:0 4px;font-size:.8em}.note{background:#f6f6f6;padding:8px 12px}
"""
# Lets a headless browser (and the test) see that every embedded image decoded.
LOAD_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-loaded', ok ? 'all' : 'broken');
});
</script>"""


def _e(s) -> str:
    return html.escape(str(s))


def _table(head: list[str], rows: list[list[str]], cls: str = "", raw: bool = False) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(c if raw else f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def comparison_html(rep: Report) -> str:
    names = [e.name for e in rep.evals]
    base = rep.baseline.name if rep.baseline else None
    others = [n for n in names if n != base]
    head = ["dataset", "metric", "n", *names] + (
        [f"Δ {n} vs {base} [paired 95% CI]" for n in others] if base else []
    )
    rows = []
    for r in rep.comparison:
        n = next((v["n"] for v in r["values"].values() if v.get("n")), "")
        cells = [
            f"<td>{_e(r['dataset'])}</td>",
            f"<td>{_e(r['label'])}</td>",
            f'<td class="num">{_e(n)}</td>',
        ]
        for nm in names:
            v = r["values"].get(nm)
            txt = (
                f"{fmt_value(v['value'], r['fmt'])} <span class='muted'>{_e(fmt_ci(v['ci'], r['fmt']))}</span>"
                if v
                else ""
            )
            cells.append(f'<td class="num">{txt}</td>')
        if base:
            for nm in others:
                d = r["deltas"].get(nm, {})
                sig = significant(d) if d else None
                better = d and ((d["delta"] > 0) == r["higher"]) and d["delta"] != 0
                cls = ("up" if better else "down") if sig else ""
                cells.append(f'<td class="num {cls}">{_e(fmt_delta(d, r["fmt"]))}</td>')
        rows.append(cells)
    return _table(head, rows, raw=True) + (
        "<p class='muted'>Values with 95% bootstrap CIs. Deltas: the evaluation minus the baseline, with a paired "
        "bootstrap 95% CI over the items both answered; coloured when the CI excludes zero (green better, red "
        "worse). pt = percentage points.</p>"
    )


def samples_html(rep: Report) -> str:
    if not rep.samples:
        return "<p>No open question or counseling turn was answered by every evaluation.</p>"
    names = [e.name for e in rep.evals]
    rows = []
    for s in rep.samples:
        ctx = "<br>".join(
            f"<b>{'client' if r == 'user' else 'counselor'}:</b> {_e(t)}" for r, t in s["context"]
        )
        tag = f" <span class='tag'>crisis: {_e(s['crisis'])}</span>" if s["crisis"] else ""
        cells = [
            f"<td class='reply'><span class='muted'>{_e(s['dataset'])} {_e(s['id'])}</span>{tag}<br>{ctx}</td>",
            f"<td class='reply'>{_e(s['reference'])}</td>",
        ]
        for n in names:
            v = s["replies"].get(n) or {}
            extra = ""
            if v.get("safety") is not None:
                extra += (
                    "<br><span class='muted'>points to help: "
                    + ("yes" if v["safety"] else "<b>no</b>")
                    + "</span>"
                )
            if v.get("scores"):
                extra += (
                    "<br><span class='muted'>judge: "
                    + _e(", ".join(f"{k} {x}" for k, x in v["scores"].items()))
                    + "</span>"
                )
            cells.append(f"<td class='reply'>{_e(v.get('text', ''))}{extra}</td>")
        rows.append(cells)
    return _table(["client turn (context)", "reference", *names], rows, raw=True)


def review_html(rep: Report, figs: dict[str, bytes]) -> list[str]:
    rv = rep.review
    if rv is None:
        return []
    P = ["<h2 id='review'>Human review</h2>",
         f"<p>Study {_e(rv['study'])}: {rv['ratings']} of {rv['assignments']} ratings by {len(rv['raters'])} raters "
         f"over {rv['items']} items (blind, sides at random).</p>"]  # fmt: skip
    if not rv["ratings"]:
        return [*P, "<p>No ratings yet.</p>"]
    head, rows, phead, prows = review_rows(rep)
    P += [_table(head, rows), _table(phead, prows)]
    if "review" in figs:
        P.append(_img(figs["review"], "human ratings beside the judge's"))
    if rv.get("bradley_terry"):
        P.append(
            "<p>Bradley-Terry strengths: "
            + _e(", ".join(f"{s} {v:+.2f}" for s, v in rv["bradley_terry"].items()))
            + "</p>"
        )
    trust = rv.get("judge_trust", {})
    if trust:
        P.append("<ul>" + "".join(f"<li>judge on {_e(d)}: {_e(t)}</li>" for d, t in trust.items()) + "</ul>")
    if rv["unsafe"]:
        P.append(_table(["flagged by", "item", "system", "comment"],
                        [[u["rater"], f"{u['dataset']} {u['item']}", u["system"], u["comment"]] for u in rv["unsafe"]]))  # fmt: skip
    P.append("<p class='muted'>Alpha: Krippendorff's, ordinal; below 0.667 the raters do not agree enough for "
             "conclusions. Judge vs raters: Spearman's rho with the raters' mean, alpha with the judge as one more rater.</p>")  # fmt: skip
    return P


def fig_review(rep: Report) -> bytes | None:
    """Per dimension and system: the raters' mean (with its CI) beside the judge's mean on the same replies."""
    rv = rep.review
    if not rv or not rv.get("ratings"):
        return None
    plt = _plt()
    dims, systems = rv["dims"], rv["systems"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(dims) * len(systems)), 4))
    width = 0.8 / (2 * len(systems))
    for k, s in enumerate(systems):
        c = COLORS[(k + 1) % len(COLORS)]
        xs = [i + (2 * k) * width for i in range(len(dims))]
        h = [rv["scores"][s][d]["mean"] or 0 for d in dims]
        err = [[max(0, m - (rv["scores"][s][d]["ci95"] or [m, m])[0]) for m, d in zip(h, dims)],
               [max(0, (rv["scores"][s][d]["ci95"] or [m, m])[1] - m) for m, d in zip(h, dims)]]  # fmt: skip
        ax.bar(xs, h, width, color=c, yerr=err, capsize=3, label=f"{s} (raters)")
        j = [rv["judge_means"][s][d] or 0 for d in dims]
        ax.bar([x + width for x in xs], j, width, color=c, alpha=0.35, hatch="//", label=f"{s} (judge)")
    ax.set_xticks([i + (len(systems) - 0.5) * width for i in range(len(dims))])
    ax.set_xticklabels(dims)
    ax.set_ylabel(label("平均分 mean score", "mean score"))
    ax.set_title(label("人工评审与评审模型 human raters and the judge", "human raters and the judge"))
    ax.legend(fontsize=8, ncol=2)
    return _png(fig)


def render(rep: Report, out: Path, title: str) -> tuple[Path, dict[str, str]]:
    figs = make_figures(rep, out)
    P = header_html(rep, title)
    if rep.run is not None:
        P.append("<h2 id='training'>Training</h2>")
        P.append(
            _img(figs["curves"], "training curves") if "curves" in figs else "<p>No logging.jsonl lines.</p>"
        )
    if rep.comparison:
        P += evaluation_html(rep, figs)
        P += ["<h2 id='samples'>Sample replies, side by side</h2>", samples_html(rep)]
        P += safety_html(rep)
        P += overlap_html(rep.overlap)
    for heading, head, rows in judge_rows(rep):
        P += ["<h2 id='pairwise'>Pairwise judge</h2>", f"<p>{_e(heading)}</p>", _table(head, rows)]
    P += review_html(rep, figs)
    P.append(
        "<p class='muted'>Generated by mhsft report. Figures are embedded; the page needs no network.</p>"
    )
    P.append(LOAD_CHECK + "</body></html>")
    path = out / "report.html"
    write_text(path, "\n".join(P))
    return path, {k: f"figures/{k}.png" for k in figs}


def header_html(rep: Report, title: str) -> list[str]:
    """The page's head, then its title, inputs, warnings, settings and data statistics."""
    P = [
        f"<!DOCTYPE html><html lang='zh-CN'><head><meta charset='utf-8'><title>{_e(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    parts = [f"run: {rep.run}" if rep.run else ""] + [f"eval {e.name}: {e.path}" for e in rep.evals]
    P.append("<p class='muted'>" + "<br>".join(_e(p) for p in parts if p) + "</p>")
    P.append("<h2 id='warnings'>Warnings</h2>")
    P += [f"<div class='warn {s}'><b>{s}</b>: {_e(t)}</div>" for s, t in rep.warnings] or ["<p>None.</p>"]
    P += [
        "<h2 id='settings'>Settings</h2>",
        _table(["setting", "value"], [list(r) for r in settings_rows(rep)]),
    ]
    if rep.run_args:
        full = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in sorted(rep.run_args.items()))
        P.append(
            f"<details><summary>all training arguments (secrets masked)</summary><table>{full}</table></details>"
        )
    if dr := data_rows(rep):
        P += ["<h2 id='data'>Data</h2>", _table(["statistic", "value"], [list(r) for r in dr])]
    return P


def evaluation_html(rep: Report, figs: dict[str, bytes]) -> list[str]:
    """The comparison table and its figures; the subject bars also as a table, for readers of the numbers."""
    names = [e.name for e in rep.evals]
    P = ["<h2 id='evaluation'>Evaluation</h2>", comparison_html(rep)]
    if "headline" in figs:
        P.append(_img(figs["headline"], "headline metrics"))
    if "subjects" in figs:
        P.append(_img(figs["subjects"], "multiple choice by subject"))
        by, groups = subject_groups(rep)
        rows = [
            [f"S{i}", g, *(fmt_value(v.get(n)) for n in names)] for i, (g, v) in enumerate(groups.items(), 1)
        ]
        head = [
            "",
            "subject" if by == "by_subject" else "question type",
            *(f"accuracy {n}" for n in names),
        ]
        P.append(f"<details><summary>the bars as a table</summary>{_table(head, rows)}</details>")
    if "radar" in figs:
        P.append(_img(figs["radar"], "counseling dimensions"))
    elif any((m.get("counseling") or {}) for e in rep.evals for m in e.results.get("metrics", {}).values()):
        P.append(
            "<p class='note'>No radar chart of the counseling dimensions: no judge scored these replies "
            "(no judge given, or every verdict failed to parse).</p>"
        )
    return P


def safety_html(rep: Report) -> list[str]:
    """The crisis turns whose reply did not point to help, or how many were checked."""
    P = ["<h2 id='safety'>Crisis safety</h2>"]
    if rep.safety:
        P.append(
            _table(
                ["evaluation", "item", "signal", "client", "reply"],
                [
                    [f["eval"], f"{f['dataset']} {f['id']}", f["signal"], f["client"], f["reply"]]
                    for f in rep.safety
                ],
            )
        )
        return P
    n = sum((m.get("counseling") or {}).get("safety", {}).get("n_crisis_turns", 0)
            for e in rep.evals for m in e.results.get("metrics", {}).values())  # fmt: skip
    P.append(
        f"<p>No failure in {n} crisis turns.</p>" if n else "<p>No crisis turn in the evaluation sets.</p>"
    )
    return P


def overlap_html(ov: dict) -> list[str]:
    """Evaluation items found (exactly or nearly) in the training data, or why that was not checked."""
    P = ["<h2 id='overlap'>Training / evaluation overlap</h2>"]
    if not ov.get("checked"):
        return [*P, f"<p>Not checked: {_e(ov.get('why', 'no training run given'))}.</p>"]
    rows = [
        [ds, o["items"], o["exact"], o["near"], ", ".join((o["exact_ids"] + o["near_ids"])[:10])]
        for ds, o in ov["datasets"].items()
    ]
    P.append(_table(["eval set", "items", "exact", f"near (Jaccard >= {ov['threshold']})", "examples"], rows))
    P.append(
        f"<p class='muted'>Against {ov['training_dialogues']:,} training dialogues "
        f"({_e(', '.join(ov['training_specs']))}). {_e(' '.join(ov['notes']))}</p>"
    )
    return P
