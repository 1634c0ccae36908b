"""`mhsft report RUN_OR_EVAL_DIR... [--baseline EVAL_DIR] --output DIR`: report.md and a self-contained
report.html (figures embedded as PNG) of a training run and its evaluations, base vs fine-tuned.

Reads top to bottom: the inputs and their comparison (mhsft.report.contents) -> the checks a careful reviewer makes
(mhsft.report.checks) -> the HTML with its figures (mhsft.report.html) and the Markdown (mhsft.report.markdown).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mhsft.args import parse_args, split_positional
from mhsft.files import write_json
from mhsft.report.checks import check_overlap, collect_warnings, pick_samples, safety_failures
from mhsft.report.contents import Report, ReportArguments, compare, load_inputs
from mhsft.report.gate import evaluate_gate, load_gate
from mhsft.report.html import render
from mhsft.report.markdown import write_markdown
from mhsft.utils import UserError, get_logger

log = get_logger()


def build(a: ReportArguments) -> Report:
    rep = load_inputs(a)
    rep.comparison = compare(rep)
    rep.samples = pick_samples(rep)
    rep.safety = safety_failures(rep)
    try:
        rep.overlap = check_overlap(rep) if rep.evals else {}
    except Exception as e:  # the overlap check must not cost the whole report; say why instead
        rep.overlap = {"checked": False, "why": f"{type(e).__name__}: {e}"}
    rep.warnings = collect_warnings(rep)
    return rep


def main(argv: list[str]) -> int:
    a = parse_args(ReportArguments, split_positional(list(argv), ReportArguments, "inputs"), "mhsft report")
    if a.max_samples < 0 or a.max_chars < 20 or not 0 < a.near_threshold <= 1:
        raise UserError("--max_samples >= 0, --max_chars >= 20 and 0 < --near_threshold <= 1")
    gate = load_gate(Path(a.gate)) if a.gate else None  # a bad gate file fails before any work
    rep = build(a)
    out = Path(a.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    title = a.title or (
        "mhsft report: " + (rep.run.name if rep.run else ", ".join(e.name for e in rep.evals))
    )
    html_path, figures = render(rep, out, title)
    md_path = write_markdown(rep, figures, out, title)
    for sev, text in rep.warnings:
        if sev == "high":
            log.warning(text)
    print(f"report: {html_path}\n        {md_path}")
    if gate is None:
        return 0
    failed = evaluate_gate(rep, gate)
    write_json(out / "gate.json", {"gate": a.gate, "checks": gate, "passed": not failed, "failed": failed})
    for line in failed:
        print(f"gate FAILED: {line}", file=sys.stderr)
    print(f"gate: {'FAILED' if failed else 'passed'} ({len(gate)} check(s), {a.gate})")
    return 1 if failed else 0
