"""benchmarks/scaling_summary.py: global tokens/s from logging.jsonl, scaling against one GPU, skipped/failed runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("scaling_summary", REPO / "benchmarks" / "scaling_summary.py")
ss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ss)


def write_run(root: Path, name: str, steps: list[tuple[float, float]], memory: float = 27.0) -> Path:
    """A run folder as `mhsft sft` leaves it: steps are (tokens_per_s, seconds) per logged step."""
    out = root / name
    run = out / "v0-20261128-000000"
    run.mkdir(parents=True)
    elapsed, lines = 0.0, []
    for i, (tps, dt) in enumerate(steps, 1):
        elapsed += dt
        lines.append(json.dumps({"step": i, "loss": 12.0, "tokens_per_s": tps, "memory_gib": memory,
                                 "elapsed_s": round(elapsed, 1), "mfu": 0.3}))  # fmt: skip
    (run / "logging.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def test_throughput_weights_steps_by_duration_and_skips_warmup():
    recs = [{"step": 1, "tokens_per_s": 10.0, "elapsed_s": 5.0},
            {"step": 2, "tokens_per_s": 900.0, "elapsed_s": 6.0},
            {"step": 3, "tokens_per_s": 1000.0, "elapsed_s": 8.0},
            {"step": 4, "tokens_per_s": 4000.0, "elapsed_s": 10.0},
            {"step": 5, "tokens_per_s": 2000.0, "elapsed_s": 11.0}]  # fmt: skip
    t = ss.throughput(recs, skip=2)
    # tokens: 1000*2 + 4000*2 + 2000*1 = 12000 over 5 s
    assert t["tokens_per_s"] == 2400.0
    assert t["tokens_per_s_median"] == 2000.0
    assert t["timed_steps"] == [3, 5]
    assert t["step_s"] == pytest.approx(5 / 3, abs=1e-3)
    assert ss.throughput(recs[:2], skip=2) == {}


def test_summary_scaling_goals_and_statuses(tmp_path):
    one = write_run(tmp_path, "7b-ddp-1", [(5000, 3.0)] * 2 + [(10000, 2.0)] * 6)
    two = write_run(tmp_path, "7b-ddp-2", [(9000, 3.0)] * 2 + [(19500, 2.0)] * 6)
    four = write_run(tmp_path, "7b-ddp-4", [(9000, 3.0)] * 2 + [(36000, 2.0)] * 6)
    big = write_run(tmp_path, "32b-zero3-2", [(1000, 5.0)] * 2 + [(4000, 4.0)] * 3, memory=70.0)
    manifest = tmp_path / "runs.tsv"
    rows = [
        ["7b-ddp-1", "1", "ddp", "7b", "100", "160", "0", str(one), ""],
        ["7b-ddp-2", "2", "ddp", "7b", "200", "260", "0", str(two), ""],
        ["7b-ddp-4", "4", "ddp", "7b", "300", "360", "0", str(four), ""],
        ["7b-zero2-2", "2", "zero2", "7b", "", "", "-", str(tmp_path / "none"), "deepspeed does not import"],
        ["32b-zero3-2", "2", "zero3", "32b", "400", "500", "124", str(big), ""],
        ["7b-bad", "2", "ddp", "7b", "500", "510", "1", str(tmp_path / "bad"), "[mhsft] error: a | b"],
    ]
    manifest.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    monitor = tmp_path / "gpu.csv"
    monitor.write_text(
        "150.5, 0, 30000, 99\n150.5, 1, 0, 0\n250.0, 1, 41000, 97\nbad line\n", encoding="utf-8"
    )
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    assert ss.main(["--manifest", str(manifest), "--gpu_monitor", str(monitor), "--json", str(out_json),
                    "--md", str(out_md)]) == 0  # fmt: skip
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    by = {r["name"]: r for r in doc["runs"]}
    assert by["7b-ddp-1"]["tokens_per_s"] == 10000.0
    assert by["7b-ddp-2"]["scaling"] == 1.95 and by["7b-ddp-2"]["goal"] == ">= 1.9x: met"
    assert by["7b-ddp-2"]["per_gpu"] == 9750.0
    assert by["7b-ddp-4"]["scaling"] == 3.6 and by["7b-ddp-4"]["goal"] == ">= 3.7x: not met"
    assert by["7b-ddp-1"]["peak_gib_any_gpu"] == round(30000 / 1024, 1)
    assert by["7b-ddp-2"]["peak_gib_any_gpu"] == round(41000 / 1024, 1)
    assert by["7b-zero2-2"]["status"] == "skipped: deepspeed does not import"
    big_row = by["32b-zero3-2"]
    assert big_row["status"].startswith("cut at its time limit") and big_row["tokens_per_s"] == 4000.0
    assert big_row["scaling_base"].startswith("reference") and "goal" not in big_row
    assert big_row["rank0_peak_gib"] == 70.0 and len(big_row["steps"]) == 5
    assert by["7b-bad"]["status"].startswith("failed (rc 1)")
    md = out_md.read_text(encoding="utf-8")
    assert sum(line.startswith("| ") for line in md.splitlines()) == len(rows) + 1  # header + a line per run
    assert "a / b" in md  # a '|' in an error line does not break the table


def test_rank_balance_from_the_data_plan():
    demo = str(REPO / "examples" / "data" / "demo_sharegpt.jsonl")
    bal = ss.rank_balance(demo, max_length=256, batch=1, ns=[1, 2], steps=4, skip=1)
    assert bal["1"] == 1.0 and 0 < bal["2"] <= 1.0
