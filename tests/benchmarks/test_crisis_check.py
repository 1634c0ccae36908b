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


def _run(tmp_path, *extra):
    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "crisis_check.py"), "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    return p, out


def test_every_flag_on_the_shared_data_is_labelled_and_no_labelled_crisis_is_missed(tmp_path, shared_data):
    """The check on the shared data's 8,400 client turns against the labels: a pattern that flags a turn nobody
    has read, or a labelled crisis turn it no longer flags, fails here (labels in benchmarks/crisis_labels_shared.jsonl)."""
    p, out = _run(tmp_path, "--shared_data", str(shared_data))
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text(encoding="utf-8"))["shared_data"]
    assert (r["client_turns"], r["rejected_records"]) == (8400, 0)
    assert r["unlabelled_flags"] == [] and r["missed"] == []
    assert (r["signal"]["tp"], r["signal"]["fp"]) == (16, 4) and r["signal"]["precision"] == 0.8
    assert r["false_flags"] == sorted(r["false_flags"]) and len(r["false_flags"]) == 4
    assert "crisis signal, shared data's turns" in p.stdout


def test_a_label_whose_turn_changed_is_a_one_line_error(tmp_path, shared_data):
    rows = (REPO / "benchmarks" / "crisis_labels_shared.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(rows[0])
    bad = tmp_path / "labels.jsonl"
    bad.write_text("\n".join([json.dumps({**first, "sha1": "0" * 12})] + rows[1:]) + "\n", encoding="utf-8")
    p, out = _run(tmp_path, "--shared_data", str(shared_data), "--labels", str(bad))
    assert p.returncode == 1 and not out.exists()
    assert "1 labelled turn(s) missing or changed" in p.stderr and "Traceback" not in p.stderr


def test_without_the_shared_data_the_real_turns_are_skipped_and_said_so(tmp_path):
    p, out = _run(tmp_path, "--shared_data", str(tmp_path / "absent"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(out.read_text(encoding="utf-8"))["shared_data"] == {
        "skipped": f"no folder {tmp_path / 'absent'}"
    }
