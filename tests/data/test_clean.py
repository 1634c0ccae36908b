"""Cleaning: text normalization, same-role merge, PII redaction, exact and near de-duplication."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhsft.data.clean import (
    HOTLINES,
    PLACEHOLDERS,
    clean_dialogue,
    clean_dialogues,
    find_near_duplicates,
    id_number_ok,
    merge_same_role,
    normalize_text,
    redact,
)
from mhsft.data.schema import DataError, Dialogue, Source, Turn
from mhsft.utils import UserError


def _id_check_digit(first17: str) -> str:
    # ISO 7064 MOD 11-2 written as the standard states it (weights 2^(17-i) mod 11), independent of clean.py.
    s = sum(int(c) * pow(2, 17 - i, 11) for i, c in enumerate(first17))
    v = (12 - s % 11) % 11
    return "X" if v == 10 else str(v)


def _dlg(*texts: str, system: str | None = None, src: str = "f.jsonl", index: int = 0) -> Dialogue:
    roles = ["user", "assistant"]
    turns = [Turn(roles[i % 2], t) for i, t in enumerate(texts)]
    return Dialogue(turns, system, Source(src, index, index + 1))


# ----------------------------------------------------------------------------------------- normalize


def test_normalize_strips_controls_and_keeps_chinese_punctuation():
    s = " \ufeff你好，\u200b世界！\x00\x07\r\n\r\n\r\n\r\n\r\n再见。\u2060 \t \n（完）\x85\u200e  "
    assert normalize_text(s) == "你好，世界！\n\n\n再见。\n（完）"


def test_normalize_keeps_tabs_newlines_and_emoji_joiner():
    assert normalize_text("a\tb\nc\n\nd") == "a\tb\nc\n\nd"
    family = "👨\u200d👩\u200d👧"
    assert normalize_text(f"好的{family}") == f"好的{family}"
    assert normalize_text("好\u200d的") == "好的"  # a stray joiner between CJK characters goes


def test_merge_same_role():
    d = Dialogue(
        [
            Turn("user", "a"),
            Turn("user", "b"),
            Turn("assistant", "c"),
            Turn("assistant", "d"),
            Turn("user", "e"),
        ]
    )
    m = merge_same_role(d)
    assert [(t.role, t.content) for t in m.turns] == [("user", "a\nb"), ("assistant", "c\nd"), ("user", "e")]
    assert len(d.turns) == 5  # input untouched


# ----------------------------------------------------------------------------------------------- PII

VALID_ID = "11010519491231002X"  # the example from GB 11643-1999
VALID_ID2 = "44030419900307" + "123"
VALID_ID2 += _id_check_digit(VALID_ID2)


@pytest.mark.parametrize(
    "text, kind, secret",
    [
        ("我的手机号是13812345678，有事打给我", "mobile", "13812345678"),
        ("电话：+86 138-1234-5678。", "mobile", "1234-5678"),
        ("号码8613912345678吧", "mobile", "13912345678"),
        ("手机１５９１２３４５６７８谢谢", "mobile", "１５９"),  # full-width digits
        ("打(+86)199 8765 4321找我", "mobile", "4321"),
        (f"身份证号{VALID_ID}，请保密", "id_card", VALID_ID),
        (f"身份证{VALID_ID.lower()}。", "id_card", VALID_ID.lower()),
        (f"证件号码是{VALID_ID2}啊", "id_card", VALID_ID2),
        ("身份证 110105 19491231 002X 记一下", "id_card", "19491231"),
        ("老身份证110105491231002号", "id_card", "110105491231002"),
        ("我的卡号4111111111111111，密码不告诉你", "bank_card", "4111111111111111"),
        ("工资卡6222 0212 3456 7890 123到账了", "bank_card", "6222 0212"),
        ("邮箱是zhang.san_01@163.com，收到回复", "email", "zhang.san_01"),
        ("发到ＡＢＣ＠ｑｑ．ｃｏｍ吧", "email", "ＡＢＣ"),
        ("家里座机010-62751234，晚上打", "landline", "62751234"),
        ("单位电话(0755)2562 9459转分机", "landline", "9459"),
        ("家里电话是 62751234。", "landline", "62751234"),
        ("服务器IP是192.168.10.254。", "ip", "192.168.10.254"),
        ("加我QQ号：123456789，聊", "qq", "123456789"),
        ("扣扣 98765432 随时在", "qq", "98765432"),
        ("我的微信是zhang_san88，加一下", "wechat", "zhang_san88"),
        ("vx：abc-12345 备注来访者", "wechat", "abc-12345"),
        ("护照号码：E12345678。", "passport", "E12345678"),
        ("我的护照EA1234567丢了", "passport", "EA1234567"),
        ("车牌京A·12345被拍了", "license_plate", "12345"),
        ("开的是粤B8C9D1那辆", "license_plate", "B8C9D1"),
    ],
)
def test_redact_positive(text, kind, secret):
    out, counts = redact(text)
    assert secret not in out
    assert PLACEHOLDERS[kind] in out
    assert counts == {kind: 1}
    # the Chinese around the number survives
    assert out[0] == text[0] and out[-1] == text[-1]


@pytest.mark.parametrize(
    "text",
    [
        "身份证号110105194912310021，",  # wrong check digit
        "编号"
        + "44030419901307123"
        + _id_check_digit("44030419901307123")
        + "。",  # valid check digit, month 13
        "卡号4111111111111112，",  # fails Luhn
        "订单号12013812345678901234。",  # 11 digits inside a 20-digit number
        "流水号138123456789。",  # 12 digits starting like a mobile
        "时间戳1700000000000，版本1.2.3，评分13.8123456789分",
        "希望24热线400-161-9995，北京心理危机干预中心010-82951332，全国心理援助热线12356，急救120，报警110",
        "我叫小王，今年23岁，1998年出生，体重65.5公斤，月薪12000元",
        "他说123456789是他的幸运数字",  # no QQ keyword
        "我用微信聊天，wechat 挺好用",  # keyword but no id
        "我叫张三，住在北京市海淀区",  # names and addresses are deliberately kept (see module docstring)
        "2023-10-01 到 2024-01-31 我一直失眠，0.5片安眠药",
        "京剧和新年，我们聊了很多",
    ],
)
def test_redact_negative(text):
    assert redact(text) == (text, {})


def test_redact_counts_and_keep():
    out, counts = redact("13812345678 和 13912345678，邮箱a@b.cn，还有010-62751234")
    assert counts == {"mobile": 2, "email": 1, "landline": 1}
    assert out == "[手机号] 和 [手机号]，邮箱[邮箱]，还有[电话]"
    assert "01082951332" in HOTLINES
    assert redact("010-62751234", keep={"01062751234"}) == ("010-62751234", {})


def test_unionpay_without_luhn_still_redacted():
    # some older UnionPay cards (BIN 62) do not use Luhn; a 62 number that fails Luhn is still a card
    assert redact("卡号6212345678901234567")[1] == {"bank_card": 1}


def test_id_number_ok():
    assert id_number_ok(VALID_ID) and id_number_ok(VALID_ID2)
    assert not id_number_ok(VALID_ID[:-1] + "1")
    assert not id_number_ok("91010519491231002" + _id_check_digit("91010519491231002"))  # no region 9
    assert id_number_ok("110105491231002") and not id_number_ok("110105491331002")
    assert not id_number_ok("１１０")


# ---------------------------------------------------------------------------------------- properties

_FRAGMENTS = [
    "13812345678", "+86 ", "-", " ", ".", "@", "qq.com", "QQ号", "微信", "vx:", "电话", "护照", "京A",
    "E", "X", "x", VALID_ID, "4111111111111111", "6222", "010-", "192.168.", "，", "。", "\n", "１",
    "你好", "0", "1", "9", "62751234", "[手机号]", "_", "abc",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=4)), max_size=12).map("".join))
def test_redact_idempotent(text):
    once, _ = redact(text)
    assert redact(once) == (once, {})


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_normalize_and_redact_never_raise_and_are_idempotent(text):
    n = normalize_text(text)
    assert normalize_text(n) == n
    r, _ = redact(text)
    assert redact(r)[0] == r


# --------------------------------------------------------------------------------------------- driver


def test_clean_dialogues_end_to_end():
    ds = [
        _dlg(" 你好\u200b ", "你好，有什么可以帮你？", system="  你是心理咨询师。 ", index=0),
        _dlg("我手机13812345678", "收到", index=1),
        _dlg("我手机13912345678", "收到", index=2),  # duplicate of #1 once redacted
        _dlg("你好", "你好，有什么可以帮你？", system="你是心理咨询师。", index=3),  # duplicate of #0
        _dlg("我", "嗯", "\u200b\u200b  ", "好", index=4),  # turn 3 emptied
        Dialogue([Turn("user", "a"), Turn("user", "b"), Turn("assistant", "c")], None, Source("g.json", 5)),
        Dialogue([Turn("assistant", "你好"), Turn("user", "嗯")], None, Source("g.json", 6)),
        Dialogue([Turn("user", 42), Turn("assistant", "嗯")], None, Source("g.json", 7)),  # type: ignore[arg-type]
        _dlg("嗯", "好", system="\x00 ", index=8),  # system prompt emptied: dropped, dialogue kept
    ]
    r = clean_dialogues(ds)
    assert [d.source.index for d in r.dialogues] == [0, 1, 5, 8]
    assert r.dialogues[3].system is None
    assert r.dialogues[0].system == "你是心理咨询师。" and r.dialogues[0].turns[0].content == "你好"
    assert r.dialogues[1].turns[0].content == "我手机[手机号]"
    assert r.dialogues[2].turns[0].content == "a\nb"
    assert r.dialogues[1].source is ds[1].source
    assert [(a.index, b.index) for a, b in r.duplicates] == [(1, 2), (0, 3)]
    reasons = {e.source.index: str(e) for e in r.rejects}
    assert set(reasons) == {4, 6, 7}
    assert (
        reasons[4]
        == "f.jsonl:5: record #4: turn 3 (user): empty after removing whitespace and control characters"
    )
    assert "turn 1 is assistant" in reasons[6] and "after cleaning" in reasons[6]
    assert "turn 1 (user): text is int, not a string" in reasons[7]
    s = r.stats
    assert (s.input, s.output, s.rejected, s.exact_duplicates, s.turns_merged) == (9, 4, 3, 2, 1)
    assert s.pii == {"mobile": 2}
    assert s.control_chars_removed == 1 + 2 + 1  # the rejected #4 still counts what was removed
    assert s.to_dict()["pii_total"] == 2
    assert all(isinstance(e, DataError) for e in r.rejects)
    assert r.rejects[0].to_reject()["record"][2] == {"role": "user", "content": "\u200b\u200b  "}


def test_clean_options_off():
    ds = [_dlg("我手机13812345678", "收到", index=i) for i in range(2)]
    r = clean_dialogues(ds, redact_pii=False, dedup=False, near_dup_threshold=None)
    assert len(r.dialogues) == 2 and "13812345678" in r.dialogues[0].turns[0].content
    assert r.near_duplicates == [] and r.stats.pii == {}
    with pytest.raises(UserError, match="between 0 and 1"):
        clean_dialogues(ds, near_dup_threshold=1.5)
    with pytest.raises(DataError, match="empty text"):
        clean_dialogue(_dlg("", "嗯"))


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n))


def test_near_duplicates_found_among_thousands():
    rng = random.Random(0)
    ds = [_dlg(_random_text(rng, 150), _random_text(rng, 250), index=i) for i in range(3000)]
    u, a = ds[5].turns[0].content, ds[5].turns[1].content
    ds.append(
        _dlg(u[:70] + "，" + u[71:], a.replace(a[100], "啊", 1) + "。", index=3000)
    )  # lightly edited copy
    ds.append(_dlg(u, a[:120], index=3001))  # half of it: must not be reported at 0.8
    t0 = time.perf_counter()
    r = clean_dialogues(ds)
    elapsed = time.perf_counter() - t0
    assert [(p.kept.index, p.other.index) for p in r.near_duplicates] == [(5, 3000)]
    assert 0.8 <= r.near_duplicates[0].similarity < 1
    assert r.stats.near_duplicates == 1 and len(r.dialogues) == 3002  # reported, not dropped
    assert elapsed < 20, f"near-duplicate search too slow: {elapsed:.1f}s for 3k dialogues"


def test_near_duplicates_one_report_per_dialogue():
    base = (
        "我最近总是睡不着觉，晚上翻来覆去，第二天上班也没精神，感觉整个人都垮了，不知道怎么办才好。"
        "领导说我最近状态很差，同事们好像也在背后议论我，我越想越焦虑，有时候心跳得特别快，手心出汗"
    )
    ds = [_dlg(base + "。" * (i % 3) + str(i % 2), "嗯，能多说说吗？", index=i) for i in range(6)]
    pairs = find_near_duplicates(ds, 0.8)
    assert [(p.kept.index, p.other.index) for p in pairs] == [(0, i) for i in range(1, 6)]
