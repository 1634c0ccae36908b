"""Loaders of evaluation sets: multiple-choice JSONL, CPsyExam, PCEB (theory, cases, essays), open QA, dialogues;
bad records become one-line DataErrors; the real data in ../shared/data/eval loads with the expected counts."""

from __future__ import annotations

import json

import pytest

from mhsft.eval.datasets import load_eval_set
from mhsft.utils import UserError


def _json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mcq_jsonl_single_multi_and_bad_records(tmp_path):
    p = _jsonl(
        tmp_path / "mcq.jsonl",
        [
            {"id": "q1", "question": "问1", "choices": ["甲", "乙", "丙", "丁"], "answer": "B"},
            {"id": "q2", "question": "问2", "choices": ["甲", "乙", "丙"], "answer": "C,a"},
            {"id": "q3", "question": "问3", "choices": ["甲", "乙"], "answer": "D"},
            {"id": "q4", "question": "问4", "choices": ["甲"], "answer": "A"},
            {"id": "q5", "question": "问5", "choices": ["甲", "乙"], "answer": "甲"},
        ],
    )
    used, rest = load_eval_set(str(p), "mcq")
    assert [(m.id, m.answer, m.multi) for m in used.mcq] == [("q1", "B", False), ("q2", "AC", True)]
    assert used.mcq[0].options == {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}
    msgs = [str(e) for e in used.errors]
    assert msgs[0].startswith(f"{p}:3: record q3: answer 'D' names option D, but the options are A, B")
    assert "at least 2" in msgs[1] and "not option letters" in msgs[2]
    assert not rest.mcq and len(used.sha256) == 64


def test_cpsyexam_pceb_and_qa_records(tmp_path):
    root = tmp_path / "bench"
    (root / "theory" / "multiple" / "third").mkdir(parents=True)
    (root / "cases" / "mix" / "second").mkdir(parents=True)
    _json(
        (root / "exam.json"),
        [
            {
                "subject_name": "心理咨询师三级",
                "question_type": "multi",
                "kind": "knowledge",
                "question": "选出",
                "options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": ""},
                "answer": "ABD",
                "id": "h1",
            },
        ],
    )
    _json(
        (root / "theory" / "multiple" / "third" / "t.json"),
        [
            {
                "id": 1,
                "question": "多选",
                "answer": "C",
                "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
            },
        ],
    )
    _json(
        (root / "cases" / "mix" / "second" / "c.json"),
        [
            {
                "id": 7,
                "general_info": "女，25岁",
                "case_introduction": "失眠一个月",
                "questions_and_answers": [
                    {
                        "question": "单选： 1．主要症状是（　　）。",
                        "options": {"A": "强迫", "B": "焦虑"},
                        "answer": "B",
                    },
                    {
                        "question": "多选： 2．出现了（　　）。",
                        "options": {"A": "幻觉", "B": "错觉"},
                        "answer": "B",
                    },
                    {
                        "question": "3．请分析原因。（10 分）",
                        "answer": "生物原因（2 分）、社会原因（3 分）",
                    },
                ],
            },
        ],
    )
    used, _ = load_eval_set(str(root), "bench")
    assert not used.errors
    by_id = {m.id: m for m in used.mcq}
    exam = by_id["exam#h1"]
    assert exam.options.keys() == {"A", "B", "D", "C"} and "E" not in exam.options and exam.multi
    theory = by_id["theory/multiple/third/t#1"]
    assert (
        theory.multi and theory.answer == "C" and theory.subject == "theory/third"
    )  # multiple by its folder
    c1, c2 = by_id["cases/mix/second/c#7-1"], by_id["cases/mix/second/c#7-2"]
    assert not c1.multi and c2.multi and c1.kind == "case" and c1.subject == "cases/second"
    assert c1.question.startswith("一般资料：女，25岁\n案例介绍：失眠一个月") and c1.question.endswith(
        "1．主要症状是（　　）。"
    )
    (essay,) = used.qa
    assert essay.key_points == ["生物原因", "社会原因"] and essay.key_point_weights == [2.0, 3.0]
    assert "失眠一个月" in essay.question


def test_sampling_is_seeded_and_leaves_a_fewshot_pool(tmp_path):
    rows = [{"id": f"q{i}", "question": f"问{i}", "choices": ["甲", "乙"], "answer": "A"} for i in range(30)]
    p = _jsonl(tmp_path / "m.jsonl", rows)
    a, rest = load_eval_set(f"{p}#10", "m", seed=1)
    b, _ = load_eval_set(str(p), "m", limit=10, seed=1)
    assert [m.id for m in a.mcq] == [m.id for m in b.mcq] and len(a.mcq) == 10
    assert len(rest.mcq) == 20 and not {m.id for m in rest.mcq} & {m.id for m in a.mcq}
    assert [m.id for m in load_eval_set(f"{p}#10", "m", seed=2)[0].mcq] != [m.id for m in a.mcq]
    assert len(load_eval_set(f"{p}#99", "m")[0].mcq) == 30  # never repeats an item
    with pytest.raises(UserError, match="no such file"):
        load_eval_set(str(tmp_path / "missing.jsonl"), "x")


def test_qa_and_dialogue_files(tmp_path):
    qa = _jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "什么是共情？", "answer": "理解", "key_points": ["理解"]}, {"question": "缺答案"}],
    )
    used, _ = load_eval_set(str(qa), "qa")
    assert used.qa[0].key_points == ["理解"] and used.qa[0].id == "qa#0"
    assert "unrecognized record" in str(used.errors[0])
    d = tmp_path / "d.json"
    d.write_text(
        json.dumps(
            ["求助者：我睡不着", "支持者：能说说吗？", "求助者：工作压力大", "支持者：嗯"], ensure_ascii=False
        )
    )
    used, _ = load_eval_set(str(d), "d")
    assert used.dialogues[0].id == "d" and len(used.dialogues[0].dialogue.turns) == 4


def test_real_eval_data(shared_data):
    ev = shared_data / "eval"
    exam, _ = load_eval_set(str(ev / "cpsyexam_train"), "cpsyexam")
    assert len(exam.mcq) + len(exam.errors) == 9855  # every question: usable or reported
    assert len(exam.mcq) > 9700 and sum(m.multi for m in exam.mcq) > 2800
    assert {m.kind for m in exam.mcq} == {"knowledge", "case"}
    assert all(str(e).count(": ") >= 2 for e in exam.errors)
    pceb, _ = load_eval_set(str(ev / "pceb"), "pceb")
    assert (len(pceb.mcq), len(pceb.qa), len(pceb.errors)) == (1733 + 459, 44, 0)
    assert sum(m.kind == "case" for m in pceb.mcq) == 459
    assert sum(len(q.key_points) for q in pceb.qa) > 200
    coune, _ = load_eval_set(str(ev / "cpsycoune"), "cpsycoune")
    assert len(coune.dialogues) == 18 and not coune.errors
