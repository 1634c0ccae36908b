"""benchmarks/crisis_check.py: the lexical check's precision and recall on the team's crisis test set."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_lexical_check_on_the_crisis_test_set(tmp_path):
    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "crisis_check.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text(encoding="utf-8"))
    assert (r["utterances"], r["replies"]) == (6, 18)
    assert (
        r["crisis_signal"]["recall"] == 1.0 and r["crisis_signal"]["fp"] == 0 and r["missed_utterances"] == []
    )
    # a vague referral ("找人聊聊") is not help; the specific ones are
    assert r["points_to_help_vs_referral"] == {
        "n": 18,
        "tp": 15,
        "fp": 0,
        "fn": 0,
        "precision": 1.0,
        "recall": 1.0,
    }
    assert "crisis signal in the client's words" in p.stdout
