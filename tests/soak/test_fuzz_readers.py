"""benchmarks/soak/fuzz_readers.py: the quick campaign finds no traceback, hang or miscount in any reader, and its
checks do catch a reader that raises or loses a record."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "soak" / "fuzz_readers.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_readers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_quick_campaign_has_no_traceback_hang_or_miscount(tmp_path, fuzz):
    out = tmp_path / "fuzz.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    r = json.loads(out.read_text(encoding="utf-8"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    t = r["totals"]
    assert (t["tracebacks"], t["crashes"], t["hangs"], t["count_mismatches"]) == (0, 0, 0, 0), r["failures"]
    assert t["files"] >= 600 and t["countable"] >= 350
    assert set(r["by_reader"]) == {s.name for s in fuzz.seeds()}  # every reader, training and evaluation
    assert set(r["by_mutation"]) >= set(fuzz.BYTE_MUTATIONS) | set(fuzz.STRUCT_MUTATIONS)
    assert "tracebacks" in p.stdout.splitlines()[0] and "TOTAL" in p.stdout


def _task(fuzz, tmp_path, name: str) -> dict:
    seed, mutation, k = name.split(":")
    return {"name": name, "seed": seed, "mutation": mutation, "k": int(k), "entry": "train", "quick": True,
            "tmp": str(tmp_path)}  # fmt: skip


def test_the_checks_catch_a_reader_that_raises_or_loses_a_record(tmp_path, fuzz, monkeypatch):
    from mhsft.data import readers

    task = _task(fuzz, tmp_path, "sharegpt_jsonl:nan:0")
    ok = fuzz.check_task(task)
    assert not ok["problems"] and not ok["mismatched"] and ok["expected"] == 3

    real = readers.iter_file
    monkeypatch.setattr(readers, "iter_file", lambda path, fmt="auto": list(real(path, fmt))[:-1])
    lost = fuzz.check_task(task)
    assert lost["mismatched"] == {"train": 2} and any("counted differently" in p for p in lost["problems"])

    def boom(*a, **k):
        raise KeyError("a reader bug")

    monkeypatch.setattr(readers, "iter_file", real)
    monkeypatch.setattr(readers, "parse_records", boom)
    broken = fuzz.check_task(task)
    assert any("unexpected KeyError while reading" in p for p in broken["problems"]), broken


def test_records_are_counted_without_the_readers(fuzz):
    seed = next(s for s in fuzz.seeds() if s.name == "sharegpt_array")
    rec = json.dumps(seed.records[0])
    assert fuzz.count_records(seed, "data.json", f"[{rec}, NaN, {rec}]".encode()) == 3
    assert fuzz.count_records(seed, "data.json", f"[{rec}, {{broken".encode()) is None
    assert fuzz.count_records(seed, "data.jsonl", f"{rec}\r{rec}\r\r".encode()) == 2  # CR-only lines
    assert fuzz.count_records(seed, "data.json", "[1, 2]".encode("utf-16")) is None
    assert fuzz.count_records(seed, "case_0.txt", b"\xff\xfe anything") == 1
