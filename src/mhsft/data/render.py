"""Turn a `Dialogue` into training tokens with the model's own chat template.

The whole dialogue is rendered once with `tokenizer.apply_chat_template` and tokenized once, so the ids
are exactly what the template produces at inference time. Labels are -100 except on each assistant
reply: its content and the template's closing token (`<|im_end|>` for Qwen), which the model must learn
in order to stop. The role header before a reply (`<|im_start|>assistant\\n`) and the whitespace after its
closing token are not trained.

Where a reply sits in the text is found by rendering growing prefixes of the conversation: the text
of `messages[:i]` with the generation prompt ends where reply i begins, and `messages[: i + 1]` ends
just after it. Only strings are rendered per prefix; tokenization happens once, and characters map to
tokens through the fast tokenizer's offsets. Templates that re-render history differently as the
dialogue grows (Qwen3 drops old reasoning, for instance) fall back to locating each message's text in
order.

`max_length` drops whole (user, assistant) pairs from the start, keeping the system prompt, until the
dialogue fits; when even the last exchange does not fit, its tokens are cut at the right.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from mhsft.data.schema import DataError, Dialogue, Turn, validate_dialogue
from mhsft.utils import UserError

IGNORE_INDEX = -100


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on assistant tokens
    num_dropped_turns: int = 0  # (user, assistant) pairs dropped from the start to fit max_length
    truncated: bool = False  # tokens cut at the right because even the last exchange did not fit

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def check_chat_template(tokenizer) -> None:
    """Raise UserError unless `tokenizer` can render dialogues for training."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"the tokenizer of {name} has no chat template, so dialogues cannot be rendered; "
            "use a chat (Instruct) model or one whose tokenizer_config.json / chat_template.jinja defines one"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"{type(tokenizer).__name__} is a slow tokenizer; training needs a fast one (a tokenizer.json), "
            "whose character offsets locate the assistant replies"
        )


def render_dialogue(tokenizer, dialogue: Dialogue, max_length: int | None = None) -> Rendered:
    """Tokens and labels of `dialogue` under the tokenizer's chat template (see the module docstring).
    Raises DataError for a dialogue that cannot be rendered, UserError for an unusable tokenizer."""
    check_chat_template(tokenizer)
    validate_dialogue(dialogue)
    if max_length is not None and max_length < 1:
        raise UserError(f"max_length must be a positive number of tokens, got {max_length}")
    turns = dialogue.turns
    ids, labels, pair_ends = _render(tokenizer, dialogue, turns)
    if max_length is None or len(ids) <= max_length:
        return Rendered(ids, labels)

    # Dropping pairs 0..k-1 removes about the tokens up to the end of pair k-1. Start from the smallest
    # k that this estimate says fits; the estimate errs towards too few, so step up until it really fits.
    last_assistant = max(i for i, t in enumerate(turns) if t.role == "assistant")
    max_drop = last_assistant // 2  # never drop the pair that holds the last reply
    k = max_drop
    for j in range(1, max_drop + 1):
        if len(ids) - pair_ends[j - 1] <= max_length:
            k = j
            break
    while True:
        ids, labels, _ = _render(tokenizer, dialogue, turns[2 * k :])
        if len(ids) <= max_length or k == max_drop:
            break
        k += 1
    if len(ids) <= max_length:
        return Rendered(ids, labels, num_dropped_turns=k)
    return Rendered(ids[:max_length], labels[:max_length], num_dropped_turns=k, truncated=True)


def _render(tokenizer, dialogue: Dialogue, turns: list[Turn]) -> tuple[list[int], list[int], list[int]]:
    """ids, labels, and for each (user, assistant) pair the token index where it ends."""
    messages = [{"role": "system", "content": dialogue.system}] if dialogue.system else []
    messages += [{"role": t.role, "content": t.content} for t in turns]
    text, spans = _assistant_spans(tokenizer, messages, dialogue)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    starts = [s for s, _ in enc["offset_mapping"]]
    ends = [e for _, e in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    # Tokens touching a span are labelled: a token that straddles the start (a byte-level merge of the
    # header's newline with a reply that itself starts with a newline) is one the model must produce.
    for a, b in spans:
        lo, hi = bisect_right(ends, a), bisect_left(starts, b)
        labels[lo:hi] = ids[lo:hi]
    pair_ends = [bisect_left(starts, b) for _, b in spans]
    return ids, labels, pair_ends


def _apply(tokenizer, convs: list[list[dict]], gen: bool, dialogue: Dialogue) -> list[str]:
    if not convs:
        return []
    try:
        return tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja's TemplateError, raise_exception() in templates, ...
        msg = str(e).strip().splitlines()
        raise DataError(
            dialogue.source, f"chat template failed: {msg[0] if msg else type(e).__name__}"
        ) from e


def _assistant_spans(
    tokenizer, messages: list[dict], dialogue: Dialogue
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character span of every assistant reply in it."""
    reply = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    befores = _apply(tokenizer, [messages[:i] for i in reply], True, dialogue)
    throughs = _apply(tokenizer, [messages[: i + 1] for i in reply], False, dialogue)
    text = (
        throughs[-1] if reply[-1] == len(messages) - 1 else _apply(tokenizer, [messages], False, dialogue)[0]
    )
    if all(text.startswith(t) for t in throughs) and all(text.startswith(b) for b in befores):
        # Reply i is everything the model generates after the generation prompt, through the closing
        # token; the trailing whitespace the template adds between messages is not generated.
        return text, [(len(b), max(len(b), len(t.rstrip()))) for b, t in zip(befores, throughs, strict=True)]
    return text, _find_in_order(text, messages, throughs, dialogue)


def _find_in_order(
    text: str, messages: list[dict], throughs: list[str], dialogue: Dialogue
) -> list[tuple[int, int]]:
    """Fallback for templates whose history changes as the dialogue grows: find each message's text in
    order (so a reply quoted in a later user turn is not mistaken for the reply), then extend each reply
    over the closing marker the template puts after it when it is the last message."""
    spans, cursor, k = [], 0, 0
    for m in messages:
        content = m["content"]
        at = text.find(content, cursor)
        if at < 0:
            who = "system prompt" if m["role"] == "system" else f"{m['role']} turn"
            raise DataError(
                dialogue.source, f"cannot find the {who} in the text rendered by the chat template"
            )
        cursor = at + len(content)
        if m["role"] == "assistant":
            through = throughs[k]
            closing = through[through.rfind(content) + len(content) :].rstrip()
            if closing and text.startswith(closing, cursor):
                cursor += len(closing)
            spans.append((at, cursor))
            k += 1
    return spans
