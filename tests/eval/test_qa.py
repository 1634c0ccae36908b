"""mhsft/eval/qa.py against hand-computed cases: ROUGE, BLEU, key points."""

from __future__ import annotations

import pytest

from mhsft.eval import qa
from mhsft.eval.datasets import key_points_from_marks


def test_rouge_hand_computed_and_equal_to_rouge_chinese():
    from rouge_chinese import Rouge

    # unigram overlap {我, 焦虑}: P = R = 2/3; no bigram shared; LCS 我…焦虑 = 2 of 3
    s = qa.rouge_f(["我", "很", "焦虑"], ["我", "有点", "焦虑"])
    assert s == pytest.approx({"rouge-1": 2 / 3, "rouge-2": 0.0, "rouge-l": 2 / 3}, abs=1e-6)
    hyp, ref = "我最近很焦虑，晚上睡不着。", "来访者最近感到焦虑，并且失眠。"
    ours = qa.score_answer(hyp, ref)
    lib = Rouge().get_scores(" ".join(qa.words(hyp)), " ".join(qa.words(ref)))[0]
    for k in qa.ROUGE_KEYS:
        assert ours[f"{k}_words"] == pytest.approx(lib[k]["f"], abs=1e-6)
    assert 0 < ours["rouge-1_chars"] != ours["rouge-1_words"] > 0
    assert qa.rouge_f([], ["我"]) == dict.fromkeys(qa.ROUGE_KEYS, 0.0)


def test_bleu_and_summary_name_the_tokenization():
    assert qa.bleu4(
        ["今天天气很好，我们去公园散步吧。"], ["今天天气很好，我们去公园散步吧。"]
    ) == pytest.approx(100.0)
    rows = [
        {
            "output": "共情让来访者感到被理解",
            "reference": "共情让来访者感到被理解和接纳",
            "key_points": ["被理解", "接纳"],
            "keypoint_hits": [True, False],
            "key_point_weights": [2.0, 1.0],
            **qa.score_answer("共情让来访者感到被理解", "共情让来访者感到被理解和接纳"),
        },
    ]
    m = qa.summarize(rows, 100, 0)
    assert m["rouge_words"]["tokenization"].startswith("jieba") and m["rouge_chars"][
        "tokenization"
    ].startswith("char")
    assert "zh" in m["bleu4"]["tokenization"]
    assert m["keypoints"]["hit_rate"] == 0.5 and m["keypoints"]["marks_share"] == pytest.approx(
        2 / 3, abs=1e-4
    )


def test_keypoint_lexical_matcher():
    ans = "首先要直接询问来访者是否有自杀想法，再了解其计划与手段。"
    hits = qa.keypoint_hits(ans, ["直接询问自杀想法", "了解计划与手段", "评估保护因素", "，"])
    assert hits == [True, True, False, False]


def test_key_points_from_pceb_marks():
    ref = "收入情况（2 分）、居住情况（2 分）、出生地（2分）\n1） 生物原因（2 分）： 未见明显的生物学原因。（0.5 分）"
    kps, w = key_points_from_marks(ref)
    assert kps == ["收入情况", "居住情况", "出生地", "生物原因", "未见明显的生物学原因"]
    assert w == [2.0, 2.0, 2.0, 2.0, 0.5]
    assert key_points_from_marks("没有分值标记") == ([], [])


def test_several_references_rouge_takes_the_best_and_bleu_uses_them_all():
    hyp = "先深呼吸，然后慢慢说出你的感受。"
    near, far = "先深呼吸，再慢慢说出你的感受。", "去医院挂心理科看看。"
    best = qa.score_answer(hyp, [far, near])
    assert (
        best == qa.score_answer(hyp, near)
        and best["rouge-1_chars"] > qa.score_answer(hyp, far)["rouge-1_chars"]
    )
    assert qa.bleu4([hyp], [[far, hyp]]) == pytest.approx(100.0)
    # variable counts: the second question has one reference, the first two
    two = qa.bleu4([hyp, "今天天气很好我们去公园散步"], [[far, hyp], ["今天天气很好我们去公园散步"]])
    assert two == pytest.approx(100.0)
    rows = [{"output": hyp, "reference": far, "references": [far, near], **best}]
    m = qa.summarize(rows, 10, 0)
    assert m["multi_reference"] == qa.MULTI_REFERENCE_RULE and m["bleu4"]["score"] > 0
