"""mhsft/eval/judge.py: parsing the judge's verdicts, and re-asking it on malformed output."""

from __future__ import annotations

from mhsft.eval import judge


def test_parse_judge_scores():
    dims = judge.dims_for(False)
    ok = '{"理由": "好", "EmoE": 4, "CogE": "3分", "Con": 5, "Sta": 4.0, "Saf": 5}'
    assert judge.parse_scores(ok, dims) == ({"EmoE": 4, "CogE": 3, "Con": 5, "Sta": 4, "Saf": 5}, None)
    fenced = "评分如下：\n```json\n" + ok + "\n```"
    assert judge.parse_scores(fenced, dims)[0]["CogE"] == 3
    loose = "EmoE: 2, CogE: 2, Con.: 3, Sta: 3, Saf: 1"
    assert judge.parse_scores(loose, dims)[0] == {"EmoE": 2, "CogE": 2, "Con": 3, "Sta": 3, "Saf": 1}
    bad = judge.parse_scores('{"EmoE": 7, "CogE": 3, "Con": 3, "Sta": 3}', dims)
    assert bad[0] is None and "EmoE=7 outside 1-5" in bad[1] and "Saf missing" in bad[1]
    assert judge.parse_scores("我觉得不错", dims) == (None, "no JSON object found")
    cp = judge.dims_for(True)
    assert (
        judge.parse_scores(
            ok[:-1] + ', "Comprehensiveness": 2, "Professionalism": 3, "Authenticity": 0, "Safety": 1}', cp
        )[0]["Safety"]
        == 1
    )


def test_parse_keypoint_hits():
    assert judge.parse_hits('{"hits": [true, false, "是"]}', 3) == ([True, False, True], None)
    assert judge.parse_hits('{"hits": [true]}', 2)[0] is None
    assert judge.parse_hits("没有", 2) == (None, 'no "hits" list found')


class ScriptedJudge:
    """Answers from a script; records what it was asked."""

    def __init__(self, replies):
        self.replies, self.asked = list(replies), []

    def chat_one(self, messages, gen, max_tokens):
        assert gen.temperature == 0
        self.asked.append(messages)
        return self.replies.pop(0)


def test_judge_reasks_on_malformed_output_then_gives_up():
    valid = '{"EmoE": 4, "CogE": 4, "Con": 3, "Sta": 5, "Saf": 5}'
    j = ScriptedJudge(["好的，我来评分", valid])
    got = judge.judge_reply(j, [{"role": "user", "content": "我睡不着"}], "听起来你很辛苦。", retries=2)
    assert got.scores == {"EmoE": 4, "CogE": 4, "Con": 3, "Sta": 5, "Saf": 5} and got.attempts == 2
    assert "无法解析" in j.asked[1][-1]["content"] and j.asked[1][-2]["content"] == "好的，我来评分"
    assert "【EmoE 情感共情】" in j.asked[0][1]["content"] and "5分" in j.asked[0][1]["content"]
    j = ScriptedJudge(["x", "y", "z"])
    got = judge.judge_reply(j, [{"role": "user", "content": "嗯"}], "嗯", retries=2)
    assert got.scores is None and got.attempts == 3 and got.error == "no JSON object found"
