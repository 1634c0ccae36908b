"""Loaders of evaluation sets: multiple-choice JSONL, CPsyExam, PCEB (theory, cases, essays), open QA, dialogues;
bad records become one-line DataErrors; the real data in ../shared/data/eval loads with the expected counts."""

from __future__ import annotations

import json

import pytest

from helpers import REPO
from mhsft.eval.datasets import PSYQA_BAD_ANSWERS, SINGLE_WITH_SEVERAL_LETTERS, UNANSWERED, load_eval_set
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


def test_one_rule_for_single_labelled_questions_with_several_gold_letters(tmp_path):
    """CPsyExam used to skip such a question and PCEB to score it single with partial credit: now both read it as
    a multiple-answer question (generated, exact set match + elastic) and count it in the set's notices."""
    root = tmp_path / "bench"
    (root / "theory" / "single" / "third").mkdir(parents=True)
    (root / "cases" / "mix" / "second").mkdir(parents=True)
    opts = {"A": "a", "B": "b", "C": "c", "D": "d"}
    _json(
        root / "exam.json", [{"question_type": "single", "question": "问", "options": opts, "answer": "AB"}]
    )
    _json(
        root / "theory" / "single" / "third" / "t.json",
        [{"id": 1, "question": "问", "options": opts, "answer": "AC"}],
    )
    case = {"id": 3, "general_info": "男", "case_introduction": "失眠",
            "questions_and_answers": [{"question": "单选：1．是（　）。", "options": opts, "answer": "BD"},
                                      {"question": "单选：2．是（　）。", "options": opts, "answer": "B"}]}  # fmt: skip
    _json(root / "cases" / "mix" / "second" / "c.json", [case])
    used, _ = load_eval_set(str(root), "bench")
    assert not used.errors and len(used.mcq) == 4
    relabelled = [m for m in used.mcq if m.note]
    assert [(m.answer, m.multi) for m in relabelled] == [("BD", True), ("AB", True), ("AC", True)]
    assert used.notices == {SINGLE_WITH_SEVERAL_LETTERS: 3}
    plain = next(m for m in used.mcq if m.answer == "B")
    assert not plain.multi and not plain.note


def test_cmmlu_and_ceval_csv(tmp_path):
    ceval = tmp_path / "ceval"
    ceval.mkdir()
    (ceval / "mental_health_val.csv").write_text(
        "id,question,A,B,C,D,answer,explanation\n"
        '0,"焦虑的核心是（ ）","担忧","愤怒","悲伤","厌恶",A,"1. 焦虑, 即""担忧"""\n'
        "1,问二,甲,乙,丙,丁,c,\n"
        "2,问三,甲,乙,丙\n",  # a short row
        encoding="utf-8",
    )
    (ceval / "mental_health_test.csv").write_text(
        "id,question,A,B,C,D\n0,问一,甲,乙,丙,丁\n1,问二,甲,乙,丙,丁\n", encoding="utf-8"
    )
    val, _ = load_eval_set(str(ceval / "mental_health_val.csv"), "val")
    assert [(m.id, m.answer, m.subject) for m in val.mcq] == [
        ("0", "A", "mental_health"),
        ("1", "C", "mental_health"),
    ]
    assert val.mcq[0].options == {"A": "担忧", "B": "愤怒", "C": "悲伤", "D": "厌恶"}
    (err,) = val.errors
    assert str(err).startswith(f"{ceval / 'mental_health_val.csv'}:4: record #2: 5 fields, the header has 8")
    test, _ = load_eval_set(str(ceval / "mental_health_test.csv"), "test")
    assert not test.mcq and not test.errors and test.notices == {UNANSWERED: 2}
    both, _ = load_eval_set(str(ceval), "ceval")  # a folder: scored and unanswered side by side, ids by file
    assert len(both.mcq) == 2 and both.notices[UNANSWERED] == 2 and both.mcq[0].id == "mental_health_val#0"
    bad = tmp_path / "x.csv"
    bad.write_text("a,b,c\n1,2,3\n", encoding="utf-8")
    (err,) = load_eval_set(str(bad), "x")[0].errors
    assert "not a CMMLU / C-Eval CSV" in err.reason
    gbk = tmp_path / "gbk_test.csv"
    gbk.write_bytes("id,question,A,B,answer\n0,焦虑是什么,担忧,愤怒,A\n".encode("gbk"))
    (err,) = load_eval_set(str(gbk), "gbk")[0].errors
    assert "looks like GBK/GB18030" in err.reason


def test_real_cmmlu_professional_psychology(shared_data):
    cmmlu = shared_data / "eval" / "cmmlu"
    if not cmmlu.is_dir():
        pytest.skip(f"needs {cmmlu} (CMMLU professional psychology), not in this copy of the data")
    dev, _ = load_eval_set(str(cmmlu / "professional_psychology_dev.csv"), "dev")
    test, _ = load_eval_set(str(cmmlu / "professional_psychology_test.csv"), "test")
    assert (len(dev.mcq), len(test.mcq), len(dev.errors) + len(test.errors)) == (5, 232, 0)
    assert not dev.notices and not test.notices
    assert {m.subject for m in test.mcq} == {"professional_psychology"} and not any(m.multi for m in test.mcq)
    assert {m.answer for m in test.mcq} == set("ABCD") and all(len(m.options) == 4 for m in test.mcq)
    quoted = next(m for m in test.mcq if m.id == "3")  # `"""程序教学与教学机器〞是理论在教育领域中的应用。"`
    assert quoted.question.startswith('"程序教学与教学机器')


def test_psyqa_as_open_qa_with_every_answer_a_reference(tmp_path):
    sample = REPO / "examples" / "data" / "psyqa_sample.json"
    used, _ = load_eval_set(str(sample), "psyqa")
    records = json.loads(sample.read_text(encoding="utf-8"))
    assert not used.errors and not used.mcq and len(used.qa) == len(records) == 6
    first = used.qa[0]
    assert (
        first.id == "psyqa-0001"
        and first.question == records[0]["question"] + "\n" + records[0]["description"]
    )
    assert first.refs == [a["answer_text"] for a in records[0]["answers"]] and first.answer == first.refs[0]
    rec = {
        "questionID": "q1",
        "question": "怎么办",
        "description": "",
        "answers": [{"answer_text": ""}, {"answer_text": "先休息"}],
    }
    p = _jsonl(tmp_path / "p.jsonl", [rec, {**rec, "questionID": "q2", "answers": [{"answer_text": " "}]}])
    used, _ = load_eval_set(str(p), "p")
    assert [q.refs for q in used.qa] == [["先休息"]] and used.notices == {PSYQA_BAD_ANSWERS: 1}
    assert "no answer with text" in str(used.errors[0]) and "record q2" in str(used.errors[0])


def test_a_broken_element_in_an_eval_array_costs_only_itself(tmp_path):
    q = {"question": "问", "choices": ["甲", "乙"], "answer": "A"}
    p = tmp_path / "a.json"
    p.write_text("[" + json.dumps(q) + ', NaN, {"broken": }, ' + json.dumps(q) + "]", encoding="utf-8")
    used, _ = load_eval_set(str(p), "a")
    assert len(used.mcq) == 2 and len(used.errors) == 2
    assert "unrecognized record" in used.errors[0].reason and "invalid JSON" in used.errors[1].reason
