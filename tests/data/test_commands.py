"""`mhsft data inspect | validate | convert | clean` as a user runs them: counts on the real corpora,
one-line errors with rejects files, exit codes, edge cases (missing, empty, garbage, offline hub ids),
and UTF-8 output under LANG=C."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from helpers import REPO, run_cli
from mhsft.data.schema import Dialogue, Source, Turn
from mhsft.data.stats import Stats, reason_group

DEMO = REPO / "examples" / "data" / "demo_sharegpt.jsonl"
ONE_LINE_ERROR = re.compile(r"^\S+:\d+: record \S+: .+$")


run = run_cli


def run_c_locale(
    args: list[str], cwd: Path, strict_ascii: bool, env_extra: dict | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    env.update(LANG="C", LC_ALL="C", **(env_extra or {}))
    if strict_ascii:  # without these Python itself switches to UTF-8 under LANG=C (PEP 538/540)
        env.update(PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    return subprocess.run(
        [sys.executable, "-m", "mhsft", *args], cwd=cwd, env=env, capture_output=True, timeout=120
    )


def inspect_json(capsys, *args: str) -> dict:
    rc, out, err = run(["data", "inspect", *args, "--json"], capsys)
    assert rc == 0, err
    return json.loads(out)


def sharegpt(id: str, *texts: str, system: str | None = None) -> str:
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]
    rec = {"id": id, "conversations": conv} | ({"system": system} if system else {})
    return json.dumps(rec, ensure_ascii=False)


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Good records on lines 1 and 4; bad ones on lines 2 (two user turns), 3 (not JSON), 5 (empty reply)."""
    p = tmp_path / "mixed.jsonl"
    bad_roles = {"id": "bad1", "conversations": [{"from": "human", "value": "我很焦虑"}] * 2}
    lines = [
        sharegpt("a1", "你好，我最近睡不好", "听起来你很辛苦。"),
        json.dumps(bad_roles, ensure_ascii=False),
        "this is not json",
        sharegpt("a2", "谢谢", "不客气"),
        sharegpt("e1", "空的回答", ""),
    ]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------ real corpora


def test_inspect_counts_real_corpora(shared_data, capsys):
    train = shared_data / "train"
    emo = inspect_json(capsys, str(train / "emollm_data.json"))
    assert (emo["dialogues"], emo["rejected"], emo["with_system_prompt"]) == (1596, 0, 1596)
    assert emo["turns"] == 2 * emo["assistant_turns"]
    assert set(emo["characters"]) >= {"total", "p50", "p90", "p99", "max"}
    assert emo["characters"]["p50"] <= emo["characters"]["p90"] <= emo["characters"]["p99"]
    assert emo["characters"]["p99"] <= emo["characters"]["max"]
    # the crisis turns (benchmarks/crisis_check.py labels them) and how few of the counselors' replies refer
    assert emo["crisis"] == {"client_turns": 12, "replies_pointing_to_help": 3}
    cp = inspect_json(capsys, str(train / "cpsycound_sample"))
    assert (cp["dialogues"], cp["files"], cp["rejected"]) == (400, 400, 0)
    assert cp["crisis"] == {"client_turns": 6, "replies_pointing_to_help": 0}
    one = sorted((shared_data / "eval" / "cpsycoune").glob("*/1.json"))[0]
    assert inspect_json(capsys, str(one))["dialogues"] == 1


def test_inspect_table(shared_data, capsys):
    rc, out, _ = run(["data", "inspect", str(shared_data / "train" / "emollm_data.json")], capsys)
    assert rc == 0
    assert re.search(r"dialogues\s+│\s+1,596", out)
    assert "characters per dialogue" in out and "p99" in out


def test_convert_then_inspect_gives_the_same_counts(shared_data, tmp_path, capsys):
    keys = ("dialogues", "turns", "assistant_turns", "with_system_prompt", "characters")
    for src, to in [("emollm_data.json", "sharegpt"), ("cpsycound_sample", "messages")]:
        src = shared_data / "train" / src
        out_file = tmp_path / f"{src.stem}.jsonl"
        rc, out, err = run(["data", "convert", str(src), "--output", str(out_file), "--to", to], capsys)
        assert rc == 0, err
        assert "no rejected records" in out
        first = json.loads(out_file.open(encoding="utf-8").readline())
        assert ("messages" if to == "messages" else "conversations") in first
        before, after = inspect_json(capsys, str(src)), inspect_json(capsys, str(out_file))
        assert {k: before[k] for k in keys} == {k: after[k] for k in keys}


# ------------------------------------------------------------------------------------------ token stats


def test_inspect_tokens_truncation_and_packing(tiny_model_dir, capsys):
    d = inspect_json(capsys, str(DEMO), "--model", "builtin:tiny", "--max_length", "512")
    tok = d["tokens"]
    assert d["dialogues"] > 0 and 0 < tok["p50"] <= tok["p90"] <= tok["p99"] <= tok["max"]
    assert 0 < d["label_tokens"] < tok["total"]
    assert d["max_length"] == 512 and 0 <= d["truncation"]["rate"] <= 1
    pk = d["packing"]
    assert 0 < pk["padding_efficiency"] <= pk["efficiency"] <= 1
    assert pk["rows"] < d["dialogues"]  # a demo dialogue is far shorter than 512 tokens: they share rows
    rc, out, _ = run(["data", "inspect", str(DEMO), "--model", "builtin:tiny", "--max_length", "512"], capsys)
    assert rc == 0 and "packing efficiency" in out and "tokens per dialogue" in out


def test_packing_uses_lengths_after_dropping_early_turns(tiny_model_dir, tmp_path, capsys):
    """A long first exchange is dropped to fit max_length, leaving a short dialogue: packing must see the
    short length that training sees, not max_length."""
    p = tmp_path / "long_first.jsonl"
    lines = [sharegpt(f"d{i}", "焦虑" * 300, "嗯" * 300, f"谢谢{i}", "不客气") for i in range(12)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    d = inspect_json(capsys, str(p), "--model", "builtin:tiny", "--max_length", "128")
    assert d["tokens"]["p50"] > 128
    assert d["truncation"] == {
        "dialogues": 12,
        "rate": 1.0,
        "turn_pairs_dropped": 12,
        "cut_inside_last_turn": 0,
    }
    pk = d["packing"]
    assert pk["padding_efficiency"] < 0.6 and pk["rows"] < 12
    assert pk["efficiency"] / pk["padding_efficiency"] == pytest.approx(12 / pk["rows"], rel=1e-3)


def test_max_length_needs_a_positive_value(capsys):
    rc, _, err = run(["data", "inspect", str(DEMO), "--model", "builtin:tiny", "--max_length", "0"], capsys)
    assert rc == 2 and "--max_length must be a positive" in err


def test_stats_counts_a_dialogue_the_chat_template_refuses():
    def refuse(*a, **k):
        raise ValueError("template says no\nsecond line")

    tok = types.SimpleNamespace(chat_template="{{ x }}", is_fast=True, apply_chat_template=refuse)
    s = Stats(max_length=64)
    s.add(Dialogue([Turn("user", "你好"), Turn("assistant", "你好")], source=Source("f.jsonl", 0, 1)), tok)
    assert (s.dialogues, s.rejected) == (0, 1)
    assert s.reject_reasons == {"chat template failed": 1}


@pytest.mark.parametrize(
    "reason, group",
    [
        ("turn 3 (assistant): empty text", "empty text"),
        ("turn 2: two user turns in a row (run `mhsft data clean` to merge them)", "two user turns in a row"),
        ("invalid JSON: Expecting value: line 1 column 1 (char 0)", "invalid JSON"),
        ("line is not valid UTF-8 (byte 17)", "line is not valid UTF-8"),
        (
            "utterance 12 has no speaker prefix (求助者：/支持者：): '我没有前缀'",
            "utterance N has no speaker prefix",
        ),
        (
            "invalid JSON at array element 5: parse error; the rest is skipped",
            "invalid JSON at array element N",
        ),
        ("turn 1 input: text is missing", "text is missing"),
    ],
)
def test_reject_reasons_group_by_kind(reason, group):
    assert reason_group(reason) == group


# ------------------------------------------------------------------------------ bad records and rejects


def test_convert_keeps_good_records_and_writes_rejects(mixed, tmp_path, capsys):
    out_file = tmp_path / "out" / "m.jsonl"
    rc, out, err = run(["data", "convert", str(mixed), "--output", str(out_file)], capsys)
    assert rc == 0
    assert [json.loads(x)["id"] for x in out_file.read_text(encoding="utf-8").splitlines()] == ["a1", "a2"]
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 3 and all(ONE_LINE_ERROR.match(x) for x in err_lines)
    assert err_lines[1].startswith(f"{mixed}:3: record #2: invalid JSON")
    rejects = [json.loads(x) for x in (tmp_path / "out" / "m.rejects.jsonl").read_text("utf-8").splitlines()]
    assert [(r["line"], r["id"]) for r in rejects] == [(2, "bad1"), (3, None), (5, "e1")]
    assert "two user turns in a row" in rejects[0]["reason"] and rejects[1]["record"] == "this is not json"
    assert "wrote 2 dialogue(s)" in out and "3 rejected record(s)" in out


def test_strict_stops_with_exit_2_and_writes_nothing(mixed, tmp_path, capsys):
    out_file = tmp_path / "s.jsonl"
    for cmd in (["convert", "--output", str(out_file)], ["validate"], ["inspect"]):
        rc, _, err = run(["data", cmd[0], str(mixed), *cmd[1:], "--strict"], capsys)
        assert rc == 2 and f"{mixed}:2: record bad1:" in err and "--strict" in err
    assert not out_file.exists() and not list(tmp_path.glob("*.tmp"))


def test_validate_exit_codes_and_lines(mixed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(["data", "validate", str(mixed)], capsys)
    assert rc == 1
    assert len(err.strip().splitlines()) == 3 and all(ONE_LINE_ERROR.match(x) for x in err.splitlines())
    assert out.strip() == "2 valid dialogue(s); 3 rejected record(s) written to mixed.rejects.jsonl"
    assert len((tmp_path / "mixed.rejects.jsonl").read_text("utf-8").splitlines()) == 3
    rc, out, err = run(["data", "validate", str(DEMO), "--rejects", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 0 and err == "" and "no rejected records" in out


def test_inspect_reports_invalid_records_and_the_first_one(mixed, capsys):
    rc, out, err = run(["data", "inspect", str(mixed)], capsys)
    assert rc == 0
    assert re.search(r"rejected records\s+│\s+3", out)
    assert f"the first: {mixed}:2: record bad1" in err and "mhsft data validate" in err


def test_inspect_writes_the_rejects_file_when_asked(mixed, tmp_path, capsys):
    rejects = tmp_path / "sub" / "inspect.rejects.jsonl"
    rc, out, err = run(["data", "inspect", str(mixed), "--rejects", str(rejects)], capsys)
    assert rc == 0 and f"all are in {rejects}" in err
    rows = [json.loads(x) for x in rejects.read_text("utf-8").splitlines()]
    assert [(r["line"], r["id"]) for r in rows] == [(2, "bad1"), (3, None), (5, "e1")]
    assert not list(tmp_path.glob("*.rejects.jsonl"))  # without --rejects inspect writes no file


def test_validate_a_lone_surrogate_is_a_reject_not_a_crash(tmp_path, capsys):
    """JSON allows "\\ud83d"; UTF-8 cannot hold it. The rejects file escapes it (one helper for `mhsft data` and
    the training loader), and the record is counted, not fatal."""
    f = tmp_path / "s.jsonl"
    f.write_text(sharegpt("ok", "你好", "你好呀") + "\n" + '{"id": "sur", "conversations": '
                 '[{"from": "human", "value": "\\ud83d 难过"}, {"from": "gpt", "value": "嗯"}]}\n', "utf-8")  # fmt: skip
    rejects = tmp_path / "r.jsonl"
    rc, out, err = run(["data", "validate", str(f), "--rejects", str(rejects)], capsys)
    assert rc == 1 and "1 valid dialogue(s); 1 rejected record(s)" in out
    assert "unpaired surrogate" in err and ONE_LINE_ERROR.match(err.strip())
    (row,) = [json.loads(x) for x in rejects.read_text("utf-8").splitlines()]
    assert row["id"] == "sur" and row["record"]["conversations"][0]["value"] == "\ud83d 难过"
    assert "\\ud83d" in rejects.read_text("utf-8")  # escaped: the file is valid UTF-8
    for cmd in (
        ["convert", "--output", str(tmp_path / "c.jsonl")],
        ["clean", "--output", str(tmp_path / "k.jsonl")],
    ):
        rc, out, _ = run(["data", *cmd, str(f), "--rejects", str(tmp_path / "r2.jsonl")], capsys)
        assert rc == 0 and "1 rejected record(s)" in out


def test_an_empty_json_array_is_named_as_such(tmp_path, capsys):
    (tmp_path / "empty.json").write_text(" [ ]\n", "utf-8")
    rc, out, err = run(["data", "validate", str(tmp_path / "empty.json")], capsys)
    assert rc == 2 and "a JSON array with no records" in err and "the file is empty" not in err
    (tmp_path / "nothing.json").write_text("", "utf-8")
    rc, out, err = run(["data", "validate", str(tmp_path / "nothing.json")], capsys)
    assert rc == 2 and "the file is empty" in err


def test_notices_are_counted(tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    for i in range(3):
        end = "来访者：\r\n" if i else ""
        (folder / f"case_{i}.txt").write_text(
            f"来访者：你好\r\n\r\n心理咨询师：你好，请说。\r\n\r\n{end}", "utf-8"
        )
    rc, out, err = run(["data", "validate", str(folder), "--rejects", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 0 and "3 valid dialogue(s); no rejected records" in out
    assert (
        "notice: 2 dialogue(s): an empty last turn" in out
        and f"(the first: {folder / 'case_1.txt'}:1)" in out
    )
    d = inspect_json(capsys, str(folder))
    assert d["notices"] == {
        "an empty last turn (a bare speaker prefix at the end of the transcript) was dropped": 2
    }


def test_convert_psyqa_to_sharegpt(tmp_path, capsys):
    out_file = tmp_path / "psyqa.jsonl"
    sample = REPO / "examples" / "data" / "psyqa_sample.json"
    rc, out, err = run(["data", "convert", str(sample), "--output", str(out_file)], capsys)
    assert rc == 0 and "wrote 10 dialogue(s)" in out and "no rejected records" in out
    rows = [json.loads(x) for x in out_file.read_text("utf-8").splitlines()]
    assert rows[0]["id"] == "psyqa-0001-1" and [t["from"] for t in rows[0]["conversations"]] == [
        "human",
        "gpt",
    ]


def test_clean_merges_dedups_and_redacts(tmp_path, capsys):
    src = tmp_path / "dirty.jsonl"
    twice = {
        "conversations": [
            {"from": "human", "value": "我很焦虑"},
            {"from": "human", "value": "怎么办？我的电话是13812345678"},
            {"from": "gpt", "value": "我们一起来看看。"},
        ]
    }
    lines = [
        json.dumps({"id": "d1", **twice}, ensure_ascii=False),
        json.dumps({"id": "d2", **twice}, ensure_ascii=False),
        sharegpt("d3", "邮箱 test@example.com", "请不要分享个人信息。"),
        sharegpt("d4", "我", "嗯"),
        "not json",
    ]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out_file = tmp_path / "clean.jsonl"
    rc, out, err = run(["data", "clean", str(src), "--output", str(out_file)], capsys)
    assert rc == 0
    recs = [json.loads(x) for x in out_file.read_text("utf-8").splitlines()]
    assert [r["id"] for r in recs] == ["d1", "d3", "d4"]
    assert recs[0]["conversations"][0]["value"] == "我很焦虑\n怎么办？我的电话是[手机号]"
    assert "[邮箱]" in recs[1]["conversations"][0]["value"]
    assert "exact duplicates dropped: 1" in out
    assert "same-role turns merged: 2" in out
    assert "personal data redacted: email 1, mobile 2 (total 3)" in out
    assert "near-duplicate pairs (kept, not dropped): 0" in out
    assert "1 rejected record(s)" in out and f"{src}:5: record #4: invalid JSON" in err


# ------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: d / "missing.jsonl", "no such file or folder"),
        (lambda d: (d / "empty.jsonl").write_bytes(b"") and d / "empty.jsonl" or d / "empty.jsonl", "empty"),
        (
            lambda d: (d / "nodata").mkdir() or (d / "nodata" / "notes.md").write_text("x") and d / "nodata",
            "no .json",
        ),
    ],
    ids=["missing", "empty-file", "folder-without-data"],
)
@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_missing_and_empty_inputs_are_one_line_errors(tmp_path, capsys, make, reason, command):
    path = make(tmp_path)
    rc, out, err = run(["data", command, str(path)], capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and reason in err and str(path) in err


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".txt"])
def test_binary_garbage(tmp_path, capsys, suffix):
    p = tmp_path / f"garbage{suffix}"
    p.write_bytes(bytes(range(256)) * 8 + b"\n\x00\xff{[\n" * 5)
    rc, out, err = run(["data", "validate", str(p), "--rejects", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 1 and "0 valid dialogue(s)" in out
    assert err and all(ONE_LINE_ERROR.match(x) or x.startswith(f"{p}:#") for x in err.strip().splitlines())
    rc, out, _ = run(["data", "inspect", str(p)], capsys)
    assert rc == 0 and re.search(r"dialogues\s+│\s+0", out)


@pytest.mark.parametrize("extra", [[], ["--use_hf", "true"]], ids=["modelscope", "huggingface"])
def test_hub_id_offline_fails_fast_with_advice(tmp_path, extra):
    # In a subprocess: the ModelScope client fixes its cache folder when first imported, which would
    # leak into tests that point MODELSCOPE_CACHE elsewhere.
    t = time.monotonic()
    p = run_c_locale(
        ["data", "inspect", "someorg/no-such-dataset", *extra],
        tmp_path,
        strict_ascii=False,
        env_extra={"MODELSCOPE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "MODELSCOPE_CACHE": str(tmp_path)},
    )
    assert time.monotonic() - t < 30
    err = p.stderr.decode("utf-8")
    assert p.returncode == 2 and p.stdout == b"" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: dataset someorg/no-such-dataset" in last and "pass a local file" in last


def test_usage_mistakes(mixed, tmp_path, capsys):
    rc, _, err = run(["data", "inspect", str(mixed), "--bogus_flag", "1"], capsys)
    assert rc == 2 and "unrecognized argument(s) --bogus_flag" in err
    rc, _, err = run(["data", "inspect"], capsys)
    assert rc == 2 and "give at least one dataset" in err
    rc, _, err = run(["data", "frobnicate", str(mixed)], capsys)
    assert rc == 2 and "inspect, validate, convert, clean" in err
    rc, _, err = run(["data", "convert", str(mixed)], capsys)
    assert rc == 2 and "needs --output" in err
    rc, _, err = run(["data", "convert", str(mixed), "--output", "x.jsonl", "--to", "alpaca"], capsys)
    assert rc == 2 and "--to must be sharegpt or messages" in err
    rc, _, err = run(["data", "convert", str(mixed), "--output", str(tmp_path)], capsys)
    assert rc == 2 and "is a folder" in err
    blocker = tmp_path / "afile"
    blocker.write_text("")
    rc, _, err = run(["data", "convert", str(mixed), "--output", str(blocker / "x.jsonl")], capsys)
    assert rc == 2 and f"{blocker} is a file, not a folder" in err  # said before reading anything
    assert len(err.strip().splitlines()) == 1


def test_datasets_may_follow_the_flags(mixed, capsys):
    d = inspect_json(capsys, "--strict", "false", str(DEMO), "--seed", "1", str(mixed))
    assert d["datasets"] == [str(DEMO), str(mixed)] and d["rejected"] == 3
    rc, out, err = run(["data", "inspect", "--json", str(mixed)], capsys)  # a bool flag does not eat the path
    assert rc == 0, err
    assert json.loads(out)["dialogues"] == 2
    assert inspect_json(capsys, f"--dataset={mixed}", f"{DEMO}#5")["dialogues"] == 2 + 5


@pytest.mark.parametrize("command", [[], ["inspect"], ["validate"], ["convert"], ["clean"]])
def test_data_help(command, capsys):
    rc, out, _ = run(["data", *command, "--help"], capsys)
    assert rc == 0 and "usage: mhsft data" in out
    if command:
        assert "--dataset_format" in out and out.startswith(f"mhsft data {command[0]}: ")


# --------------------------------------------------------------------------- end to end, in a subprocess


@pytest.mark.parametrize("strict_ascii", [False, True], ids=["LANG=C", "ascii-stdio"])
def test_chinese_output_under_c_locale(tmp_path, strict_ascii):
    bad = tmp_path / "e.json"
    bad.write_text(json.dumps(["求助者：你好", "我没有前缀"], ensure_ascii=False), encoding="utf-8")
    p = run_c_locale(["data", "validate", "e.json"], tmp_path, strict_ascii)
    assert p.returncode == 1
    err = p.stderr.decode("utf-8")  # raises if not UTF-8
    assert "e.json:1: record e: utterance 2 has no speaker prefix (求助者：/支持者：): '我没有前缀'" in err
    assert "Traceback" not in err
    dirty = tmp_path / "d.jsonl"
    dirty.write_text(sharegpt("x", "我的邮箱是 a@b.com", "好的。") + "\n", encoding="utf-8")
    p = run_c_locale(["data", "clean", "d.jsonl", "--output", "c.jsonl"], tmp_path, strict_ascii)
    assert p.returncode == 0
    assert "[邮箱]" in (tmp_path / "c.jsonl").read_text(encoding="utf-8")
    p = run_c_locale(["data", "inspect", "c.jsonl", "--json"], tmp_path, strict_ascii)
    assert p.returncode == 0 and json.loads(p.stdout.decode("utf-8"))["dialogues"] == 1


def test_exit_codes_without_traceback_end_to_end(tmp_path, mixed):
    (tmp_path / "junk.json").write_bytes(b"\x00\x01\x02binary")
    for args, rc in [
        (["data", "validate", "junk.json"], 1),
        (["data", "inspect", "nope.jsonl"], 2),
        (["data", "convert", str(mixed), "--output", "o.jsonl", "--strict"], 2),
        (["data", "convert", str(mixed), "--output", "o.jsonl"], 0),
    ]:
        p = run_c_locale(args, tmp_path, strict_ascii=False)
        assert p.returncode == rc, (args, p.stderr)
        assert b"Traceback" not in p.stderr


def test_progress_bar_only_on_a_terminal(shared_data, monkeypatch, capsys):
    emo = str(shared_data / "train" / "emollm_data.json")
    rc, _, err = run(["data", "validate", emo, "--rejects", os.devnull], capsys)
    assert rc == 0 and "dialogues" not in err  # captured stderr is not a tty: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, _, err = run(["data", "validate", emo, "--rejects", os.devnull], capsys)
    assert rc == 0 and "reading: " in err and "1596" in err and "dialogues" in err
    rc, _, err = run(["data", "validate", emo, "--rejects", os.devnull, "--no_progress"], capsys)
    assert rc == 0 and err == ""
