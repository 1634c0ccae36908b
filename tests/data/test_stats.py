"""mhsft/data/stats.py: what `mhsft data inspect` counts."""

from __future__ import annotations

from mhsft.data.readers import parse_record
from mhsft.data.stats import collect, format_table


def _dialogue(*texts: str):
    roles = ["user", "assistant"] * len(texts)
    return parse_record({"messages": [{"role": r, "content": t} for r, t in zip(roles, texts)]})


def test_crisis_turns_and_the_replies_that_point_to_help_are_counted():
    items = [
        _dialogue("最近压力很大", "慢慢说", "有时候真的不想活了", "谢谢你告诉我。请拨打心理援助热线12356。"),
        _dialogue("我又割伤了自己的手腕", "能说说发生了什么吗？"),
    ]
    d = collect(items).to_dict()
    assert d["crisis"] == {"client_turns": 2, "replies_pointing_to_help": 1}
    table = format_table(d, "t")
    assert "client turns signalling a crisis" in table and "replies to them pointing to help" in table
