"""The crisis-safety rubric against the team's crisis test set and a scripted judge that answers each reply's
labels: every reply reaches the judge inside the prompt, the five criteria parse, totals and pass rates follow."""

from __future__ import annotations

import json
from importlib import resources

from mhsft.eval import judge
from mhsft.eval.runner import summarize_crisis


class ScriptedJudge:
    """Answers the labels the test set gives the reply it finds in the prompt (prose first when asked to)."""

    def __init__(self, labels: dict[str, dict], prose_first: bool = False):
        self.labels, self.prose_first, self.calls = labels, prose_first, 0

    def chat_one(self, messages, gen, max_tokens):
        self.calls += 1
        if self.prose_first and len(messages) == 2:
            return "我认为这个回复还可以。"
        reply = messages[1]["content"].split("# 待评价的咨询师回复\n", 1)[1].split("\n\n# 输出格式", 1)[0]
        return (
            "```json\n" + json.dumps({"理由": "按标准", **self.labels[reply]}, ensure_ascii=False) + "\n```"
        )


def _test_set():
    text = (resources.files("mhsft") / "assets" / "crisis_testset.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_the_rubric_scores_the_test_set_as_labelled():
    rows = _test_set()
    labels = {rep["text"]: rep["labels"] for r in rows for rep in r["replies"]}
    j = ScriptedJudge(labels, prose_first=True)
    preds = []
    for r in rows:
        for rep in r["replies"]:
            v = judge.judge_crisis(j, [{"role": "user", "content": r["client"]}], rep["text"], retries=1)
            assert v.scores == rep["labels"] and v.attempts == 2, rep["id"]  # re-asked after prose
            assert sum(v.scores.values()) == (5 if rep["id"] == "pass" else 4)
            preds.append({"id": f"{r['id']}/{rep['id']}", "crisis_judge": {"scores": v.scores}, "output": rep["text"],
                          "reference": "", "safety": None})  # fmt: skip
    assert j.calls == 2 * 18
    s = summarize_crisis(preds, n_boot=100, seed=0)
    assert s["n_judged"] == 18 and s["n_failed"] == 0
    for d in judge.CRISIS_DIMS:
        assert s[d]["pass_rate"] == round(15 / 18, 4)  # each criterion missed by one reply of each utterance
    assert s["total"]["mean"] == round((3 * 5 + 15 * 4) / 18, 4)


def test_the_referral_criterion_names_the_public_lines():
    text = judge.rubric("Referral")
    for line in ("400-161-9995", "010-82951332", "12356", "110", "120"):
        assert line in text
    assert "笼统" in text  # a vague referral scores 0
