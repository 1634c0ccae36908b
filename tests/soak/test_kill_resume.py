"""benchmarks/soak/kill_resume.py --quick: `mhsft sft` (three kill points, two inside a checkpoint save) and `mhsft
export` (two, inside the export) SIGKILLed and rerun; each ends equal to its uninterrupted run, and no kill leaves
anything in sight that looks complete and is not. (`mhsft run` killed: tests/pipeline/test_run.py, and the full
campaign.)"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_quick_kill_campaign(tmp_path):
    out = tmp_path / "soak.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak" / "kill_resume.py"), "--quick",
                        "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["passed"] and r["quick"]
    by = {c["campaign"]: c for c in r["results"]}
    assert by.keys() == {"sft", "export"}
    for name, n in (("sft", 3), ("export", 2)):
        c = by[name]
        assert c["kill_points"] >= n and c["resumed_and_equal"] == c["kill_points"] and c["problems"] == []
        assert all(p["killed"] for p in c["points"])
    # at least one sft kill inside a checkpoint save, and the resumed runs equal the uninterrupted one exactly
    assert any(p["mid_save"] for p in by["sft"]["points"])
    for t in by["sft"]["trials"]:
        assert (
            t["adapter_max_abs_diff"] <= 1e-5
            and t["loss_max_abs_diff"] == 0
            and t["logs_equal"]
            and t["best_equal"]
        )
    # a killed export left nothing, or a complete export equal to the uninterrupted one
    assert {p["left"] for p in by["export"]["points"]} <= {"none", "complete"}
