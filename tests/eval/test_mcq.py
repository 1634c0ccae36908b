"""mhsft/eval/mcq.py against hand-computed cases: answer extraction, exact and elastic accuracy, the bootstrap,
breakdowns, few-shot exemplars."""

from __future__ import annotations

import pytest

from mhsft.eval import mcq
from mhsft.eval.datasets import MCQItem

OPTS = {"A": "焦虑", "B": "抑郁", "C": "焦虑症", "D": "恐惧"}


@pytest.mark.parametrize(
    "text,multi,want",
    [
        ("答案：B", False, "B"),
        ("选B", False, "B"),
        ("应选择C项", False, "C"),
        ("我认为正确答案是 A、C。", True, "AC"),
        ("B和C", True, "BC"),
        ("A、C", True, "AC"),
        ("BC", True, "BC"),
        ("ＢＣ", True, "BC"),  # full-width letters
        ("答案：A，C，D", True, "ACD"),
        ("(B)", False, "B"),
        ("B. 抑郁", False, "B"),
        ("首先排除A，答案为 D", False, "D"),  # the cue wins over a letter mentioned earlier
        ("<think>答案：A</think>答案：D", False, "D"),  # reasoning is ignored
        ("这是抑郁的表现", False, "B"),  # a restated option text
        ("焦虑症", False, "C"),  # "焦虑" inside "焦虑症" does not count on its own
        ("表现为焦虑和恐惧", True, "AD"),
        ("The answer is C", False, "C"),
        ("答案是Because", False, None),  # a letter inside a word is no answer
        ("A型人格", False, None),
        ("不知道", False, None),
        ("", False, None),
    ],
)
def test_extract_answer(text, multi, want):
    assert mcq.extract_answer(text, OPTS, multi) == want


@pytest.mark.parametrize(
    "pred,gold,exact,elastic",
    [
        ("B", "B", 1, 1),
        ("A", "B", 0, 0),
        ("ACD", "ACD", 1, 1),
        ("AC", "ACD", 0, 2 / 3),  # strict subset: partial credit
        ("A", "ACD", 0, 1 / 3),
        ("AB", "ACD", 0, 0),  # any wrong option: nothing
        ("ABCD", "ACD", 0, 0),  # a superset holds a wrong option
        (None, "ACD", 0, 0),  # unparseable
        ("", "B", 0, 0),
    ],
)
def test_exact_and_elastic(pred, gold, exact, elastic):
    assert mcq.score(pred, gold) == pytest.approx((exact, elastic))


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    vals = [1.0] * 30 + [0.0] * 70
    a = mcq.bootstrap_ci(vals, 1000, seed=3)
    assert a == mcq.bootstrap_ci(vals, 1000, seed=3)
    assert a[0] < 0.3 < a[1] and a[0] > 0.15 and a[1] < 0.45
    assert mcq.bootstrap_ci([1.0], 1000, 0) is None
    assert mcq.bootstrap_ci([1.0, 1.0, 1.0], 100, 0) == [1.0, 1.0]


def test_summarize_mcq_breakdowns():
    rows = [
        {
            "exact": 1.0,
            "elastic": 1.0,
            "invalid": False,
            "qtype": "single",
            "subject": "s1",
            "kind": "knowledge",
            "method": "loglikelihood",
        },
        {
            "exact": 0.0,
            "elastic": 0.5,
            "invalid": False,
            "qtype": "multi",
            "subject": "s1",
            "kind": "case",
            "method": "generation",
        },
        {
            "exact": 0.0,
            "elastic": 0.0,
            "invalid": True,
            "qtype": "multi",
            "subject": "s2",
            "kind": "case",
            "method": "generation",
        },
    ]
    m = mcq.summarize(rows, 200, 0)
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["elastic_accuracy"] == pytest.approx(0.5)
    assert m["invalid_rate"] == pytest.approx(0.5) and m["num_invalid"] == 1
    assert m["by_qtype"]["multi"] == {"n": 2, "accuracy": 0.0, "elastic_accuracy": 0.25}
    assert m["by_kind"]["knowledge"]["accuracy"] == 1.0
    assert set(m["by_subject"]) == {"s1", "s2"}
    assert "|pred|/|gold|" in m["elastic_formula"]


def _item(i: str, subject="s", multi=False, q=None) -> MCQItem:
    return MCQItem(
        i, q or f"问题{i}", {"A": "甲", "B": "乙"}, "AB" if multi else "A", multi, subject, "", "d"
    )


def test_fewshot_never_uses_the_item_and_prefers_its_subject():
    item = _item("t", subject="x")
    pool = [
        _item("t"),
        _item("dup", q="问题t"),
        _item("p1", "x"),
        _item("p2", "y"),
        _item("p3", "x", multi=True),
    ]
    shots = mcq.pick_fewshot(item, pool, 2, seed=0)
    assert [s.id for s in shots][0] == "p1"  # same subject and type first
    assert all(s.id not in ("t", "dup") for s in shots)
    assert mcq.pick_fewshot(item, pool, 2, seed=0) == shots
    ctx = mcq.loglikelihood_context(item, shots)
    assert ctx.endswith("答案：") and ctx.count("答案： A") == 2
