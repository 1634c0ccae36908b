"""The judge in the report: which judge dimensions can be trusted against the raters (in words), the pairwise
section with its position-bias rate, and a warning when compared runs were judged differently."""

from __future__ import annotations

import json

import sqlalchemy as sa

from helpers import run_cli
from mhsft.review import stats, store
from mhsft.review.study import create_study
from review.conftest import write_run
from review.test_stats import _rate_all


def _judge_scores(engine) -> dict:
    it, rep, sy = store.items, store.replies, store.systems
    with engine.connect() as c:
        rows = c.execute(sa.select(it.c.key, sy.c.name, rep.c.judge).join(it, it.c.id == rep.c.item_id)
                         .join(sy, sy.c.id == rep.c.system_id)).all()  # fmt: skip
    return {(k, s): json.loads(j) for k, s, j in rows if j}


def test_the_report_says_which_judge_dimensions_to_trust(tmp_path):
    runs = [write_run(tmp_path / "base", "base"), write_run(tmp_path / "finetuned", "ft")]
    create_study(runs, ["a", "b"], tmp_path / "s", db=None, n=8, seed=0, overlap=2, dims="EmoE,Con")
    engine = store.connect(store.db_url(tmp_path / "s"))
    judged = _judge_scores(engine)

    def choose(rater, key, left, right):  # the raters agree with each other; with the judge on EmoE only
        def score(system):
            j = judged.get((key, system), {"EmoE": 3, "Con": 3})  # open questions have no judge
            return {"EmoE": j["EmoE"], "Con": 6 - j["Con"] if j["Con"] != 3 else 1}

        return score(left), score(right), "tie"

    _rate_all(engine, choose)
    res = stats.compute(engine, store.open_study(engine), n_boot=0)
    assert res["judge_trust"]["EmoE"].startswith("trusted") and res["agreement"]["EmoE"]["alpha"] == 1.0
    assert res["judge_trust"]["Con"].startswith("not trusted")


def test_pairwise_section_and_judged_differently_warning(tmp_path, capsys):
    base, ft = write_run(tmp_path / "base", "base"), write_run(tmp_path / "finetuned", "ft")
    results = json.loads((ft / "results.json").read_text())
    results["judge"] = {"model": "judge-a", "rubric": "counseling", "prompt_hash": "111"}
    dims = {"EmoE": {"win": 3, "tie": 1, "loss": 0, "win_rate": 0.875, "win_rate_ci95": [0.6, 1.0], "flip_rate": 0.25,
                     "winner_is_longer": 1.0, "length_matched": 2, "length_matched_win_rate": 0.75}}  # fmt: skip
    results["pairwise"] = {"system": "finetuned", "versus": "base", "n_items": 4, "n_judged": 4, "n_failed": 0,
                           "position_bias_rate": 0.45, "first_position_share": 0.8, "dims": dims}  # fmt: skip
    (ft / "results.json").write_text(json.dumps(results), encoding="utf-8")
    b = json.loads((base / "results.json").read_text())
    b["judge"] = {"model": "judge-a", "rubric": "psycrisis", "prompt_hash": "222"}
    (base / "results.json").write_text(json.dumps(b), encoding="utf-8")
    rc, _, _ = run_cli(["report", str(ft), "--baseline", str(base), "--output", str(tmp_path / "r")], capsys)
    assert rc == 0
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    warnings = md.split("## Warnings", 1)[1].split("## Settings", 1)[0]
    assert "judged differently (rubric, prompt_hash: psycrisis vs counseling, 222 vs 111)" in warnings
    assert "45% of the pairwise verdicts changed with the order" in warnings
    section = md.split("## Pairwise judge", 1)[1]
    assert (
        "position-bias rate 0.45" in section
        and "| EmoE | 3 / 1 / 0 | 0.88 [0.60, 1.00] | 0.25 | 1.00 | 0.75 (2) |" in section
    )
    assert "<h2 id='pairwise'>Pairwise judge</h2>" in (tmp_path / "r" / "report.html").read_text(
        encoding="utf-8"
    )


def test_failed_pairwise_comparisons_are_a_warning_not_a_silent_gap(tmp_path, capsys):
    base, ft = write_run(tmp_path / "base", "base"), write_run(tmp_path / "finetuned", "ft")
    results = json.loads((ft / "results.json").read_text())
    results["pairwise"] = {"system": "finetuned", "versus": "base", "n_items": 4, "n_judged": 0, "n_failed": 4,
                           "dims": {}}  # fmt: skip
    (ft / "results.json").write_text(json.dumps(results), encoding="utf-8")
    rc, _, err = run_cli(
        ["report", str(ft), "--baseline", str(base), "--output", str(tmp_path / "r")], capsys
    )
    assert rc == 0
    assert "finetuned vs base: 4 of 4 pairwise comparisons failed" in err  # high: printed as well as written
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "**high**: finetuned vs base: 4 of 4 pairwise comparisons failed" in md
    assert "## Pairwise judge" not in md  # no table of nothing
