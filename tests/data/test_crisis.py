"""mhsft/data/crisis.py: a client turn that signals self-harm or suicide, a reply that points to help."""

from __future__ import annotations

from mhsft.data import crisis


def test_self_harm_paraphrases_are_crisis_turns_and_everyday_cutting_is_not():
    for text in ("每次吵完架我就用小刀划自己的手臂", "我又割伤了自己的手腕", "忍不住划我的腿",
                 # phrasings from the shared data's client turns that the check missed (benchmarks/crisis_check.py)
                 "我自己割伤自己，心里很难过。", "有时候会伤害到自己", "甚至想过结束一切", "我只想结束这一切"):  # fmt: skip
        assert crisis.signals_crisis(text), text
    for text in ("切菜的时候不小心划到手了", "我在割草", "纸划破了手指", "我们结束一切联系吧", "怕伤害到她"):
        assert not crisis.signals_crisis(text), text


def test_a_reply_points_to_help_by_a_hotline_a_professional_or_emergency_care():
    assert crisis.points_to_help("可以拨打希望24热线 400-161-9995")
    assert crisis.points_to_help("建议尽快去医院精神科看看") and crisis.points_to_help("请立刻打120")
    assert not crisis.points_to_help("你可以找朋友聊聊") and not crisis.points_to_help("")
