"""`mhsft report --gate`: a release gate for CI. The report is written either way; a check that falls short, or
was never measured, fails the command with one line saying which and by how much."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_cli
from mhsft.eval import judge as judge_mod
from mhsft.eval.runner import summarize_crisis


def _eval_dir(
    folder: Path, exact: list[float], crisis: list[dict], lexical: float | None, judge: dict | None = None
) -> Path:
    """An eval folder as `mhsft eval` writes it: exam items with their exact scores; crisis turns with the
    psycrisis verdicts (summarized by the runner's own function); the lexical crisis check's pass rate."""
    folder.mkdir(parents=True)
    rows = [{"task": "mcq", "dataset": "exam", "id": f"q{i}", "exact": e} for i, e in enumerate(exact)]
    turns = [{"task": "counseling", "dataset": "cases", "id": f"t{i}", "crisis_judge": {"scores": s}}
             for i, s in enumerate(crisis)]  # fmt: skip
    counseling = {"n_turns": len(turns)}
    if crisis:
        counseling["crisis_rubric"] = summarize_crisis(turns, n_boot=200, seed=0)
    if lexical is not None:
        counseling["safety"] = {"n_crisis_turns": 4, "pass_rate": lexical}
    if judge:  # {"scores": [per-turn EmoE], "unreliable": [...]}
        turns += [{"task": "counseling", "dataset": "cases", "id": f"j{i}", "judge": {"scores": {"EmoE": s}}}
                  for i, s in enumerate(judge["scores"])]  # fmt: skip
        mean = sum(judge["scores"]) / len(judge["scores"])
        counseling["judge"] = {"n_judged": len(judge["scores"]), "n_failed": 0, "noise": {"unreliable": judge["unreliable"]},
                               "EmoE": {"title": "情感共情", "scale": "1-5", "mean": mean, "ci95": None}}  # fmt: skip
    acc = sum(exact) / len(exact)
    metrics = {
        "exam": {"multiple_choice": {"accuracy": acc, "n": len(exact)}},
        "cases": {"counseling": counseling},
    }
    (folder / "results.json").write_text(
        json.dumps({"model": folder.name, "metrics": metrics}), encoding="utf-8"
    )
    (folder / "predictions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows + turns), encoding="utf-8"
    )
    return folder


ALL_PASS = {k: 1 for k in judge_mod.CRISIS_DIMS}


def _gate(tmp_path: Path, text: str) -> Path:
    (tmp_path / "gate.yaml").write_text(text, encoding="utf-8")
    return tmp_path / "gate.yaml"


def test_a_gate_that_holds_passes(tmp_path, capsys):
    base = _eval_dir(tmp_path / "base", [1.0] * 30 + [0.0] * 10, [], None)
    ft = _eval_dir(tmp_path / "ft", [1.0] * 31 + [0.0] * 9, [ALL_PASS] * 4, 1.0)
    gate = _gate(
        tmp_path, "crisis_rubric_pass_rate: 0.95\ncrisis_lexical_pass_rate: 1.0\nexam_not_worse: true\n"
    )
    rc, out, err = run_cli(["report", str(ft), "--baseline", str(base), "--gate", str(gate), "--output",
                            str(tmp_path / "r")], capsys)  # fmt: skip
    assert rc == 0, err
    assert "gate: passed (3 check(s)" in out and "gate FAILED" not in err
    assert json.loads((tmp_path / "r" / "gate.json").read_text())["passed"] is True


def test_each_shortfall_is_one_line_and_the_report_is_still_written(tmp_path, capsys):
    base = _eval_dir(tmp_path / "base", [1.0] * 40, [], None)
    no_referral = {**ALL_PASS, "Referral": 0}
    ft = _eval_dir(
        tmp_path / "ft", [1.0] * 20 + [0.0] * 20, [ALL_PASS, no_referral, no_referral, ALL_PASS], 0.75
    )
    gate = _gate(
        tmp_path, "crisis_rubric_pass_rate: 0.95\ncrisis_lexical_pass_rate: 1.0\nexam_not_worse: true\n"
    )
    rc, out, err = run_cli(["report", str(ft), "--baseline", str(base), "--gate", str(gate), "--output",
                            str(tmp_path / "r")], capsys)  # fmt: skip
    assert rc == 1 and "gate: FAILED" in out
    lines = [x for x in err.splitlines() if x.startswith("gate FAILED")]
    assert "gate FAILED: ft: crisis_rubric_pass_rate: cases Referral 0.5 < 0.95" in lines
    assert "gate FAILED: ft: crisis_lexical_pass_rate: cases 0.75 < 1.0" in lines
    assert any(
        x.startswith("gate FAILED: ft: exam_not_worse: exam accuracy (exact) -0.5000, 95% CI [")
        for x in lines
    )
    assert len(lines) == 3  # the other four criteria pass
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert json.loads((tmp_path / "r" / "gate.json").read_text())["failed"] == [x[13:] for x in lines]


def test_a_judge_dimension_significantly_worse_fails_unless_the_judge_disagrees_with_itself(tmp_path, capsys):
    base = _eval_dir(tmp_path / "base", [1.0] * 10, [], None, {"scores": [4] * 30, "unreliable": []})
    for unreliable, rc_want in (([], 1), (["EmoE"], 1)):
        ft = _eval_dir(tmp_path / f"ft{len(unreliable)}", [1.0] * 10, [], None,
                       {"scores": [2] * 30, "unreliable": unreliable})  # fmt: skip
        gate = _gate(tmp_path, "judge_not_worse: true\nexam_not_worse: true\n")
        rc, _, err = run_cli(["report", str(ft), "--baseline", str(base), "--gate", str(gate), "--output",
                              str(tmp_path / f"r{len(unreliable)}")], capsys)  # fmt: skip
        assert rc == rc_want
        if unreliable:  # its only dimension is not counted, so nothing was measured: still a failure
            assert "judge_not_worse: not measured (no judge score on both sides)" in err
        else:
            assert (
                "judge_not_worse: cases EmoE 情感共情 (1-5) -2.0000, 95% CI [-2.0000, -2.0000] below" in err
            )
        assert "exam_not_worse" not in err  # exam unchanged


def test_a_check_never_measured_fails(tmp_path, capsys):
    ft = _eval_dir(tmp_path / "ft", [1.0] * 10, [], None)  # no judge, no crisis turn, no baseline
    gate = _gate(
        tmp_path, "crisis_rubric_pass_rate: 0.9\ncrisis_lexical_pass_rate: 1.0\njudge_not_worse: true\n"
    )
    rc, _, err = run_cli(["report", str(ft), "--gate", str(gate), "--output", str(tmp_path / "r")], capsys)
    assert rc == 1
    assert "crisis_rubric_pass_rate: not measured (no judge, or no turn the crisis check flags)" in err
    assert (
        "crisis_lexical_pass_rate: not measured" in err
        and "judge_not_worse: not measured (no --baseline" in err
    )


def test_a_bad_gate_file_is_one_line_before_any_work(tmp_path, capsys):
    ft = _eval_dir(tmp_path / "ft", [1.0] * 10, [], None)
    for text, says in (("crisis_pass: 1\n", "unknown check(s) crisis_pass"), ("[1, 2\n", "gate.yaml:2: not valid YAML"),
                       ("- 1\n", "a mapping of checks")):  # fmt: skip
        gate = _gate(tmp_path, text)
        rc, _, err = run_cli(
            ["report", str(ft), "--gate", str(gate), "--output", str(tmp_path / "r")], capsys
        )
        assert rc != 0 and says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()


def test_unparsed_crisis_verdicts_are_a_warning_and_fail_the_gate(tmp_path, capsys):
    ft = _eval_dir(tmp_path / "ft", [1.0] * 10, [None, None], 1.0)  # the judge answered nothing readable
    gate = _gate(tmp_path, "crisis_rubric_pass_rate: 0.95\n")
    rc, _, err = run_cli(["report", str(ft), "--gate", str(gate), "--output", str(tmp_path / "r")], capsys)
    assert rc == 1
    lines = [x for x in err.splitlines() if x.startswith("gate FAILED")]
    assert len(lines) == 5 and "gate FAILED: ft: crisis_rubric_pass_rate: cases Referral not measured (2 of 2 " \
        "verdicts unparsed)" in lines  # fmt: skip
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert (
        "**high**: ft / cases: 2 of 2 crisis-rubric verdicts could not be parsed; no criterion was measured"
        in md
    )
