"""Data fuzzing of every reader: mutated copies of a seed file per format, each read through the entry points users
reach, in worker processes with a per-file timeout.

Seeds (built here, in the layouts of ../shared/data/README.md): training formats (ShareGPT JSONL and array, OpenAI
messages, Alpaca, EmoLLM/XTuner, a single object, CPsyCounD text and a folder of cases, a CPsyCounE utterance
array, PsyQA) and evaluation formats (multiple-choice JSONL, a CPsyExam array, a PCEB folder with theory and case
groups, open-QA JSONL, CMMLU and C-Eval CSV, PsyQA, a CPsyCounE dialogue). Mutations:

- bytes: bit flips, inserted / deleted / random bytes, truncation, re-encoding (GBK, UTF-16 LE/BE with and without a
  BOM, Latin-1), BOMs, line endings (CRLF, CR only, mixed), lone surrogates (escaped `\\ud83d` and raw CESU bytes);
- structure: wrong types, missing keys, NaN / Infinity, deep nesting, huge strings, empty containers, duplicated
  keys, huge numbers, control characters (JSON and CSV seeds; for CPsyCounD text: empty turns, missing or unknown
  speakers, a bare speaker at the end, narration, blank files).

Each file goes through: training formats -> `iter_file` (what `mhsft data` and `mhsft sft` read with), `mhsft data
validate` and `mhsft data inspect --json` in-process, `load_datasets` (the trainer's loader, with its rejects file);
evaluation formats -> `load_eval_set` (what `mhsft eval` reads with). Counted per file:

- tracebacks: any exception other than the one-line UserError, a "Traceback" in the output, a reject reason that
  is the readers' catch-all ("unexpected ..."), a reject line that is not one line, a rejects file that is not
  UTF-8 JSON lines; must be 0.
- hangs: a file not finished within --timeout seconds (its worker is killed and replaced); must be 0.
- counts: good + rejected = records present, where the records present can be counted without the readers: a
  JSONL file's non-blank lines, a JSON array that Python's json parses, a single object, a CPsyCounD file (one
  dialogue), a CSV whose rows the csv module reads under a CMMLU/C-Eval header; structural mutants know their
  count by construction. PsyQA's answers are counted per question (one record, several dialogues); PCEB case
  groups are not counted (a group is its sub-questions or one reject).

    python benchmarks/soak/fuzz_readers.py            # full: 2,000+ mutated files
    python benchmarks/soak/fuzz_readers.py --quick    # CI: 650 files, 20-30 s on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import multiprocessing as mp
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "soak_fuzz.json"


# ---------------------------------------------------------------------------------------------------------
# Seeds


@dataclass
class Seed:
    name: str
    entry: str  # train | eval | both
    container: str  # jsonl | array | object | text | csv | folder_text | folder_pceb
    suffix: str
    records: list = field(default_factory=list)  # JSON seeds: the records; text/csv: one string per file
    fmt: str = "auto"  # training seeds are also read with this --dataset_format


def _turns(*texts: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


CASE_TEXT = "\ufeff来访者：我最近总是失眠，躺下就开始想工作上的事。\r\n\r\n心理咨询师：听起来你压力很大，能说说是哪些事吗？\r\n\r\n来访者：领导总是临时加任务，我怕做不完被批评。\r\n\r\n心理咨询师：你很在意别人对你的评价。我们先试着把担心的事写下来。\r\n"  # noqa: E501
CASES = [
    CASE_TEXT,
    "来访者：孩子不愿意上学。\n\n心理咨询师：这种情况持续多久了？\n（沉默片刻）\n\n来访者：两个月了。\n",
    "来访者：我和室友总吵架。\n\n心理咨询师：吵架通常是因为什么？\n",
]
OPTS = {"A": "焦虑", "B": "抑郁", "C": "强迫", "D": "恐惧", "E": ""}


@functools.lru_cache(maxsize=1)
def seeds() -> list[Seed]:
    sg = [{"id": f"s{i}", "system": "你是一位心理咨询师。", "conversations": _turns(f"我很焦虑{i}", "能说说吗？", "睡不着", "我们一起想办法。")} for i in range(3)]  # fmt: skip
    msgs = [{"messages": [{"role": "user", "content": f"考试前紧张{i}"}, {"role": "assistant", "content": "深呼吸。"}]} for i in range(3)]  # fmt: skip
    alpaca = [{"instruction": "如何缓解焦虑？", "input": f"我{i}岁", "output": "规律作息。", "history": [["你好", "你好"]]} for i in range(3)]  # fmt: skip
    emollm = [{"conversation": [{"system": "现在你是一个心理专家。", "input": f"医生，我很焦虑{i}", "output": "首先感谢你。"}, {"input": "谢谢", "output": "不客气"}]} for i in range(3)]  # fmt: skip
    coune = [
        "求助者：我最近很迷茫。",
        "支持者：能具体说说吗？",
        "求助者：不知道以后做什么。",
        "支持者：我们慢慢理一理。",
    ]
    psyqa = json.loads((ROOT / "examples" / "data" / "psyqa_sample.json").read_text(encoding="utf-8"))[:3]
    mcq = [{"id": f"q{i}", "question": f"下列属于情绪障碍的是{i}", "choices": ["焦虑症", "感冒", "骨折", "近视"], "answer": "A" if i else "A,B"} for i in range(3)]  # fmt: skip
    exam = [{"subject_name": "心理咨询师三级", "question_type": t, "kind": "knowledge", "question": "个体行为的关键是（ ）。", "options": OPTS, "answer": a, "id": f"e{i}"} for i, (t, a) in enumerate([("single", "D"), ("multi", "ABD"), ("single", "B")])]  # fmt: skip
    qa = [
        {"question": f"什么是共情{i}？", "answer": "理解来访者的感受（2分），并表达出来（1分）。"}
        for i in range(3)
    ]
    cmmlu = ',Question,A,B,C,D,Answer\n0,躁狂发作属于,急性应激障碍,人格障碍,心境障碍,应激后障碍,C\n1,"活泼好动是（）特性",能力,气质,"兴趣,爱好",性格,B\n2,看见玫瑰花并认识它,思维,错觉,感觉,知觉,D\n'  # noqa: E501
    ceval = 'id,question,A,B,C,D,answer,explanation\n0,焦虑的核心是,担忧,愤怒,悲伤,厌恶,A,"1. 焦虑, 即""担忧"""\n1,问二,甲,乙,丙,丁,,\n'
    return [
        Seed("sharegpt_jsonl", "both", "jsonl", ".jsonl", sg, "sharegpt"),
        Seed("sharegpt_array", "train", "array", ".json", sg, "sharegpt"),
        Seed("messages_jsonl", "train", "jsonl", ".jsonl", msgs, "messages"),
        Seed("alpaca_array", "train", "array", ".json", alpaca, "alpaca"),
        Seed("emollm_array", "train", "array", ".json", emollm, "emollm"),
        Seed("single_object", "train", "object", ".json", sg[:1], "sharegpt"),
        Seed("cpsycound_text", "train", "text", ".txt", [CASE_TEXT], "cpsycound"),
        Seed("cpsycound_folder", "train", "folder_text", ".txt", CASES, "cpsycound"),
        Seed("cpsycoune_array", "both", "array", ".json", [coune], "cpsycoune"),
        Seed("psyqa_array", "both", "array", ".json", psyqa, "psyqa"),
        Seed("mcq_jsonl", "eval", "jsonl", ".jsonl", mcq),
        Seed("cpsyexam_array", "eval", "array", ".json", exam),
        Seed("pceb_folder", "eval", "folder_pceb", ".json", [exam[:1], [_pceb_case()]]),
        Seed("qa_jsonl", "eval", "jsonl", ".jsonl", qa),
        Seed("cmmlu_csv", "eval", "csv", ".csv", [cmmlu]),
        Seed("ceval_csv", "eval", "csv", ".csv", [ceval]),
    ]


def _pceb_case() -> dict:
    return {"id": 7, "general_info": "女，25岁", "case_introduction": "失眠一个月",
            "questions_and_answers": [{"question": "单选：1．主要症状是（　）。", "options": {"A": "强迫", "B": "焦虑"}, "answer": "B"},
                                      {"question": "多选：2．出现了（　）。", "options": {"A": "幻觉", "B": "错觉"}, "answer": "AB"},
                                      {"question": "3．请分析原因。（10 分）", "answer": "生物原因（2 分）、社会原因（3 分）"}]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Serializing a seed, and counting its records without the readers

ONE_RECORD = {"cpsycoune_array"}  # an array of utterance strings is one dialogue
COUNSELING_FILES = ("case_0.txt", "case_1.txt", "case_2.txt")
PCEB_FILES = ("theory/single/third/t.json", "cases/mix/second/c.json")


def serialize(seed: Seed, records: list, ascii_: bool = False) -> dict[str, str]:
    """{relative path: text} of a seed's file(s) holding `records` (`ascii_`: Chinese as \\u escapes)."""
    c = seed.container

    def dump(v) -> str:
        return json.dumps(v, ensure_ascii=ascii_, indent=2)

    if c == "jsonl":
        return {"data.jsonl": "".join(json.dumps(r, ensure_ascii=ascii_) + "\n" for r in records)}
    if c == "array":
        return {"data.json": dump((records[0] if records else []) if seed.name in ONE_RECORD else records)}
    if c == "object":
        return {"data.json": dump(records[0]) if records else ""}
    if c == "text":
        return {"case_0.txt": records[0]}
    if c == "csv":
        return {"data_test.csv": records[0]}
    if c == "folder_text":
        return dict(zip(COUNSELING_FILES, records))
    return {p: dump(r) for p, r in zip(PCEB_FILES, records)}


def _utf8(data: bytes) -> str | None:
    if b"\x00" in data or data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None  # not UTF-8 text (NULs: UTF-16/32, binary): the readers reject the whole file
    try:
        return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError:
        return None


def _lines(data: bytes) -> list[bytes]:
    head = data[: 1 << 16]
    return data.split(b"\r") if b"\r" in head and b"\n" not in head else data.split(b"\n")


def count_records(seed: Seed, rel: str, data: bytes) -> int | None:
    """Records in one file, counted with Python's json / csv modules and line splitting only; None where that
    cannot say (not UTF-8, not parseable as a whole, ...)."""
    if rel.endswith(".txt"):
        return 1  # a CPsyCounD file is one dialogue, read or rejected whole
    if rel.endswith(".jsonl"):
        return None if _utf8(data) is None else sum(1 for ln in _lines(data) if ln.strip())
    text = _utf8(data)
    if text is None:
        return None
    if rel.endswith(".csv"):
        return _count_csv(text)
    head = text.lstrip()[:1]
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = ...
    if head == "[":
        if not isinstance(value, list):
            return None
        return 1 if value and isinstance(value[0], str) else len(value)
    if head == "{":  # JSON lines (the first line, or one of the first 20, a JSON value), else one object
        lines = [ln for ln in _lines(data.removeprefix(b"\xef\xbb\xbf")) if ln.strip()]
        if _is_json(lines[0]) or (value is ... and any(map(_is_json, lines[:20]))):
            return len(lines)
        return 1  # one object, readable or not
    return None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except (ValueError, RecursionError):
        return False


def _count_csv(text: str) -> int | None:
    import csv

    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:
        return None
    if not rows:
        return 0
    names = {x.strip().lower() for x in rows[0]}
    if "question" not in names or len(names & set("abcdefghij")) < 2:
        return None  # not this format: the reader rejects the file as a whole
    return sum(1 for r in rows[1:] if any(x.strip() for x in r))


# ---------------------------------------------------------------------------------------------------------
# Byte-level mutations: (rng, bytes) -> bytes


def m_flip(rng: random.Random, d: bytes) -> bytes:
    b = bytearray(d)
    for _ in range(rng.randint(1, 8)):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_insert(rng: random.Random, d: bytes) -> bytes:
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(0, len(d))
        junk = rng.choice(
            [rng.randbytes(rng.randint(1, 16)), b",", b"]", b"}", b'"', b"\\", b"{", b"[", b"\n"]
        )
        d = d[:i] + junk + d[i:]
    return d


def m_delete(rng: random.Random, d: bytes) -> bytes:
    if not d:
        return d
    i = rng.randrange(len(d))
    return d[:i] + d[i + rng.randint(1, 64) :]


def m_truncate(rng: random.Random, d: bytes) -> bytes:
    return d[: rng.randint(0, max(len(d) - 1, 0))]


def m_random(rng: random.Random, d: bytes) -> bytes:
    if rng.random() < 0.3:
        return rng.randbytes(rng.randint(0, 2048))
    i = rng.randint(0, len(d))
    return d[:i] + rng.randbytes(rng.randint(1, 256)) + d[i + rng.randint(0, 256) :]


def m_encoding(rng: random.Random, d: bytes) -> bytes:
    text = d.decode("utf-8", "replace")
    enc = rng.choice(
        ["gbk", "gb18030", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252", "big5"]
    )
    return text.encode(enc, "replace")


def m_bom(rng: random.Random, d: bytes) -> bytes:
    bom = rng.choice(
        [b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xff\xfe\x00\x00"]
    )
    if rng.random() < 0.3:  # a BOM inside the file (files concatenated)
        i = rng.randint(0, len(d))
        return d[:i] + bom + d[i:]
    return bom + d


def m_newlines(rng: random.Random, d: bytes) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return d.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if choice == 1:
        return d.replace(b"\r\n", b"\n").replace(b"\n", b"\r")
    if choice == 2:
        return d.replace(b"\r\n", b"\n")
    if choice == 3:
        return d.replace(b"\n", b"")
    return b"".join(ln + rng.choice([b"\n", b"\r\n", b"\r"]) for ln in d.split(b"\n"))


def m_surrogate(rng: random.Random, d: bytes) -> bytes:
    quotes = [i for i, c in enumerate(d) if c == 0x22] or [0]
    i = rng.choice(quotes) + 1
    piece = rng.choice(
        [b"\\ud83d", b"\\udc80", b"\\ud800\\ud800", b"\xed\xa0\xbd", b"\xed\xb2\x80", b"\\ud83d\\ude00"]
    )
    return d[:i] + piece + d[i:]


BYTE_MUTATIONS = {
    "flip": m_flip,
    "insert": m_insert,
    "delete": m_delete,
    "truncate": m_truncate,
    "random_bytes": m_random,
    "encoding": m_encoding,
    "bom": m_bom,
    "newlines": m_newlines,
    "surrogate": m_surrogate,
}


# ---------------------------------------------------------------------------------------------------------
# Structural mutations of JSON records: (rng, records, quick) -> records, with raw JSON text for placeholders

RAW = "\x00RAW{}\x00"  # a string replaced by raw JSON text after serializing (what json.dumps cannot write)
OTHER_VALUES = [None, 0, -1.5, True, "", "文本", [], {}, [1, "二"], {"x": None}]


def _paths(value) -> list[tuple]:
    """Every node of a JSON tree as a path of keys / indexes (iteratively: mutated trees nest deep)."""
    out, stack = [], [((), value)]
    while stack:
        path, v = stack.pop()
        out.append(path)
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        stack.extend((path + (k,), c) for k, c in items)
    return out


def _get(root, path):
    for k in path:
        root = root[k]
    return root


def _set(root, path, new):
    _get(root, path[:-1])[path[-1]] = new


def _pick(rng: random.Random, records: list, want=None) -> tuple | None:
    paths = [p for p in _paths(records) if p and (want is None or isinstance(_get(records, p), want))]
    return rng.choice(paths) if paths else None


def s_wrong_type(rng, recs, raws, quick):
    if (p := _pick(rng, recs)) is not None:
        _set(recs, p, rng.choice([v for v in OTHER_VALUES if type(v) is not type(_get(recs, p))]))
    return recs


def s_missing_key(rng, recs, raws, quick):
    if (p := _pick(rng, recs, dict)) is not None and (d := _get(recs, p)):
        del d[rng.choice(list(d))]
    return recs


def s_nan(rng, recs, raws, quick):
    if (p := _pick(rng, recs)) is not None:
        _set(recs, p, rng.choice([float("nan"), float("inf"), float("-inf")]))
    return recs


def s_deep(rng, recs, raws, quick):
    depth = rng.choice([65, 300, 990, 3000, 20000] if quick else [65, 300, 990, 3000, 20000, 200000])
    kind = rng.choice(["[]", "{}"])
    raw = ("[" * depth + "]" * depth) if kind == "[]" else ('{"a":' * depth + "1" + "}" * depth)
    return _raw(rng, recs, raws, raw)


def _raw(rng, recs, raws, raw: str, want=None):
    if (p := _pick(rng, recs, want)) is not None:
        key = RAW.format(len(raws))
        raws[key] = raw
        _set(recs, p, key)
    return recs


def s_huge_string(rng, recs, raws, quick):
    n = rng.choice([100_000, 1_000_000] if quick else [100_000, 1_000_000, 4_000_000])
    if (p := _pick(rng, recs, str) or _pick(rng, recs)) is not None:
        _set(recs, p, rng.choice(["长", "a", "😀", "\\"]) * n)
    return recs


def s_empty(rng, recs, raws, quick):
    if rng.random() < 0.2:
        return []
    if (p := _pick(rng, recs, (list, dict))) is not None:
        _set(recs, p, type(_get(recs, p))())
    return recs


def s_duplicate_key(rng, recs, raws, quick):
    if (p := _pick(rng, recs, dict)) is not None and (d := _get(recs, p)):
        key = RAW.format(len(raws))
        raws[key] = json.dumps(
            rng.choice(list(d)), ensure_ascii=False
        )  # the placeholder key becomes a duplicate
        d[key] = rng.choice(OTHER_VALUES + [next(iter(d.values()))])
    return recs


def s_big_number(rng, recs, raws, quick):
    raw = rng.choice(
        ["1" + "0" * 5000, "1e999999", "-1e-999999", "123456789012345678901234567890", "-0", "1.5e308"]
    )
    return _raw(rng, recs, raws, raw)


def s_control_chars(rng, recs, raws, quick):
    if (p := _pick(rng, recs, str)) is None:
        return recs
    s = _get(recs, p)
    c = rng.choice(["\x00", "\x01", "\x1b", "\x7f", "\u2028", "\u0085", "\ufeff", "\r", "\x0c"])
    if rng.random() < 0.5:  # escaped by json.dumps: valid JSON
        _set(recs, p, s[: len(s) // 2] + c + s[len(s) // 2 :])
        return recs
    return _raw(rng, recs, raws, '"' + s + c + '"', str)  # raw, unescaped: not valid JSON


def s_lone_surrogate(rng, recs, raws, quick):
    if (p := _pick(rng, recs, str)) is not None:
        s = _get(recs, p)
        _set(recs, p, rng.choice(["\ud800" + s, s + "\udfff", "\udc80", s[:1] + "\ud83d" + s[1:]]))
    return recs


def s_wrong_top(rng, recs, raws, quick):
    return rng.choice(
        [[1, 2, 3], ["字符串"], [None], [[r] for r in recs], [recs], [{}] * 3, [True, {"a": 1}]]
    )


def s_renamed_key(rng, recs, raws, quick):
    if (p := _pick(rng, recs, dict)) is not None and (d := _get(recs, p)):
        k = rng.choice(list(d))
        d[rng.choice([k.upper(), k + " ", k[:-1], "\u200b" + k, k.capitalize()]) if k else "x"] = d.pop(k)
    return recs


STRUCT_MUTATIONS = {
    "wrong_type": s_wrong_type,
    "missing_key": s_missing_key,
    "nan": s_nan,
    "deep_nesting": s_deep,
    "huge_string": s_huge_string,
    "empty": s_empty,
    "duplicate_key": s_duplicate_key,
    "big_number": s_big_number,
    "control_chars": s_control_chars,
    "lone_surrogate": s_lone_surrogate,
    "wrong_top": s_wrong_top,
    "renamed_key": s_renamed_key,
}


# ---------------------------------------------------------------------------------------------------------
# Structural mutations of CPsyCounD text and of CSV: (rng, text, quick) -> text


def _turn_lines(t: str) -> list[str]:
    return [ln for ln in t.replace("\ufeff", "").splitlines() if ln.strip()]


TEXT_MUTATIONS = {
    "empty_middle_turn": lambda rng, t, q: (
        t.replace("心理咨询师：听起来", "心理咨询师：\r\n\r\n来访者：嗯\r\n\r\n心理咨询师：听起来", 1)
        if "听起来" in t
        else "来访者：\n\n心理咨询师：你好\n"
    ),
    "bare_last_speaker": lambda rng, t, q: (
        t + rng.choice(["来访者：\r\n", "心理咨询师：", "来访者:  \n\n\n"])
    ),
    "unknown_speaker": lambda rng, t, q: t.replace(
        "心理咨询师：", rng.choice(["医生：", "咨询师：", "心理咨询师"]), 1
    ),
    "no_speakers": lambda rng, t, q: "\n".join(ln.split("：", 1)[-1] for ln in _turn_lines(t)),
    "preamble": lambda rng, t, q: rng.choice(["案例一\n", "（开始）\n\n", "#\n"]) + t,
    "counselor_first": lambda rng, t, q: (
        t.replace("来访者", "X").replace("心理咨询师", "来访者").replace("X", "心理咨询师")
    ),
    "one_speaker": lambda rng, t, q: t.replace("心理咨询师", "来访者"),
    "blank": lambda rng, t, q: rng.choice(["", "\r\n\r\n", "   \n\t\n", "\ufeff"]),
    "huge_turn": lambda rng, t, q: t + "\n来访者：" + "我" * (200_000 if q else 2_000_000) + "\n",
    "many_turns": lambda rng, t, q: "".join(
        f"来访者：问{i}\n\n心理咨询师：答{i}\n\n" for i in range(2_000 if q else 20_000)
    ),
    "line_separators": lambda rng, t, q: t.replace(
        "，", rng.choice(["\u2028", "\x0c", "\x85", "\x00", "\x1c"]), 2
    ),
}

CSV_MUTATIONS = {
    "drop_column": lambda rng, t, q: t.replace(",Answer", "", 1).replace(",answer", "", 1),
    "extra_field": lambda rng, t, q: t.replace("\n", ",多余\n", 2),
    "empty_answer": lambda rng, t, q: "\n".join(ln.rsplit(",", 1)[0] + "," for ln in t.splitlines()) + "\n",
    "bad_answer": lambda rng, t, q: t.replace(
        ",C\n", rng.choice([",E\n", ",AB\n", ",甲\n", ", c \n", ",null\n"]), 1
    ),
    "unclosed_quote": lambda rng, t, q: t.replace(",", ',"', 3),
    "no_header": lambda rng, t, q: "\n".join(t.splitlines()[1:]) + "\n",
    "header_only": lambda rng, t, q: t.splitlines()[0] + "\n",
    "duplicate_header": lambda rng, t, q: t.replace("A,B", "A,A", 1),
    "huge_field": lambda rng, t, q: t.replace("躁狂发作", "躁" * (200_000 if q else 2_000_000), 1),
    "blank_rows": lambda rng, t, q: t.replace("\n", "\n,,,,,,\n\n", 2),
    "control_chars": lambda rng, t, q: t.replace(
        "，", rng.choice(["\x00", "\u2028", "\x0c", "\r"]), 1
    ).replace("属于", "\x85", 1),
}


# ---------------------------------------------------------------------------------------------------------
# Mutants


def mutations_for(seed: Seed) -> list[str]:
    if seed.container in ("text", "folder_text"):
        extra = TEXT_MUTATIONS
    elif seed.container == "csv":
        extra = CSV_MUTATIONS
    else:
        extra = STRUCT_MUTATIONS
    return [*BYTE_MUTATIONS, *extra]


def make_mutant(seed: Seed, mutation: str, k: int, quick: bool) -> tuple[dict[str, bytes], int | None]:
    """The files of mutant k (deterministic) and the records they hold (None where not countable)."""
    rng = random.Random(f"{seed.name}:{mutation}:{k}")
    records = json.loads(json.dumps(seed.records))
    files = {rel: text.encode("utf-8") for rel, text in serialize(seed, records).items()}
    rel = rng.choice(sorted(files))
    expected_of = {}
    if mutation in BYTE_MUTATIONS:
        files[rel] = BYTE_MUTATIONS[mutation](rng, files[rel])
    elif mutation in TEXT_MUTATIONS or mutation in CSV_MUTATIONS:
        table = TEXT_MUTATIONS if mutation in TEXT_MUTATIONS else CSV_MUTATIONS
        files[rel] = table[mutation](rng, files[rel].decode("utf-8"), quick).encode("utf-8", "surrogatepass")
    else:
        files, expected_of = _structural(seed, records, mutation, rng, quick, rel)
    total = 0
    for r, data in files.items():
        n = expected_of[r] if r in expected_of else count_records(seed, r, data)
        if n is None or (seed.container == "folder_pceb" and r.startswith("cases/")):
            return files, None  # a PCEB case group counts as its sub-questions or as one reject
        total += n
    return files, total


def _structural(seed, records, mutation, rng, quick, rel):
    """JSON seeds: mutate the records (one file's in a folder), serialize, count with placeholders still strings,
    then put the raw JSON text in."""
    raws: dict[str, str] = {}
    if seed.container == "folder_pceb":
        i = PCEB_FILES.index(rel)
        records[i] = STRUCT_MUTATIONS[mutation](rng, records[i], raws, quick)
    else:
        records = STRUCT_MUTATIONS[mutation](rng, records, raws, quick)
    ascii_ = rng.random() < 0.3
    files, expected = {}, {}
    for r, t in serialize(seed, records, ascii_).items():
        stand_in = (
            t  # raw values as null (a value that changes no count), duplicated keys as the placeholders
        )
        for key, raw in raws.items():
            placeholder = json.dumps(key, ensure_ascii=ascii_)
            stand_in = stand_in.replace(placeholder, placeholder if raw.startswith('"') else "null")
            t = t.replace(placeholder, raw)
        expected[r] = count_records(seed, r, stand_in.encode("utf-8", "surrogatepass"))
        files[r] = t.encode("utf-8", "surrogatepass")
    return files, expected


def all_tasks(quick: bool, per: int, only: str | None) -> list[dict]:
    tasks = []
    for seed in seeds():
        for mutation in mutations_for(seed):
            for k in range(per):
                name = f"{seed.name}:{mutation}:{k}"
                if only is None or name == only:
                    tasks.append(
                        {"name": name, "seed": seed.name, "mutation": mutation, "k": k, "entry": seed.entry}
                    )
    return tasks


# ---------------------------------------------------------------------------------------------------------
# The checks, in a worker process


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """`mhsft ARGV` in-process: (exit code, stdout, stderr). An exception escaping it propagates."""
    from mhsft import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def _rejects_ok(path: Path) -> str | None:
    """Why a rejects file is not UTF-8 JSON lines, or None."""
    if not path.exists():
        return None

    def refuse(constant: str):
        raise ValueError(f"{constant} is not strict JSON")

    try:
        for line in path.read_bytes().decode("utf-8").split("\n")[:-1]:
            json.loads(line, parse_constant=refuse)
    except (UnicodeDecodeError, ValueError) as e:
        return f"rejects file is not UTF-8 JSON lines: {str(e)[:120]}"
    return None


def _entry(problems: list[str], what: str, fn):
    """Run one entry point; anything but a UserError is a problem (with the innermost frame)."""
    import traceback

    from mhsft.utils import UserError

    try:
        return fn()
    except UserError as e:
        if "\n" in str(e):
            problems.append(f"{what}: a UserError of several lines: {str(e)[:200]}")
        return None
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        problems.append(
            f"{what}: {type(e).__name__}: {str(e)[:200]} ({Path(frame.filename).name}:{frame.lineno})"
        )
        return None


def check_train(path: Path, fmt: str, work: Path, problems: list[str]) -> int | None:
    """Training entry points; returns the records accounted for (distinct file and record index of the good and
    rejected items)."""
    from mhsft.data.loader import load_datasets
    from mhsft.data.readers import iter_file
    from mhsft.data.schema import DataError

    items = _entry(problems, "iter_file", lambda: list(iter_file(path))) or []
    if (
        fmt != "auto"
    ):  # the same file with --dataset_format FMT: the same records, read by that format's reader
        forced = _entry(problems, f"iter_file({fmt})", lambda: list(iter_file(path, fmt))) or []
        for e in (x for x in forced if isinstance(x, DataError)):
            if e.reason.startswith("unexpected ") or "\n" in str(e):
                problems.append(f"iter_file({fmt}): {str(e)[:300]}")
        if items and len({(x.source.file, x.source.index) for x in forced}) != len(
            {(x.source.file, x.source.index) for x in items}
        ):
            problems.append(f"--dataset_format {fmt} accounted for other records than auto")
    bad = [x for x in items if isinstance(x, DataError)]
    for e in bad:
        if e.reason.startswith("unexpected ") or "\n" in str(e):
            problems.append(f"iter_file: {str(e)[:300]}")
    good, n_bad = len(items) - len(bad), len(bad)
    rejects = work / "validate.rejects.jsonl"
    res = _entry(
        problems,
        "validate",
        lambda: _cli(["data", "validate", str(path), "--rejects", str(rejects), "--progress", "false"]),
    )
    if res is not None:
        rc, out, err = res
        _cli_problems(problems, "validate", rc, out + err, (0, 1, 2))
        if rc in (0, 1) and f"{good:,} valid dialogue(s)" not in out:
            problems.append(f"validate counted differently from iter_file ({good} good): {out.strip()[:200]}")
        if why := _rejects_ok(rejects):
            problems.append(f"validate: {why}")
    res = _entry(
        problems,
        "inspect",
        lambda: _cli(["data", "inspect", str(path), "--json", "true", "--progress", "false"]),
    )
    if res is not None:
        rc, out, err = res
        _cli_problems(problems, "inspect", rc, out + err, (0, 2))
        if rc == 0 and (d := json.loads(out)) and (d["dialogues"], d["rejected"]) != (good, n_bad):
            problems.append(f"inspect counted {d['dialogues']}+{d['rejected']}, iter_file {good}+{n_bad}")
    loaded = _entry(
        problems, "load_datasets", lambda: load_datasets(str(path), rejects_path=work / "train.rejects.jsonl")
    )
    if loaded is not None and (len(loaded.train), loaded.num_rejected) != (good, n_bad):
        problems.append(
            f"load_datasets read {len(loaded.train)}+{loaded.num_rejected}, iter_file {good}+{n_bad}"
        )
    if why := _rejects_ok(work / "train.rejects.jsonl"):
        problems.append(f"load_datasets: {why}")
    return len({(x.source.file, x.source.index) for x in items}) if items or not problems else None


def _cli_problems(problems: list[str], what: str, rc, text: str, codes: tuple) -> None:
    if rc not in codes:
        problems.append(f"{what}: exit code {rc}")
    if "Traceback" in text:
        problems.append(f"{what}: a traceback in its output")


def check_eval(path: Path, problems: list[str]) -> int | None:
    """The evaluation loader; returns items + rejects + unanswered questions."""
    from mhsft.eval.datasets import UNANSWERED, load_eval_set

    res = _entry(problems, "load_eval_set", lambda: load_eval_set(str(path), "fuzz"))
    if res is None:
        return None
    used = res[0]
    for e in used.errors:
        if "\n" in str(e):
            problems.append(f"load_eval_set: a multi-line error: {str(e)[:200]}")
    return (
        len(used.mcq)
        + len(used.qa)
        + len(used.dialogues)
        + len(used.errors)
        + used.notices.get(UNANSWERED, 0)
    )


def check_task(task: dict) -> dict:
    """Write the mutant's files, read them through every entry point of its kind, remove them."""
    seed = next(s for s in seeds() if s.name == task["seed"])
    files, expected = make_mutant(seed, task["mutation"], task["k"], task["quick"])
    work = Path(tempfile.mkdtemp(prefix="fuzz-", dir=task["tmp"]))
    data = work / "data"
    for rel, b in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b)
    target = data if len(files) > 1 else data / next(iter(files))
    problems: list[str] = []
    t0 = time.perf_counter()
    counts = {}
    try:
        if task["entry"] in ("train", "both"):
            counts["train"] = check_train(target, seed.fmt, work, problems)
        if task["entry"] in ("eval", "both"):
            counts["eval"] = check_eval(target, problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mismatched = {k: v for k, v in counts.items() if expected is not None and v is not None and v != expected}
    return {"name": task["name"], "problems": problems, "expected": expected, "counts": counts,
            "mismatched": mismatched, "bytes": sum(map(len, files.values())), "seconds": time.perf_counter() - t0}  # fmt: skip


def _worker(conn) -> None:
    # What the entry points import, once per worker (the first file would otherwise carry the import time).
    import mhsft.data.commands  # noqa: F401
    import mhsft.eval.datasets  # noqa: F401

    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            conn.send(check_task(task))
        except Exception as e:  # a bug of this script, not of the readers: reported, and the campaign goes on
            conn.send({**_failed(task, "crash", f"fuzz harness: {type(e).__name__}: {e}"), "problems": []})


# ---------------------------------------------------------------------------------------------------------
# The campaign: worker processes, a timeout per file


class Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        self.conn.recv()  # "ready"
        self.task, self.t0 = None, 0.0

    def send(self, task: dict) -> None:
        self.task, self.t0 = task, time.monotonic()
        self.conn.send(task)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)


def run_tasks(tasks: list[dict], workers: int, timeout: float, progress) -> list[dict]:
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = [Worker(ctx) for _ in range(workers)]
    todo, results = list(reversed(tasks)), []
    while todo or any(w.task for w in pool):
        for w in pool:
            if w.task is None and todo:
                w.send(todo.pop())
        busy = [w for w in pool if w.task]
        left = min(w.t0 + timeout for w in busy) - time.monotonic()
        for conn in wait([w.conn for w in busy], timeout=max(left, 0.01)):
            w = next(x for x in busy if x.conn is conn)
            try:
                results.append(conn.recv())
            except EOFError:  # the worker died (a crash in C code, the OOM killer)
                results.append(_failed(w.task, "crash", f"worker died with exit code {w.proc.exitcode}"))
                pool[pool.index(w)] = w = Worker(ctx)
            w.task = None
            progress(len(results))
        for i, w in enumerate(pool):
            if w.task and time.monotonic() - w.t0 > timeout:
                results.append(_failed(w.task, "hang", f"not finished within {timeout:g} s"))
                w.kill()
                pool[i] = Worker(ctx)
                progress(len(results))
    for w in pool:
        w.conn.send(None)
        w.proc.join(5)
    return results


def _failed(task: dict, kind: str, detail: str) -> dict:
    return {"name": task["name"], "problems": [], kind: detail, "expected": None, "counts": {}, "mismatched": {},
            "bytes": 0, "seconds": None}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Report


def summarize(results: list[dict]) -> dict:
    def block(rows: list[dict]) -> dict:
        countable = [
            r for r in rows if r["expected"] is not None and any(v is not None for v in r["counts"].values())
        ]
        return {"files": len(rows), "tracebacks": sum(len(r["problems"]) > 0 for r in rows),
                "crashes": sum("crash" in r for r in rows), "hangs": sum("hang" in r for r in rows),
                "countable": len(countable), "count_mismatches": sum(bool(r["mismatched"]) for r in rows)}  # fmt: skip

    by_reader, by_mutation = defaultdict(list), defaultdict(list)
    for r in results:
        seed, mutation, _ = r["name"].split(":")
        by_reader[seed].append(r)
        by_mutation[mutation].append(r)
    failures = [
        {k: r[k] for k in ("name", "problems", "hang", "crash", "expected", "counts") if k in r}
        for r in results
        if r["problems"] or "hang" in r or "crash" in r or r["mismatched"]
    ]
    secs = [r["seconds"] for r in results if r["seconds"] is not None]
    return {
        "totals": block(results),
        "by_reader": {k: block(v) for k, v in sorted(by_reader.items())},
        "by_mutation": {k: block(v) for k, v in sorted(by_mutation.items())},
        "bytes_read": sum(r["bytes"] for r in results),
        "slowest_file_s": round(max(secs), 3) if secs else None,
        "failures": failures[:100],
        "num_failures": len(failures),
    }


def print_table(summary: dict) -> None:
    cols = ("files", "tracebacks", "crashes", "hangs", "countable", "count_mismatches")
    head = f"{'reader':<20}" + "".join(f"{c:>17}" for c in cols)
    print(head)
    print("-" * len(head))
    for name, b in [*summary["by_reader"].items(), ("TOTAL", summary["totals"])]:
        print(f"{name:<20}" + "".join(f"{b[c]:>17,}" for c in cols))
    print()
    print(f"{'mutation':<20}" + "".join(f"{c:>17}" for c in cols))
    for name, b in summary["by_mutation"].items():
        print(f"{name:<20}" + "".join(f"{b[c]:>17,}" for c in cols))
    for f in summary["failures"][:20]:
        print(
            f"FAILED {f['name']}: {f.get('hang') or f.get('crash') or '; '.join(f['problems']) or f['counts']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one mutant per reader and mutation (CI)")
    ap.add_argument(
        "--per", type=int, default=None, help="mutants per reader and mutation (default 7, quick 1)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per file before it counts as a hang")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument(
        "--only", default=None, help="one mutant, e.g. sharegpt_array:nan:3 (to reproduce a failure)"
    )
    a = ap.parse_args(argv)
    per = a.per or (2 if a.quick else 7)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mhsft-fuzz-") as tmp:
        tasks = [{**t, "quick": a.quick, "tmp": tmp} for t in all_tasks(a.quick, per, a.only)]
        if not tasks:
            print(f"no such mutant: {a.only}", file=sys.stderr)
            return 2
        step = max(len(tasks) // 10, 1)

        def progress(n: int) -> None:
            if n % step == 0 or n == len(tasks):
                print(f"  {n:,}/{len(tasks):,} files ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

        results = run_tasks(tasks, a.workers, a.timeout, progress)
    summary = summarize(results)
    res = {"mode": "quick" if a.quick else "full", "mutants_per_reader_and_mutation": per, "workers": a.workers,
           "timeout_s": a.timeout, "seconds": round(time.time() - t0, 1), "python": sys.version.split()[0],
           "readers": [s.name for s in seeds()], "byte_mutations": list(BYTE_MUTATIONS),
           "structural_mutations": {"json": list(STRUCT_MUTATIONS), "text": list(TEXT_MUTATIONS), "csv": list(CSV_MUTATIONS)},
           **summary}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_table(summary)
    t = summary["totals"]
    print(f"\n{t['files']:,} mutated files in {res['seconds']} s: {t['tracebacks']} with tracebacks, {t['crashes']} "
          f"crashes, {t['hangs']} hangs, {t['count_mismatches']} count mismatches of {t['countable']:,} countable; "
          f"wrote {a.out}")  # fmt: skip
    return 0 if summary["num_failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
