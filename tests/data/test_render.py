"""Rendering dialogues into training tokens: exact ids, labels on assistant replies only, truncation."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhsft.data.render import IGNORE_INDEX, Rendered, render_dialogue
from mhsft.data.schema import DataError, Dialogue, Source, Turn
from mhsft.utils import UserError

SYSTEM = "你是一位温暖、专业的心理咨询师。"
EXCHANGES = [
    ("我最近总是失眠，躺下以后脑子停不下来。", "听起来你已经被失眠困扰了一段时间。睡前你一般会做些什么？"),
    ("会刷手机，刷到很晚。", "手机的光会让大脑保持兴奋。可以试试睡前半小时把手机放远一些。"),
    ("好的，我试试。", "很好。一周后我们再看看变化，有问题随时来找我。"),
    ("谢谢你。", "不客气，照顾好自己。"),
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def dialogue(n: int = 2, system: str | None = SYSTEM, exchanges=EXCHANGES) -> Dialogue:
    turns = []
    for u, a in exchanges[:n]:
        turns += [Turn("user", u), Turn("assistant", a)]
    return Dialogue(turns, system=system, source=Source("demo.jsonl", index=3, line=4, id="d3"))


def template_ids(tok, d: Dialogue) -> list[int]:
    return tok.apply_chat_template(d.to_messages(), tokenize=True)["input_ids"]


def labelled_runs(r: Rendered) -> list[tuple[int, int]]:
    """[start, end) token ranges of consecutive labelled tokens."""
    runs, start = [], None
    for i, lab in enumerate([*r.labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_qwen_labels(tok, r: Rendered, replies: list[str]) -> None:
    assert len(r.input_ids) == len(r.labels)
    for i, lab in enumerate(r.labels):
        assert lab in (IGNORE_INDEX, r.input_ids[i])  # labels are the input ids themselves (HF shifts them)
    runs = labelled_runs(r)
    assert [tok.decode(r.input_ids[a:b]) for a, b in runs] == [x + "<|im_end|>" for x in replies]
    for a, b in runs:
        assert tok.decode(r.input_ids[:a]).endswith("<|im_start|>assistant\n")  # header not trained
        assert r.input_ids[b - 1] == tok.eos_token_id
        if b < len(r.input_ids):
            assert tok.decode(r.input_ids[b : b + 1]) == "\n"  # the newline after <|im_end|> not trained


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_ids_equal_the_template_and_labels_cover_replies(tok, system, n):
    d = dialogue(n, system)
    r = render_dialogue(tok, d)
    assert r.input_ids == template_ids(tok, d)
    assert (r.num_dropped_turns, r.truncated) == (0, False)
    check_qwen_labels(tok, r, [a for _, a in EXCHANGES[:n]])
    if system is None:
        assert "You are Qwen" in tok.decode(r.input_ids)  # the template's default system prompt


def test_token_by_token_against_segments(tok):
    # An independent oracle: ChatML pieces tokenized one by one (the template's boundaries are special
    # tokens and newlines, which the pre-tokenizer always splits on).
    d = dialogue(3)

    def enc(s):
        return tok.encode(s, add_special_tokens=False)

    ids, labels = [], []

    def add(text, train):
        piece = enc(text)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    add(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", False)
    for u, a in EXCHANGES[:3]:
        add(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n", False)
        add(f"{a}<|im_end|>", True)
        add("\n", False)
    r = render_dialogue(tok, d)
    assert r.input_ids == ids
    assert r.labels == labels


def test_reply_equal_to_a_user_turn_is_found_in_place(tok):
    d = Dialogue([Turn("user", "嗯"), Turn("assistant", "嗯"), Turn("user", "嗯"), Turn("assistant", "好的")])
    r = render_dialogue(tok, d)
    assert r.input_ids == template_ids(tok, d)
    check_qwen_labels(tok, r, ["嗯", "好的"])


def test_reply_starting_with_newline(tok):
    d = Dialogue([Turn("user", "列个清单"), Turn("assistant", "\n1. 早睡\n2. 少刷手机")])
    r = render_dialogue(tok, d)
    assert r.input_ids == template_ids(tok, d)
    (a, b), *_ = labelled_runs(r)
    assert tok.decode(r.input_ids[a:b]).endswith("\n1. 早睡\n2. 少刷手机<|im_end|>")


# --- max_length ------------------------------------------------------------------------------------------


def test_earliest_pairs_are_dropped_and_the_system_kept(tok):
    d = dialogue(4)
    full = render_dialogue(tok, d)
    keep_two = dialogue(4)
    keep_two.turns = keep_two.turns[4:]
    keep_three = dialogue(4)
    keep_three.turns = keep_three.turns[2:]
    budget = len(template_ids(tok, keep_two))
    assert budget < len(template_ids(tok, keep_three)) < len(full.input_ids)

    r = render_dialogue(tok, d, max_length=budget)
    assert (r.num_dropped_turns, r.truncated) == (2, False)
    assert r.input_ids == template_ids(tok, keep_two)
    text = tok.decode(r.input_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and EXCHANGES[0][0] not in text
    check_qwen_labels(tok, r, [a for _, a in EXCHANGES[2:4]])

    r = render_dialogue(tok, d, max_length=budget - 1)  # one token less: a third pair must go
    assert r.num_dropped_turns == 3 and not r.truncated
    assert render_dialogue(tok, d, max_length=len(full.input_ids)) == full


def test_last_exchange_too_long_is_cut_at_the_right(tok):
    d = Dialogue(
        [
            Turn("user", "你好"),
            Turn("assistant", "你好。"),
            Turn("user", "我想聊聊。"),
            Turn("assistant", "好的，" * 60),
        ],
        system=SYSTEM,
    )
    last = Dialogue(d.turns[2:], system=SYSTEM)
    r = render_dialogue(tok, d, max_length=40)
    assert (r.num_dropped_turns, r.truncated) == (1, True)
    assert len(r.input_ids) == len(r.labels) == 40
    assert r.input_ids == template_ids(tok, last)[:40]
    assert tok.decode(r.input_ids).startswith(f"<|im_start|>system\n{SYSTEM}")
    assert r.num_label_tokens > 0 and r.labels[-1] == r.input_ids[-1]


def test_prompt_alone_too_long_leaves_no_labels(tok):
    d = Dialogue([Turn("user", "很长的问题。" * 50), Turn("assistant", "嗯。")])
    r = render_dialogue(tok, d, max_length=30)
    assert r.truncated and len(r.input_ids) == 30 and r.num_label_tokens == 0


def test_trailing_user_turn_keeps_the_last_reply(tok):
    d = Dialogue([Turn("user", "一"), Turn("assistant", "二"), Turn("user", "三" * 200)])
    r = render_dialogue(tok, d, max_length=40)
    assert r.num_dropped_turns == 0 and r.truncated
    assert tok.decode([t for t in r.labels if t != IGNORE_INDEX]) == "二<|im_end|>"


def test_bad_max_length(tok):
    with pytest.raises(UserError, match="max_length"):
        render_dialogue(tok, dialogue(1), max_length=0)


# --- other templates and tokenizers ----------------------------------------------------------------------


def with_template(tok, template):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = template
    return other


def test_no_chat_template_is_a_clear_user_error(tok):
    bare = with_template(tok, None)
    with pytest.raises(UserError, match="no chat template"):
        render_dialogue(bare, dialogue(1))


def test_a_different_template_works(tok):
    # Llama-3-like: no newline after the closing token, the eos token comes from the template variables.
    other = with_template(
        tok,
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}",
    )
    d = dialogue(2)
    r = render_dialogue(other, d)
    assert r.input_ids == template_ids(other, d)
    runs = labelled_runs(r)
    assert [other.decode(r.input_ids[a:b]) for a, b in runs] == [a + "<|im_end|>" for _, a in EXCHANGES[:2]]


def test_template_that_rewrites_history_falls_back_to_search(tok):
    # Qwen3-like: only the final reply carries an (empty) think block, so prefixes are not prefixes.
    other = with_template(
        tok,
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    )
    d = dialogue(3)
    r = render_dialogue(other, d)
    assert r.input_ids == template_ids(other, d)
    check_qwen_labels_loose = [other.decode(r.input_ids[a:b]) for a, b in labelled_runs(r)]
    assert check_qwen_labels_loose == [a + "<|im_end|>" for _, a in EXCHANGES[:3]]


def test_template_error_names_the_record(tok):
    other = with_template(tok, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError) as e:
        render_dialogue(other, dialogue(1))
    assert str(e.value) == "demo.jsonl:4: record d3: chat template failed: roles must alternate"


def test_invalid_dialogue_is_a_data_error(tok):
    d = Dialogue([Turn("assistant", "先说话"), Turn("user", "嗯")], source=Source("x.jsonl", line=9))
    with pytest.raises(DataError, match="x.jsonl:9"):
        render_dialogue(tok, d)


# --- properties and scale --------------------------------------------------------------------------------

TEXT = st.text(alphabet="我你好的是不了人在有心情睡觉焦虑，。？！ab1 \n😀", min_size=1, max_size=30).filter(
    lambda s: s.strip() and not s[0].isspace()
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pairs=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4),
    system=st.one_of(st.none(), TEXT),
    max_length=st.one_of(st.none(), st.integers(5, 200)),
)
def test_render_properties(tok, pairs, system, max_length):
    d = Dialogue([Turn(r, x) for u, a in pairs for r, x in (("user", u), ("assistant", a))], system=system)
    r = render_dialogue(tok, d, max_length=max_length)
    kept = Dialogue(d.turns[2 * r.num_dropped_turns :], system=system)
    expected = template_ids(tok, kept)
    if r.truncated:
        assert r.num_dropped_turns == len(pairs) - 1 and len(r.input_ids) == max_length
        assert r.input_ids == expected[:max_length]
    else:
        assert r.input_ids == expected
        assert tok.decode([t for t in r.labels if t != IGNORE_INDEX]) == "".join(
            a + "<|im_end|>" for _, a in pairs[r.num_dropped_turns :]
        )
        if max_length is not None:
            assert len(r.input_ids) <= max_length
            if r.num_dropped_turns:  # dropping one pair fewer would not have fitted
                fewer = Dialogue(d.turns[2 * (r.num_dropped_turns - 1) :], system=system)
                assert len(template_ids(tok, fewer)) > max_length


def test_emollm_renders_fast(tok, shared_data):
    raw = json.loads((shared_data / "train" / "emollm_data.json").read_text(encoding="utf-8"))
    dialogues = []
    for i, rec in enumerate(raw):
        conv = rec["conversation"]
        turns = [
            Turn(role, t[key]) for t in conv for role, key in (("user", "input"), ("assistant", "output"))
        ]
        dialogues.append(Dialogue(turns, system=conv[0].get("system"), source=Source("emollm", index=i)))
    assert len(dialogues) == 1596
    start = time.perf_counter()
    rendered = [render_dialogue(tok, d, max_length=512) for d in dialogues]
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"{elapsed:.1f}s for 1,596 dialogues"  # ~2s on one core; generous for shared CI
    assert all(len(r.input_ids) <= 512 and r.num_label_tokens > 0 for r in rendered)
    assert sum(r.num_dropped_turns for r in rendered) > 0
    for d in dialogues[:50]:
        assert render_dialogue(tok, d).input_ids == template_ids(tok, d)
