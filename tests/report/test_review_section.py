"""`mhsft report --review STUDY`: the human ratings beside the judge's, win rates, agreement, flagged replies, a
figure, and the warnings they call for."""

from __future__ import annotations

import json

from helpers import run_cli
from mhsft.review import store
from mhsft.review.study import create_study
from review.conftest import write_run
from review.test_stats import _rate_all


def test_report_shows_the_human_review(tmp_path, capsys):
    runs = [write_run(tmp_path / "base", "base"), write_run(tmp_path / "finetuned", "ft")]
    create_study(runs, ["a", "b"], tmp_path / "study", db=None, n=None, seed=0, overlap=2, dims="EmoE,Saf")
    out = tmp_path / "r"
    rc, _, _ = run_cli(["report", str(runs[1]), "--baseline", str(runs[0]), "--review", str(tmp_path / "study"),
                        "--output", str(out)], capsys)  # fmt: skip
    assert rc == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Human review" in md and "0 of 20 ratings" in md and "No ratings yet." in md
    engine = store.connect(store.db_url(tmp_path / "study"))
    _rate_all(engine, lambda r, k, lt, rt: ({"EmoE": 4 if lt == "finetuned" else 2, "Saf": 5},
                                            {"EmoE": 4 if rt == "finetuned" else 2, "Saf": 5},
                                            "left" if lt == "finetuned" else "right"))  # fmt: skip
    rc, _, _ = run_cli(["report", str(runs[1]), "--baseline", str(runs[0]), "--review", str(tmp_path / "study"),
                        "--output", str(out)], capsys)  # fmt: skip
    assert rc == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    section = md.split("## Human review", 1)[1].split("## Crisis safety", 1)[0]
    assert "20 of 20 ratings by 2 raters over 10 items" in section
    assert "| dimension | base: human / judge | finetuned: human / judge | alpha (raters) |" in section
    emoe = next(ln for ln in section.splitlines() if ln.startswith("| EmoE"))
    assert "2.00" in emoe and "4.00" in emoe and "1.00" in emoe  # humans agree perfectly: alpha 1
    assert "| base | finetuned | 0 | 0 | 20 | 0 |" in section
    assert "flagged unsafe by" in section  # the finetuned crisis reply (case2) was flagged
    assert "raters flagged" in md.split("## Warnings", 1)[1].split("## Settings", 1)[0]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2 id='review'>Human review</h2>" in html and "human ratings beside the judge" in html
    assert (out / "figures" / "review.png").is_file()
    assert json.loads(json.dumps(section)) == section  # plain text, nothing binary


def test_report_refuses_a_folder_that_is_no_study(tmp_path, capsys):
    runs = [write_run(tmp_path / "base", "base")]
    rc, _, err = run_cli(
        ["report", str(runs[0]), "--review", str(tmp_path), "--output", str(tmp_path / "r")], capsys
    )
    assert rc == 2 and "not a `mhsft review` study" in err
