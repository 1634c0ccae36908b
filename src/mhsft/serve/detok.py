"""Token ids -> text deltas for streaming, never splitting a UTF-8 character, and stop strings.

A byte-level BPE (Qwen's) can put the three bytes of one Chinese character into two or three tokens; decoding
a token on its own then gives U+FFFD. Following text-generation-inference and vLLM, each step decodes a short
window of recent tokens twice (without and with the new ones) and emits only the text that grew, holding back
while the new text still ends in an incomplete character. Stop strings are held back the same way while the
text ends in a prefix of one, so a client never sees the start of a stop string.
"""

from __future__ import annotations

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
