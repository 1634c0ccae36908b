"""The one dialogue type every stage reads, and the error type every reader raises.

A dialogue is an optional system prompt plus turns that alternate user/assistant, starting with
the user. It remembers where it came from (file, line or record index, id) so that every later
error message can point back at the exact record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Source:
    """Where a record came from. `line` is 1-based (JSONL line, or the line an array element starts on
    when known); `index` is the 0-based record index within the file."""

    file: str
    index: int = 0
    line: int | None = None
    id: str | None = None

    def where(self) -> str:
        """`FILE:LINE` (or `FILE:#INDEX` when no line is known)."""
        loc = str(self.line) if self.line is not None else f"#{self.index}"
        return f"{self.file}:{loc}"

    def label(self) -> str:
        """`record ID` for messages: the record's own id when it has one, else its index."""
        return f"record {self.id}" if self.id not in (None, "") else f"record #{self.index}"


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclass
class Dialogue:
    turns: list[Turn]
    system: str | None = None
    source: Source = field(default_factory=lambda: Source("<memory>"))
    # Counted notices about what reading changed (e.g. an empty last turn dropped): fixed sentences, so that
    # callers can count them by kind.
    notes: list[str] = field(default_factory=list)

    def to_messages(self) -> list[dict]:
        """OpenAI-style messages (system first when present)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += [{"role": t.role, "content": t.content} for t in self.turns]
        return msgs

    def to_sharegpt(self) -> dict:
        conv = [{"from": "human" if t.role == "user" else "gpt", "value": t.content} for t in self.turns]
        rec: dict = {"conversations": conv}
        if self.system:
            rec = {"system": self.system, **rec}
        return rec

    @property
    def num_assistant_turns(self) -> int:
        return sum(t.role == "assistant" for t in self.turns)

    def num_chars(self) -> int:
        return len(self.system or "") + sum(len(t.content) for t in self.turns)

    def key(self) -> tuple:
        """Identity of the dialogue's content (used for exact de-duplication and round-trip checks)."""
        return (self.system or "", tuple((t.role, t.content) for t in self.turns))

    @classmethod
    def from_messages(cls, messages: list[dict], source: Source | None = None) -> Dialogue:
        system = None
        turns = []
        for m in messages:
            if m["role"] == "system":
                system = m["content"]
            else:
                turns.append(Turn(m["role"], m["content"]))
        return cls(turns=turns, system=system, source=source or Source("<memory>"))


class DataError(Exception):
    """A problem with one record (or a whole file). `str()` is the one-line message users see:
    `FILE:LINE: record ID: reason`."""

    def __init__(self, source: Source, reason: str, raw: object = None):
        super().__init__(reason)
        self.source = source
        self.reason = reason
        self.raw = raw

    def __str__(self) -> str:
        return f"{self.source.where()}: {self.source.label()}: {self.reason}"

    def to_reject(self) -> dict:
        """The line written to a rejects JSONL file."""
        s = self.source
        return {
            "file": s.file,
            "line": s.line,
            "index": s.index,
            "id": s.id,
            "reason": self.reason,
            "record": self.raw,
        }

    def to_reject_line(self) -> str:
        """`to_reject()` as one line of strict JSON that always encodes: Chinese kept readable, an unpaired
        surrogate (valid JSON, not valid UTF-8) escaped as `\\udXXX`, a record holding NaN or Infinity written as
        its JSON text in a string, one too deep or circular to serialize left out."""
        rec = self.to_reject()
        for attempt in (
            lambda: rec,
            lambda: {**rec, "record": _json_text(self.raw)},
            lambda: {**rec, "record": None},
        ):
            try:
                line = json.dumps(attempt(), ensure_ascii=False, allow_nan=False, default=str)
            except (ValueError, RecursionError):
                continue
            try:
                line.encode("utf-8")
                return line
            except UnicodeEncodeError:
                return json.dumps(attempt(), allow_nan=False, default=str)
        raise AssertionError("unreachable: a reject without its record always serializes")


def _json_text(raw: object) -> str:
    return json.dumps(raw, ensure_ascii=False, default=str)


def validate_dialogue(d: Dialogue) -> None:
    """Raise DataError unless `d` is a trainable dialogue: user first, strict alternation,
    no empty text, at least one assistant turn."""
    if not d.turns:
        raise DataError(d.source, "dialogue has no turns")
    for i, t in enumerate(d.turns):
        if t.role not in ("user", "assistant"):
            raise DataError(d.source, f"turn {i + 1}: unknown role {t.role!r}")
        if not isinstance(t.content, str):
            raise DataError(
                d.source, f"turn {i + 1} ({t.role}): text is {type(t.content).__name__}, not a string"
            )
        if not t.content.strip():
            raise DataError(d.source, f"turn {i + 1} ({t.role}): empty text")
    if d.turns[0].role != "user":
        raise DataError(d.source, f"turn 1 is {d.turns[0].role}, expected user")
    for i in range(1, len(d.turns)):
        if d.turns[i].role == d.turns[i - 1].role:
            raise DataError(
                d.source,
                f"turn {i + 1}: two {d.turns[i].role} turns in a row (run `mhsft data clean` to merge them)",
            )
    if d.num_assistant_turns == 0:
        raise DataError(d.source, "dialogue has no assistant turn")
    if d.system is not None and not isinstance(d.system, str):
        raise DataError(d.source, f"system prompt is {type(d.system).__name__}, not a string")
