"""Dataset readers: every format, every container, bad records as DataErrors, the writer, and fuzzing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhsft.data.readers import FORMATS, detect_format, iter_file, list_data_files, parse_record, write_jsonl
from mhsft.data.schema import DataError, Dialogue, Source, Turn, validate_dialogue


def read(path, fmt="auto"):
    items = list(iter_file(path, fmt))
    return [x for x in items if isinstance(x, Dialogue)], [x for x in items if isinstance(x, DataError)]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(path: Path, *records) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


SHAREGPT = {
    "id": "s1",
    "system": "你是心理咨询师。",
    "conversations": [{"from": "human", "value": "我很焦虑"}, {"from": "gpt", "value": "能说说吗？"}],
}


# ---------------------------------------------------------------------------------------------------------
# Formats


def test_sharegpt_top_level_and_inner_system(tmp_path):
    inner = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "user", "value": "q"},
            {"from": "assistant", "value": "a"},
        ]
    }
    good, bad = read(jsonl(tmp_path / "a.jsonl", SHAREGPT, inner))
    assert not bad
    assert good[0].system == "你是心理咨询师。" and good[0].source.id == "s1" and good[0].source.line == 1
    assert [(t.role, t.content) for t in good[0].turns] == [("user", "我很焦虑"), ("assistant", "能说说吗？")]
    assert good[1].system == "S" and [t.role for t in good[1].turns] == ["user", "assistant"]
    assert detect_format(tmp_path / "a.jsonl") == "sharegpt"


def test_messages(tmp_path):
    rec = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "2"}]},
        ]
    }
    good, bad = read(jsonl(tmp_path / "m.jsonl", rec))
    assert not bad and good[0].system == "S"
    assert good[0].to_messages() == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert detect_format(tmp_path / "m.jsonl") == "messages"


def test_alpaca_input_history_system(tmp_path):
    recs = [
        {"instruction": "指令", "input": "补充", "output": "回答", "system": "S", "history": [["q0", "a0"]]},
        {"instruction": "只有指令", "input": "", "output": "回答"},
        {"instruction": "只有指令", "output": "回答"},
    ]
    good, bad = read(write(tmp_path / "a.json", json.dumps(recs, ensure_ascii=False)))
    assert not bad and len(good) == 3
    assert [(t.role, t.content) for t in good[0].turns] == [
        ("user", "q0"),
        ("assistant", "a0"),
        ("user", "指令\n补充"),
        ("assistant", "回答"),
    ]
    assert good[0].system == "S" and good[0].source.index == 0 and good[2].source.index == 2
    assert good[1].turns[0].content == "只有指令" == good[2].turns[0].content
    assert detect_format(tmp_path / "a.json") == "alpaca"


def test_emollm_system_on_first_turn(tmp_path):
    rec = {"conversation": [{"system": "S", "input": "i1", "output": "o1"}, {"input": "i2", "output": "o2"}]}
    good, bad = read(write(tmp_path / "e.json", json.dumps([rec])))
    assert not bad and good[0].system == "S" and len(good[0].turns) == 4
    assert detect_format(tmp_path / "e.json") == "emollm"
    later = {
        "conversation": [{"input": "i1", "output": "o1"}, {"system": "S2", "input": "i2", "output": "o2"}]
    }
    assert "first turn" in read(jsonl(tmp_path / "e2.jsonl", later))[1][0].reason


def test_cpsycound_text(tmp_path):
    text = (
        "\ufeff来访者：你好，我最近很累。\r\n\r\n"
        "心理咨询师：能具体说说吗？\r\n"
        "1. 睡眠\r\n"  # no prefix: continues the counselor's turn
        "2. 饮食\r\n\r\n"
        "（经过一段时间的放松训练）\r\n\r\n"
        "心理咨询师: 现在感觉如何？\r\n\r\n"  # ASCII colon; same speaker again: merged
        "来访者：好多了。\r\n"
    )
    good, bad = read(write(tmp_path / "case_7.txt", text))
    assert not bad and good[0].source.id == "case_7"
    assert [t.role for t in good[0].turns] == ["user", "assistant", "user"]
    assert good[0].turns[0].content == "你好，我最近很累。"
    assert (
        good[0].turns[1].content
        == "能具体说说吗？\n1. 睡眠\n2. 饮食\n\n（经过一段时间的放松训练）\n\n现在感觉如何？"
    )
    assert detect_format(tmp_path / "case_7.txt") == "cpsycound"


def test_cpsycound_bad_text(tmp_path):
    _, bad = read(write(tmp_path / "case_1.txt", "前言没有说话人\n\n来访者：你好\n"))
    assert len(bad) == 1 and bad[0].source.line == 1 and "before the first speaker" in str(bad[0])
    _, bad = read(write(tmp_path / "case_2.txt", "心理咨询师：你好\n\n来访者：嗯\n"))
    assert "expected user" in bad[0].reason
    _, bad = read(write(tmp_path / "case_3.txt", b"\xff\xfe\x00\x00"))
    assert "UTF-8" in bad[0].reason


def test_cpsycoune_file_is_one_dialogue(tmp_path):
    f = write(
        tmp_path / "Career" / "1.json",
        json.dumps(["求助者：我很迷茫。", "支持者：听起来很辛苦。", "求助者：是的"]),
    )
    good, bad = read(f)
    assert not bad and len(good) == 1 and good[0].source.id == "Career/1"
    assert [(t.role, t.content) for t in good[0].turns] == [
        ("user", "我很迷茫。"),
        ("assistant", "听起来很辛苦。"),
        ("user", "是的"),
    ]
    assert detect_format(f) == "cpsycoune"
    _, bad = read(write(tmp_path / "2.json", json.dumps(["求助者：你好", "没有前缀"])))
    assert "no speaker prefix" in bad[0].reason


# ---------------------------------------------------------------------------------------------------------
# Containers and bad records


def test_jsonl_bad_lines_do_not_stop_the_file(tmp_path):
    f = write(
        tmp_path / "d.jsonl",
        json.dumps(SHAREGPT).encode()
        + b"\n\n{not json\n"
        + b'{"id": 7, "conversations": "\xff\xfe"}\n'
        + json.dumps({**SHAREGPT, "id": [1, {"x": None}]}).encode()
        + b"\n",
    )
    items = list(iter_file(f))
    assert [type(x).__name__ for x in items] == ["Dialogue", "DataError", "DataError", "Dialogue"]
    assert [x.source.line for x in items] == [1, 3, 4, 5]  # 1-based physical lines; blank line 2 skipped
    assert str(items[1]).startswith(f"{f}:3: record #1: invalid JSON")
    assert "UTF-8" in items[2].reason and "\n" not in str(items[2])
    assert items[3].source.id == '[1, {"x": null}]'


def test_record_errors_are_one_line_and_name_the_record(tmp_path):
    cases = {
        "assistant first": {
            "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]
        },
        "empty text": {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}]},
        "no assistant": {"conversations": [{"from": "human", "value": "q"}]},
        "two users": {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "late system": {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "S"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "numeric speaker": {"conversations": [{"from": 3, "value": "q"}, {"from": "gpt", "value": "a"}]},
        "dict text": {"conversations": [{"from": "human", "value": {"a": 1}}, {"from": "gpt", "value": "a"}]},
        "null text": {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
        "surrogate": {"conversations": [{"from": "human", "value": "\ud800"}, {"from": "gpt", "value": "a"}]},
        "not a list": {"conversations": "hello"},
        "unknown shape": {"question": "q", "answer": "A"},
    }
    lines = [json.dumps({"id": name, **rec}) for name, rec in cases.items()] + ["[1, 2]", '"str"', "null"]
    f = write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    good, bad = read(f)
    assert not good and len(bad) == len(lines)
    for err, name in zip(bad, cases, strict=False):
        assert str(err).startswith(f"{f}:{err.source.line}: record {name}: ") and "\n" not in str(err)
        assert err.raw is not None and json.dumps(err.to_reject())
    assert "expected user" in bad[0].reason and "empty text" in bad[1].reason
    assert "no assistant" in bad[2].reason and "two user turns" in bad[3].reason


def test_truncated_json_array_keeps_records_before_the_failure(tmp_path):
    recs = json.dumps([SHAREGPT, SHAREGPT, SHAREGPT], ensure_ascii=False)
    good, bad = read(write(tmp_path / "t.json", recs[: len(recs) - 30]))
    assert len(good) == 2 and len(bad) == 1
    assert bad[0].source.index == 2 and "the file ends inside a string" in bad[0].reason
    assert "truncated?" in bad[0].reason
    good, bad = read(
        write(tmp_path / "u.json", b"\xef\xbb\xbf[" + json.dumps(SHAREGPT).encode() + b", nope]")
    )
    assert len(good) == 1 and len(bad) == 1


def _pretty_array(*elements: str) -> str:
    return "[\n" + ",\n".join(elements) + "\n]\n"


def test_a_bad_array_element_costs_only_itself(tmp_path):
    """NaN, a syntax error, a wrong type in the middle of an array: every later record is still read, and
    good + rejected = the elements present; each reject names its line, and no reason is a bytes repr."""
    rec = json.dumps(SHAREGPT, ensure_ascii=False, indent=2)
    elements = [rec, "NaN", rec, '{"conversations": [1, 2,, 3]}', rec, '"just a string"', rec, "[]", rec]
    f = write(tmp_path / "a.json", _pretty_array(*elements))
    good, bad = read(f)
    assert (len(good), len(bad)) == (5, 4)
    assert [e.source.index for e in bad] == [1, 3, 5, 7] and [d.source.index for d in good] == [0, 2, 4, 6, 8]
    assert "a JSON float" in bad[0].reason and bad[0].source.line == 2 + rec.count("\n") + 1
    assert bad[1].reason.startswith(f"invalid JSON at line {bad[1].source.line}, column ")
    assert all("b'" not in e.reason and "\\x" not in e.reason for e in bad)
    assert str(bad[1]).startswith(f"{f}:{bad[1].source.line}: record #3: invalid JSON")


def test_a_missing_bracket_is_reported_with_the_lines_it_swallows(tmp_path):
    rec = json.dumps(SHAREGPT, ensure_ascii=False, indent=2)
    broken = rec[:-1]  # the closing } is missing: the scanner cannot see where this record ends
    f = write(tmp_path / "b.json", _pretty_array(rec, broken, rec, rec))
    good, bad = read(f)
    assert len(good) == 1 and len(bad) == 1
    assert "the record spans lines" in bad[0].reason and "bytes" in bad[0].reason
    good, bad = read(write(tmp_path / "c.json", "[" + json.dumps(SHAREGPT) + "] garbage {}"))
    assert len(good) == 1 and len(bad) == 1 and "after the array's closing ] are not read" in bad[0].reason
    good, bad = read(
        write(tmp_path / "d.json", "[" + json.dumps(SHAREGPT) + "]], " + json.dumps(SHAREGPT) + "]")
    )
    assert len(good) == 1 and len(bad) == 1 and "invalid JSON" in bad[0].reason  # a stray ] inside a record


def test_error_line_decodes_a_bytes_message():
    from mhsft.data.json_files import error_line

    assert error_line(ValueError(b"lexical error: invalid char in json text.\n  (right here)")) == (
        "lexical error: invalid char in json text."
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_gbk_files_get_an_encoding_hint(tmp_path, suffix):
    if suffix == ".txt":
        text = "来访者：我最近总是睡不着。\n\n心理咨询师：能说说是从什么时候开始的吗？\n"
    elif suffix == ".json":
        text = json.dumps([SHAREGPT, SHAREGPT], ensure_ascii=False)
    else:
        text = json.dumps(SHAREGPT, ensure_ascii=False) + "\n"
    good, bad = read(write(tmp_path / f"gbk{suffix}", text.encode("gbk")))
    assert not good and bad
    for e in bad:
        assert "not valid UTF-8" in e.reason and "looks like GBK/GB18030" in e.reason
        assert "iconv -f GB18030 -t UTF-8" in e.reason and "\n" not in str(e)


def test_utf16_and_latin1_files_get_an_encoding_hint(tmp_path):
    text = json.dumps(SHAREGPT, ensure_ascii=False) + "\n"
    for name, data in [("bom", text.encode("utf-16")), ("le", text.encode("utf-16-le"))]:
        _, bad = read(write(tmp_path / f"{name}.jsonl", data))
        assert len(bad) == 1 and "UTF-16" in bad[0].reason and "iconv -f UTF-16" in bad[0].reason
    latin = {"conversations": [{"from": "human", "value": "café crème"}, {"from": "gpt", "value": "ok"}]}
    _, bad = read(
        write(tmp_path / "latin1.jsonl", (json.dumps(latin, ensure_ascii=False) + "\n").encode("latin-1"))
    )
    assert len(bad) == 1 and "Latin-1" in bad[0].reason and "GBK" not in bad[0].reason


def test_jsonl_with_cr_only_line_endings(tmp_path):
    lines = [json.dumps({**SHAREGPT, "id": f"r{i}"}, ensure_ascii=False) for i in range(3)]
    f = write(tmp_path / "mac.jsonl", "\r".join(lines) + "\r")
    good, bad = read(f)
    assert not bad and [d.source.id for d in good] == ["r0", "r1", "r2"] and good[2].source.line == 3
    assert detect_format(f) == "sharegpt"
    good, bad = read(write(tmp_path / "mac.json", "\r".join(lines)))  # JSON lines in a .json file
    assert not bad and len(good) == 3


def test_cpsycound_trailing_bare_speaker_is_dropped_with_a_notice(tmp_path):
    from mhsft.data.readers import EMPTY_LAST_TURN

    text = "来访者：我最近很累。\r\n\r\n心理咨询师：能具体说说吗？\r\n\r\n来访者：\r\n"
    good, bad = read(write(tmp_path / "case_9.txt", text))
    assert not bad and [t.role for t in good[0].turns] == ["user", "assistant"]
    assert good[0].notes == [EMPTY_LAST_TURN]
    good, bad = read(
        write(tmp_path / "case_10.txt", "来访者：你好\r\n\r\n心理咨询师：\r\n\r\n来访者：嗯\r\n")
    )
    assert not good and "turn 2 (assistant): empty text" in bad[0].reason  # only the last turn is forgiven
    good, bad = read(write(tmp_path / "case_11.txt", "来访者：\r\n"))
    assert not good and "empty text" in bad[0].reason


def test_psyqa_one_dialogue_per_answer():
    sample = Path(__file__).resolve().parents[2] / "examples" / "data" / "psyqa_sample.json"
    records = json.loads(sample.read_text(encoding="utf-8"))
    good, bad = read(sample)
    assert not bad and len(good) == sum(len(r["answers"]) for r in records) == 10
    assert detect_format(sample) == "psyqa" and "psyqa" in FORMATS
    first = good[0]
    assert first.source.id == "psyqa-0001-1" and good[1].source.id == "psyqa-0001-2"
    assert first.turns[0].content == records[0]["question"] + "\n" + records[0]["description"]
    assert first.turns[1].content == records[0]["answers"][0]["answer_text"]
    no_description = next(d for d in good if d.source.id == "psyqa-0005-1")
    assert no_description.turns[0].content == "工作压力太大，晚上总是失眠"


def test_psyqa_bad_answers_are_rejected_one_by_one(tmp_path):
    rec = {
        "questionID": "q9",
        "question": "我很焦虑",
        "description": "考试前总是睡不着",
        "keywords": "焦虑",
        "answers": [{"answer_text": "先深呼吸。"}, {"answer_text": ""}, "不是对象", {"answer_text": 3}],
    }
    f = jsonl(tmp_path / "p.jsonl", rec, {**rec, "questionID": "q10", "answers": []})
    good, bad = read(f, "psyqa")
    assert len(good) == 1 and len(bad) == 4  # three bad answers, one question without answers
    assert [e.source.id for e in bad] == ["q9-2", "q9-3", "q9-4", "q10"]
    assert "empty text" in bad[0].reason and "expected an object" in bad[1].reason
    assert bad[0].raw["answers"] == [{"answer_text": ""}] and "non-empty list" in bad[3].reason


def test_hostile_nesting_costs_one_record_not_the_machine(tmp_path):
    # ijson.items would need gigabytes for this (a prefix string per level); we skip the element unbuilt.
    deep = b"[" * 100_000 + b"]" * 100_000
    good, bad = read(write(tmp_path / "deep.json", b"[" + deep + b"," + json.dumps(SHAREGPT).encode() + b"]"))
    assert len(good) == 1 and len(bad) == 1 and "deeper than" in bad[0].reason and bad[0].source.index == 0
    good, bad = read(write(tmp_path / "deep.jsonl", deep + b"\n" + json.dumps(SHAREGPT).encode() + b"\n"))
    assert len(good) == 1 and len(bad) == 1 and bad[0].source.line == 1
    assert detect_format(tmp_path / "deep.json") == "unknown"


def test_single_object_file_and_json_lines_in_json_file(tmp_path):
    good, bad = read(write(tmp_path / "one.json", json.dumps(SHAREGPT, indent=2)))
    assert len(good) == 1 and not bad
    good, bad = read(
        write(tmp_path / "lines.json", json.dumps(SHAREGPT) + "\n" + json.dumps(SHAREGPT) + "\n")
    )
    assert len(good) == 2 and good[1].source.line == 2
    assert detect_format(tmp_path / "lines.json") == "sharegpt"


def test_whole_file_problems_are_single_errors(tmp_path):
    _, bad = read(tmp_path / "missing.jsonl")
    assert len(bad) == 1 and "no such file" in bad[0].reason
    _, bad = read(write(tmp_path / "x.json", "hello world"))
    assert len(bad) == 1 and "not a JSON array" in bad[0].reason
    _, bad = read(jsonl(tmp_path / "a.jsonl", SHAREGPT), fmt="csv")
    assert len(bad) == 1 and "unknown format" in bad[0].reason
    assert read(write(tmp_path / "empty.json", "  \n")) == ([], [])


def test_explicit_format_overrides_detection(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", SHAREGPT)
    assert len(read(f, "sharegpt")[0]) == 1
    _, bad = read(f, "messages")
    assert "no 'messages'" in bad[0].reason
    _, bad = read(f, "emollm")
    assert bad and "conversation" in bad[0].reason


def test_folder_recurses_sorted_mixed_and_skips_hidden(tmp_path):
    jsonl(tmp_path / "b" / "x.jsonl", SHAREGPT)
    write(tmp_path / "a" / "case_1.txt", "来访者：你好\n\n心理咨询师：你好\n")
    write(tmp_path / "c.json", json.dumps(["求助者：嗨", "支持者：嗨"]))
    jsonl(tmp_path / ".hidden" / "y.jsonl", {"bad": 1})
    write(tmp_path / ".z.jsonl", "garbage")
    write(tmp_path / "README.md", "# not data")
    write(tmp_path / "dataset_infos.json", "{}")
    assert [p.relative_to(tmp_path).as_posix() for p in list_data_files(tmp_path)] == [
        "a/case_1.txt",
        "b/x.jsonl",
        "c.json",
    ]
    good, bad = read(tmp_path)
    assert not bad and [d.source.id for d in good] == ["case_1", "s1", f"{tmp_path.name}/c"]
    assert detect_format(tmp_path) == "mixed" and detect_format(tmp_path / "b") == "sharegpt"


def test_parse_record_in_memory():
    d = parse_record(SHAREGPT, source=Source("mem", id="s1"))
    assert d.source.id == "s1" and d.num_assistant_turns == 1
    with pytest.raises(DataError) as e:
        parse_record({"messages": []})
    assert e.value.raw == {"messages": []} and "no turns" in e.value.reason


# ---------------------------------------------------------------------------------------------------------
# Writer


@pytest.mark.parametrize("fmt", ["sharegpt", "messages"])
def test_write_jsonl_round_trip(tmp_path, fmt):
    dialogues = [
        Dialogue([Turn("user", "问\n题"), Turn("assistant", '答 "引号"')], "系统", Source("x", id="r1")),
        Dialogue([Turn("user", "q"), Turn("assistant", "a"), Turn("user", "q2")]),
    ]
    out = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(dialogues, out, fmt) == 2
    lines = out.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    if fmt == "sharegpt":
        assert first["system"] == "系统" and {t["from"] for t in first["conversations"]} == {"human", "gpt"}
    else:
        assert first["messages"][0] == {"role": "system", "content": "系统"}
    assert "问" in lines[0]  # UTF-8, not \u escapes
    good, bad = read(out)
    assert not bad and [d.key() for d in good] == [d.key() for d in dialogues] and good[0].source.id == "r1"
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_write_jsonl_is_atomic(tmp_path):
    out = jsonl(tmp_path / "out.jsonl", SHAREGPT)
    before = out.read_bytes()
    bad = Dialogue([Turn("user", "\ud800"), Turn("assistant", "a")])
    with pytest.raises(DataError):
        write_jsonl([Dialogue([Turn("user", "q"), Turn("assistant", "a")]), bad], out)
    assert out.read_bytes() == before and list(tmp_path.iterdir()) == [out]


# ---------------------------------------------------------------------------------------------------------
# Real data (../shared/data)


def test_real_emollm(shared_data):
    good, bad = read(shared_data / "train" / "emollm_data.json")
    assert len(good) == 1596 and not bad
    assert all(d.system for d in good) and all(2 <= d.num_assistant_turns <= 5 for d in good)


def test_real_cpsycound_folder(shared_data):
    good, bad = read(shared_data / "train" / "cpsycound_sample")
    assert len(good) == 400 and not bad
    case = next(d for d in good if d.source.id == "case_112")  # counselor speaks on after a narration line
    assert "（经过一段时间的催眠引导）" in case.turns[3].content and case.turns[3].role == "assistant"


def test_real_cpsycoune(shared_data):
    folder = shared_data / "eval" / "cpsycoune"
    good, bad = read(folder / "Career" / "1.json")
    assert len(good) == 1 and not bad and good[0].turns[0].role == "user"
    good, bad = read(folder)
    assert len(good) == 18 and not bad and len({d.source.id for d in good}) == 18


def test_real_data_round_trips_through_sharegpt_jsonl(shared_data, tmp_path):
    for src in (shared_data / "train" / "emollm_data.json", shared_data / "train" / "cpsycound_sample"):
        original, _ = read(src)
        out = tmp_path / f"{src.stem}.jsonl"
        assert write_jsonl(original, out) == len(original)
        back, bad = read(out)
        assert not bad and [d.key() for d in back] == [d.key() for d in original]


# ---------------------------------------------------------------------------------------------------------
# Fuzzing: no input bytes or JSON shape may escape as an exception

_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="mhsft_fuzz_"))
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
_speaker = st.sampled_from(["human", "gpt", "user", "assistant", "system", "tool", "", "GPT"]) | _json
_turn = st.fixed_dictionaries({"from": _speaker, "value": st.text(max_size=10) | _json})
_near_sharegpt = st.fixed_dictionaries(
    {"conversations": st.lists(_turn, max_size=5) | _json},
    optional={"system": st.text(max_size=5) | _json, "id": _json},
)
_near_emollm = st.fixed_dictionaries(
    {
        "conversation": st.lists(
            st.dictionaries(st.sampled_from(["input", "output", "system"]), _json | st.text())
        )
    }
)
_records = (
    _json | _near_sharegpt | _near_emollm | st.lists(st.text(max_size=10).map(lambda s: "求助者：" + s))
)


def _check_all_formats(payload: bytes) -> None:
    for suffix in (".json", ".jsonl", ".txt"):
        path = _FUZZ_DIR / f"fuzz{suffix}"
        path.write_bytes(payload)
        for fmt in ("auto", *FORMATS):
            for item in iter_file(path, fmt):
                if isinstance(item, Dialogue):
                    validate_dialogue(item)
                else:
                    assert isinstance(item, DataError) and "\n" not in str(item)
                    # "unexpected": the catch-all in iter_file hid a reader bug
                    assert not item.reason.startswith("unexpected"), item.reason
        detect_format(path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(payload):
    _check_all_formats(payload)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_records, max_size=4), st.sampled_from(["array", "lines", "single"]))
def test_fuzz_random_json(records, layout):
    if layout == "array":
        text = json.dumps(records, ensure_ascii=False)
    elif layout == "lines":
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    else:
        text = json.dumps(records[0] if records else {}, indent=1)
    _check_all_formats(text.encode("utf-8", "surrogatepass"))
