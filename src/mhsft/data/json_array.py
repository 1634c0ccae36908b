"""The elements of a top-level JSON array, one at a time, carrying on past a broken one.

The problem: a training file is often one JSON array of 10^3-10^6 records (EmoLLM's is 1,596 dialogues in 3.8 MB,
pretty-printed). Every streaming JSON parser stops for good at the first syntax error (ijson/yajl, which mhsft used
before, and json-stream alike: their state is lost and they cannot be restarted mid-array), so one `NaN`, one
stray quote or one bad element in the middle cost every record after it, and those records were counted neither
good nor rejected. `json.loads` on the whole file stops the same way and holds the file in memory.

What this does instead: a byte scanner finds where each top-level element begins and ends. It follows only
strings (with their escapes) and the depth of brackets, so it needs to understand nothing inside an element; each
element is then parsed on its own by `json.loads` (by the caller). A broken element is one bad record, and the next
record begins after the next top-level comma. Memory is one element (and at most MAX_ELEMENT_BYTES of it: a larger
one, or one nested deeper than `max_depth`, is skipped unkept, so a hostile `[[[[...` costs neither memory nor
recursion).

What it cannot resynchronise, and says so: a bracket missing inside an element merges it with the elements after
it until the count balances again (or the file ends); the element then fails to parse and its reject names the
lines and bytes it spans. A raw newline inside a string (never valid JSON) ends the string, which keeps a missing
quote from swallowing the rest of a pretty-printed file. A `]` that closes the array early but is followed by a
comma (after any more `]`s) is taken as a stray bracket inside the current element; other text after the closing `]` is one reject
naming its size.

Measured on this machine (2 shared cores): the scan of EmoLLM's 3.8 MB array takes 0.06 s (about 65 MB/s), and
`iter_file` reads it into 1,596 dialogues in 0.09-0.10 s against 0.03 s with ijson's C backend before: reading
is 2-3x slower, and still small beside tokenizing the same text; the price of never losing a record to a
neighbour.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 1 << 20
MAX_ELEMENT_BYTES = 256 << 20
_OUTSIDE = re.compile(rb'[\[\]{}",]')
# The rest of a string: everything up to its closing quote (escapes included), or up to a raw newline or the
# buffer's end; one C call per string instead of one per escape.
_STRING_REST = re.compile(rb'[^"\\\n]*(?:\\.[^"\\\n]*)*', re.S)
_SPACE = b" \t\r\n"


@dataclass
class Element:
    """One top-level element: its bytes (None when not kept), where it starts, and what the scanner saw wrong
    with it (None when nothing: it may still fail to parse)."""

    data: bytes | None
    index: int
    line: int  # 1-based line of its first byte
    end_line: int
    size: int  # bytes, surrounding whitespace included
    problem: str | None = None


class NotAnArray(ValueError):
    pass


class _Buffer:
    """The part of a file read and not yet dropped: `buf[0]` is at byte `base` of the file. Line numbers come from
    a cursor that moves with the scan, so counting them costs one pass over the file in all."""

    def __init__(self, f: BinaryIO):
        self.f, self.buf, self.base = f, bytearray(), 0
        self.cur_pos, self.cur_line = 0, 1

    def more(self, keep: int) -> int:
        """Read another chunk, dropping the bytes before `keep`. Returns how many bytes were dropped (the caller
        shifts its offsets by that), or -1 at the end of the file."""
        chunk = self.f.read(CHUNK)
        if not chunk:
            return -1
        self.line_at(keep)
        self.cur_pos = 0
        del self.buf[:keep]
        self.base += keep
        self.buf += chunk
        return keep

    def line_at(self, pos: int) -> int:
        """The 1-based line of `buf[pos]`."""
        if pos >= self.cur_pos:
            self.cur_line += self.buf.count(b"\n", self.cur_pos, pos)
        else:
            self.cur_line -= self.buf.count(b"\n", pos, self.cur_pos)
        self.cur_pos = pos
        return self.cur_line


def iter_elements(f: BinaryIO, max_depth: int = 64) -> Iterator[Element]:
    """Every top-level element of the JSON array `f` (a binary file at the array's first byte, BOM skipped).
    Raises NotAnArray when the first non-space byte is not `[`; never raises on anything after it."""
    b = _Buffer(f)
    b.more(0)
    pos = _skip_space(b, 0)
    if pos is None or b.buf[pos : pos + 1] != b"[":
        raise NotAnArray("not a JSON array")
    yield from _scan(b, pos + 1, max_depth)


def _skip_space(b: _Buffer, pos: int, skip: bytes = _SPACE) -> int | None:
    """The offset of the next byte from `pos` not in `skip` (reading more, dropping nothing), None at the end."""
    while True:
        while pos < len(b.buf) and b.buf[pos] in skip:
            pos += 1
        if pos < len(b.buf):
            return pos
        if b.more(0) < 0:
            return None


class _Element:
    """The element being scanned: its start (an offset in the buffer while its bytes are kept), depth, problem."""

    def __init__(self, b: _Buffer, start: int, index: int):
        self.start, self.begin, self.index = start, b.base + start, index
        self.line = b.line_at(start)
        self.kept, self.depth, self.problem = True, 0, None

    def drop(self, problem: str) -> None:
        self.kept, self.problem = False, problem

    def finish(self, b: _Buffer, end: int, problem: str | None = None) -> Element:
        size = b.base + end - self.begin
        data, line = None, self.line
        if self.kept:
            raw = bytes(b.buf[self.start : end])
            data = raw.strip()
            line = b.line_at(self.start + len(raw) - len(raw.lstrip()))
        return Element(data, self.index, line, b.line_at(end), size, problem or self.problem)


def _scan(b: _Buffer, pos: int, max_depth: int) -> Iterator[Element]:
    el, in_str = _Element(b, pos, 0), False
    while True:
        if in_str:
            pos = _STRING_REST.match(b.buf, pos).end()
            if pos < len(b.buf) and b.buf[pos] != 0x5C:  # at the closing quote, or a raw newline (no JSON
                # string holds one): the string is over. A backslash here is the buffer's last byte: read more.
                in_str, pos = False, pos + 1
                continue
            m = None
        else:
            m = _OUTSIDE.search(b.buf, pos)
        if m is None:
            shift = b.more(el.start if el.kept else min(pos, len(b.buf)))
            if shift < 0:
                yield _at_eof(b, el, in_str)
                return
            pos -= shift
            el.start -= shift
            if el.kept and len(b.buf) - el.start > MAX_ELEMENT_BYTES:
                el.drop(f"record larger than {MAX_ELEMENT_BYTES >> 20} MiB: skipped unread")
            continue
        c, pos = m.group(), m.end()
        if c == b'"':  # most strings end within the buffer: skip them here rather than in another round
            end = _STRING_REST.match(b.buf, pos).end()
            if end < len(b.buf) and b.buf[end] != 0x5C:
                pos = end + 1
            else:
                in_str = True
        elif c in b"[{":
            el.depth += 1
            if el.depth > max_depth and el.kept:
                el.drop(f"record nests deeper than {max_depth} levels")
        elif c in b"]}" and el.depth > 0:
            el.depth -= 1
        elif c == b"]" and not _stray_bracket(b, pos):
            last = el.finish(b, pos - 1)
            if last.data or last.problem or el.index > 0:  # `[]` holds no element
                yield _empty_checked(last)
            yield from _trailing(b, pos, el.index + 1)
            return
        elif c == b"," and el.depth == 0:
            yield _empty_checked(el.finish(b, pos - 1))
            el = _Element(b, pos, el.index + 1)


def _empty_checked(e: Element) -> Element:
    if e.problem is None and e.data == b"":
        e.problem = "empty array element (two commas in a row, or a comma before the closing ])"
    return e


def _stray_bracket(b: _Buffer, pos: int) -> bool:
    """A `]` at the array's own level ends it, unless a comma follows (after more `]`s, perhaps): then it is a
    stray bracket inside a broken element, and the array goes on."""
    nxt = _skip_space(b, pos, _SPACE + b"]")
    return nxt is not None and b.buf[nxt : nxt + 1] == b","


def _trailing(b: _Buffer, pos: int, index: int) -> Iterator[Element]:
    nxt = _skip_space(b, pos)
    if nxt is None:
        return
    line, begin = b.line_at(nxt), b.base + nxt
    while b.more(len(b.buf)) >= 0:
        pass
    size = b.base + len(b.buf) - begin
    yield Element(None, index, line, line, size, f"{size:,} byte(s) after the array's closing ] are not read")


def _at_eof(b: _Buffer, el: _Element, in_str: bool) -> Element:
    last = el.finish(b, len(b.buf))
    if last.problem is None:
        if last.data == b"":
            where = "after a comma" if el.index else "right after the array's opening ["
        else:
            where = "inside a string" if in_str else "inside a record"
        last.problem = f"the file ends {where}, before the array's closing ] (truncated?)"
    return last
