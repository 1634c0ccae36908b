"""Token ids -> text deltas for streaming, never splitting a UTF-8 character, and stop strings.

A byte-level BPE (Qwen's) can put the three bytes of one Chinese character into two or three tokens; decoding
a token on its own then gives U+FFFD. Following text-generation-inference and vLLM, each step decodes a short
window of recent tokens twice (without and with the new ones) and emits only the text that grew, holding back
while the new text still ends in an incomplete character. Stop strings are held back the same way while the
text ends in a prefix of one, so a client never sees the start of a stop string.

`TokenBytes` gives a token's raw bytes for the logprobs' `bytes` field: a token holding part of a character
has no text of its own, and the bytes of its U+FFFD cannot be joined back into the character (OpenAI reports
the raw bytes for this reason).
"""

from __future__ import annotations

import json
import re

REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes, so at most 4 byte-level tokens: tokens that still have not produced text
# after this many (special tokens that decode to nothing, ids the tokenizer does not know) are given up on, which
# keeps the decoded window short; without it such a run decodes a window that grows by one token a step.
MAX_PENDING = 8


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already produced, used as left context
        self.read = 0
        self.text = ""  # all text produced so far (stop strings never included)
        self.emitted = 0  # len of self.text already handed out
        self.stop = [s for s in (stop or []) if s]
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show (possibly '')."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        grew = len(after) > len(before) and not after.endswith(REPLACEMENT)
        if grew or len(self.ids) - self.read > MAX_PENDING:
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of the reply: whatever is still held back (an incomplete character stays U+FFFD)."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            after = self._decode(self.ids[self.prefix :])
            self.text += after[len(before) :]
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            # A stop string may straddle what was emitted and the new text: search from the earliest place it
            # could start.
            start = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [(at, s) for s in self.stop if (at := self.text.find(s, start)) >= 0]
            if hits:
                at = min(a for a, _ in hits)
                self.text = self.text[:at]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final and self.stop:
            end -= _held_back(self.text, self.stop, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out


def _held_back(text: str, stops: list[str], floor: int) -> int:
    """Length of the longest suffix of `text` (starting at or after `floor`) that begins some stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text) - floor), longest, -1):
            if s.startswith(text[len(text) - n :]):
                longest = n
                break
    return longest


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback tokens


class TokenBytes:
    """token id -> the bytes it stands for. Byte-level BPE (GPT-2, Qwen) spells each byte as one symbol, which
    GPT-2's byte-to-unicode table maps back; SentencePiece's byte-fallback tokens are `<0xE4>`; added tokens are
    their own text; any other token is its decoded text. Ids past the tokenizer's vocabulary (padding rows of
    the embedding) are empty."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self.byte_of = _byte_level_table(tokenizer)

    def __call__(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not piece:
            return b""
        if self.byte_of is not None and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        text = self.tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return text.encode("utf-8")


def _byte_level_table(tokenizer) -> dict[str, int] | None:
    """symbol -> byte, when the tokenizer's decoder is byte-level (else None)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return None
    spec = json.loads(decoder.__getstate__())
    kinds = {d.get("type") for d in spec.get("decoders", [spec])}
    if "ByteLevel" not in kinds:
        return None
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:  # transformers 4.x keeps it with GPT-2's tokenizer
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}
