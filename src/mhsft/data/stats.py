"""Dataset statistics for `mhsft data inspect`: streaming, one pass, memory bounded by one small int per dialogue."""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from mhsft.data.binpack import pack_bfd
from mhsft.data.crisis import points_to_help, signals_crisis
from mhsft.data.render import render_dialogue
from mhsft.data.schema import DataError, Dialogue

# Per-record detail that would split one kind of problem into many groups: a leading `turn 3 (user): `,
# numbers (`byte 17`, `element 5`), and everything after the first `: `, ` (` or `; ` (quoted text, hints).
_REASON_LEAD = re.compile(r"^(?:turn|utterance|history) \d+(?: \([^)]*\))?(?: \w+)?: ")
_REASON_TAIL = re.compile(r": | \(|; ")
_NUMBER = re.compile(r"(?<![\w-])\d+(?![\w-])")


def reason_group(reason: str) -> str:
    """The kind of a reject reason, for counting: `turn 3 (assistant): empty text` -> `empty text`,
    `invalid JSON: Expecting value: ...` -> `invalid JSON`."""
    r = _REASON_LEAD.sub("", reason, count=1)
    r = _REASON_TAIL.split(r, maxsplit=1)[0]
    return _NUMBER.sub("N", r).strip()[:80] or "invalid record"


def percentiles(values: array, qs=(50, 90, 99)) -> dict:
    if not values:
        return {f"p{q}": 0 for q in qs} | {"max": 0, "mean": 0.0}
    import numpy as np

    a = np.frombuffer(values, dtype=np.int32) if values.typecode == "i" else np.asarray(values)
    out = {f"p{q}": int(np.percentile(a, q, method="nearest")) for q in qs}
    out["max"] = int(a.max())
    out["mean"] = round(float(a.mean()), 1)
    return out


@dataclass
class Stats:
    """Accumulates per-dialogue numbers. Lengths are kept as int32 arrays (4 bytes per dialogue:
    4 MB for a million dialogues) because exact percentiles need them."""

    max_length: int | None = None
    dialogues: int = 0
    rejected: int = 0
    reject_reasons: Counter = field(default_factory=Counter)
    notices: Counter = field(default_factory=Counter)  # Dialogue.notes by kind: what reading changed
    files: Counter = field(default_factory=Counter)
    with_system: int = 0
    turns: int = 0
    assistant_turns: int = 0
    chars: array = field(default_factory=lambda: array("i"))
    turns_per_dialogue: array = field(default_factory=lambda: array("i"))
    tokens: array = field(default_factory=lambda: array("i"))
    fitted_tokens: array = field(default_factory=lambda: array("i"))  # after truncation to max_length
    label_tokens: int = 0
    truncated_dialogues: int = 0
    dropped_turn_pairs: int = 0
    cut_dialogues: int = 0
    # client turns that signal self-harm or suicide, and how many of the replies to them point to help: what a
    # model fine-tuned on this data sees counselors do in a crisis (mhsft.data.crisis)
    crisis_turns: int = 0
    crisis_replies_to_help: int = 0

    def add(self, item: Dialogue | DataError, tokenizer=None) -> None:
        if tokenizer is not None and not isinstance(item, DataError):
            try:
                lengths = self._render(item, tokenizer)
            except DataError as e:  # the chat template refuses this dialogue: a bad record like any other
                item = e
        self.files[item.source.file] += 1
        if isinstance(item, DataError):
            self.rejected += 1
            self.reject_reasons[reason_group(item.reason)] += 1
            return
        d = item
        self.dialogues += 1
        self.notices.update(d.notes)
        self.with_system += bool(d.system)
        self.turns += len(d.turns)
        self.assistant_turns += d.num_assistant_turns
        self.chars.append(d.num_chars())
        self.turns_per_dialogue.append(len(d.turns))
        self._count_crises(d)
        if tokenizer is not None:
            full, fitted, labels, dropped, cut = lengths
            self.tokens.append(full)
            self.label_tokens += labels
            if self.max_length:
                self.fitted_tokens.append(fitted)
                self.truncated_dialogues += bool(dropped or cut)
                self.dropped_turn_pairs += dropped
                self.cut_dialogues += cut

    def _count_crises(self, d: Dialogue) -> None:
        for t, reply in zip(d.turns, d.turns[1:]):
            if t.role == "user" and reply.role == "assistant" and signals_crisis(t.content):
                self.crisis_turns += 1
                self.crisis_replies_to_help += points_to_help(reply.content)

    def _render(self, d: Dialogue, tokenizer) -> tuple[int, int, int, int, bool]:
        """(full tokens, tokens after fitting max_length, trained tokens after fitting, dropped pairs, cut)."""
        full = render_dialogue(tokenizer, d, None)
        r = full
        if self.max_length and len(full.input_ids) > self.max_length:
            r = render_dialogue(tokenizer, d, self.max_length)
        return len(full.input_ids), len(r.input_ids), r.num_label_tokens, r.num_dropped_turns, r.truncated

    def packing(self) -> dict | None:
        """Best-fit-decreasing packing of the lengths as training sees them (earliest turns dropped to fit
        max_length) into rows of max_length."""
        if not self.max_length or not self.fitted_tokens:
            return None
        lengths = list(self.fitted_tokens)
        rows = pack_bfd(lengths, self.max_length)
        eff = sum(lengths) / (len(rows) * self.max_length)
        padded = len(lengths) * self.max_length
        return {
            "rows": len(rows),
            "efficiency": round(eff, 4),
            "padding_efficiency": round(sum(lengths) / padded, 4),
        }

    def to_dict(self) -> dict:
        out = {
            "dialogues": self.dialogues,
            "rejected": self.rejected,
            "reject_reasons": dict(self.reject_reasons.most_common(10)),
            "notices": dict(self.notices),
            "files": len(self.files),
            "with_system_prompt": self.with_system,
            "turns": self.turns,
            "assistant_turns": self.assistant_turns,
            "turns_per_dialogue": percentiles(self.turns_per_dialogue),
            "characters": {"total": int(sum(self.chars)), **percentiles(self.chars)},
            "crisis": {
                "client_turns": self.crisis_turns,
                "replies_pointing_to_help": self.crisis_replies_to_help,
            },
        }
        if self.tokens:
            out["tokens"] = {"total": int(sum(self.tokens)), **percentiles(self.tokens)}
            out["label_tokens"] = self.label_tokens
        if self.max_length and self.tokens:
            n = max(self.dialogues, 1)
            out["max_length"] = self.max_length
            out["truncation"] = {
                "dialogues": self.truncated_dialogues,
                "rate": round(self.truncated_dialogues / n, 4),
                "turn_pairs_dropped": self.dropped_turn_pairs,
                "cut_inside_last_turn": self.cut_dialogues,
            }
            out["packing"] = self.packing()
        return out


def collect(items: Iterable[Dialogue | DataError], tokenizer=None, max_length: int | None = None) -> Stats:
    s = Stats(max_length=max_length)
    for it in items:
        s.add(it, tokenizer)
    return s


def format_table(d: dict, title: str) -> str:
    """A plain-text table (box drawing via rich when it renders to a string)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("statistic")
    t.add_column("value", justify="right")

    def pct(p: dict) -> str:
        return (
            f"mean {p['mean']:,} · p50 {p['p50']:,} · p90 {p['p90']:,} · p99 {p['p99']:,} · max {p['max']:,}"
        )

    t.add_row("dialogues", f"{d['dialogues']:,}")
    t.add_row("rejected records", f"{d['rejected']:,}")
    for reason, n in d["reject_reasons"].items():
        t.add_row(f"  {reason}", f"{n:,}")
    for notice, n in d.get("notices", {}).items():
        t.add_row(f"notice: {notice}", f"{n:,}")
    t.add_row("files", f"{d['files']:,}")
    t.add_row("with system prompt", f"{d['with_system_prompt']:,}")
    t.add_row("turns (user + assistant)", f"{d['turns']:,}")
    t.add_row("assistant turns", f"{d['assistant_turns']:,}")
    t.add_row("turns per dialogue", pct(d["turns_per_dialogue"]))
    t.add_row("characters per dialogue", pct(d["characters"]))
    t.add_row("characters total", f"{d['characters']['total']:,}")
    if c := d.get("crisis"):
        t.add_row("client turns signalling a crisis", f"{c['client_turns']:,}")
        t.add_row("  replies to them pointing to help", f"{c['replies_pointing_to_help']:,}")
    if "tokens" in d:
        t.add_row("tokens per dialogue", pct(d["tokens"]))
        t.add_row("tokens total", f"{d['tokens']['total']:,}")
        t.add_row("trained (assistant) tokens", f"{d['label_tokens']:,}")
    if "truncation" in d:
        tr = d["truncation"]
        t.add_row(f"truncated at max_length {d['max_length']:,}", f"{tr['dialogues']:,} ({tr['rate']:.1%})")
        t.add_row("  earliest turn pairs dropped", f"{tr['turn_pairs_dropped']:,}")
        t.add_row("  cut inside the last turn", f"{tr['cut_inside_last_turn']:,}")
        pk = d["packing"]
        t.add_row("packing efficiency (BFD)", f"{pk['efficiency']:.1%} in {pk['rows']:,} rows")
        t.add_row("padding efficiency (no packing)", f"{pk['padding_efficiency']:.1%}")
    console = Console(width=110, record=False, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(t)
    return cap.get()
