"""The records of a JSON or JSONL file, parsed but not interpreted, each bad one as a one-line DataError.

Shared by the training readers (readers.py turns records into dialogues) and the evaluation sets
(eval/datasets.py turns them into questions), so that both read the same containers the same way:

- JSONL: read as bytes line by line, so one bad line costs only that line; `\\n`, `\\r\\n` and CR-only (classic
  Mac) line endings.
- a JSON array: element by element (json_array.py), so memory is one element and a broken element costs only
  that element; an array of strings is one record when asked (a CPsyCounE dialogue).
- a single JSON object (pretty-printed), or JSON lines in a `.json` file.

Text must be UTF-8 (a BOM is skipped). A file in UTF-16/32 is one error for the whole file; a line or record that
is not UTF-8 says which encoding it looks like (GBK/GB18030, Latin-1) and gives the `iconv` line to convert it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from mhsft.data.json_array import NotAnArray, iter_elements
from mhsft.data.schema import DataError, Source

BOM = b"\xef\xbb\xbf"
# Above this size a file that starts with `{` but whose first line is not JSON is read as JSONL
# (one error per line) rather than parsed whole as a single pretty-printed object.
MAX_SINGLE_OBJECT_BYTES = 64 << 20
MAX_DEPTH = 64  # JSON nesting of one array element; real records nest 4 deep
WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def error_line(e: BaseException) -> str:
    """An exception as one short line (a bytes message, as some parsers raise, decoded rather than repr'd)."""
    arg = e.args[0] if len(e.args) == 1 else None
    text = arg.decode("utf-8", "replace") if isinstance(arg, (bytes, bytearray)) else str(e)
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# Encodings


def wide_encoding(head: bytes) -> str | None:
    """`UTF-16`/`UTF-32` (with a byte-order mark) or `UTF-16LE`/`UTF-16BE` (NUL bytes in every other position:
    ASCII in UTF-16) for the first bytes of a file; None for anything else."""
    for bom, name in WIDE_BOMS:
        if head.startswith(bom):
            return name
    even, odd = head[0:512:2], head[1:512:2]
    if len(odd) >= 4:
        for zeros, other, name in ((odd, even, "UTF-16LE"), (even, odd, "UTF-16BE")):
            if zeros.count(0) >= 0.3 * len(zeros) and other.count(0) <= 0.02 * len(other):
                return name
    return None


def wide_encoding_problem(path: Path) -> str | None:
    """The one-line reason a file in UTF-16/32 is rejected whole, or None."""
    with open(path, "rb") as f:
        name = wide_encoding(f.read(512))
    if name is None:
        return None
    return f"the file is {name}, not UTF-8: convert it with `iconv -f {name} -t UTF-8 {path.name} > out{path.suffix}`"


def _is_cjk(c: str) -> bool:
    o = ord(c)
    return 0x2000 <= o <= 0x206F or 0x3000 <= o <= 0x30FF or 0x3400 <= o <= 0x9FFF or 0xFF00 <= o <= 0xFFEF


def encoding_hint(data: bytes) -> str:
    """What undecodable bytes look like: `; it looks like GBK/GB18030: ...` when they decode as GB18030 into
    Chinese, a Latin-1 guess for other text, nothing for binary."""
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        wide = [c for c in text if ord(c) > 0x7F]
        if wide and sum(map(_is_cjk, wide)) >= 0.9 * len(wide):
            return "; it looks like GBK/GB18030: convert the file with `iconv -f GB18030 -t UTF-8`"
    if wide_encoding(data):
        return "; it looks like UTF-16: convert the file with `iconv -f UTF-16 -t UTF-8`"
    controls = sum(b < 0x20 and b not in b"\t\r\n" for b in data[:4096])
    if controls == 0:
        return "; perhaps Latin-1/Windows-1252: convert the file with `iconv -f CP1252 -t UTF-8`"
    return ""


def not_utf8(data: bytes, err: UnicodeDecodeError, what: str = "text") -> str:
    """`not valid UTF-8 text (byte N); it looks like GBK/GB18030: ...`."""
    return f"not valid UTF-8 {what} (byte {err.start}){encoding_hint(data)}"


# ---------------------------------------------------------------------------------------------------------
# Containers


def sniff(path: Path) -> str:
    """Container of a file from its first bytes: array | object | empty | other."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        while head and not head.lstrip():
            head = f.read(1 << 16)
    head = head.removeprefix(BOM).lstrip()
    if not head:
        return "empty"
    return {b"[": "array", b"{": "object"}.get(head[:1], "other")


def head_text(path: Path, n: int = 64) -> str:
    """The first non-space characters of a file (BOM skipped, undecodable bytes dropped)."""
    with open(path, "rb") as f:
        return f.read(4096).removeprefix(BOM).decode("utf-8", "ignore").lstrip()[:n]


def _parse(data: bytes, src: Source, what: str = "record") -> object:
    """One JSON value; DataError (the text as its raw record) when it is not UTF-8 or not JSON. The error's line
    is counted from `src.line`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(src, not_utf8(data, e, what), data.decode("utf-8", "replace")) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = (src.line or 1) + e.lineno - 1
        raise DataError(src, f"invalid JSON at line {line}, column {e.colno}: {e.msg}", text) from None
    except RecursionError:
        raise DataError(src, "invalid JSON: nested too deeply for Python's json module", text) from None
    except ValueError as e:  # a number too long to convert
        raise DataError(src, f"invalid JSON: {error_line(e)}", text) from None


def _split_cr(f, chunk: int = 1 << 20) -> Iterator[bytes]:
    rest = b""
    while block := f.read(chunk):
        *lines, rest = (rest + block).split(b"\r")
        yield from lines
    if rest:
        yield rest


def _lines(f) -> Iterator[bytes]:
    """The lines of a binary file: split at `\\n` (so `\\r\\n` too), or at `\\r` when the file's first 64 KiB hold
    CRs but no LF (classic Mac line endings)."""
    head = f.read(1 << 16)
    f.seek(0)
    yield from (_split_cr(f) if b"\r" in head and b"\n" not in head else f)


def _iter_jsonl(path: Path) -> Iterator[tuple[object, Source] | DataError]:
    with open(path, "rb") as f:
        index = 0
        for lineno, raw in enumerate(_lines(f), 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            src = Source(str(path), index=index, line=lineno)
            index += 1
            try:
                rec = _parse(raw.rstrip(b"\r\n"), src, "line")
            except DataError as e:
                yield e
                continue
            yield rec, Source(str(path), index=src.index, line=lineno, id=record_id(rec))


def _open_json(path: Path):
    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    if f.read(3) != BOM:
        f.seek(0)
    return f


def _element_record(el, file: str) -> tuple[object, Source] | DataError:
    src = Source(file, index=el.index, line=el.line)
    span = (
        f" (the record spans lines {el.line}-{el.end_line}, {el.size:,} bytes)"
        if el.end_line > el.line
        else ""
    )
    if el.problem is not None:
        raw = el.data.decode("utf-8", "replace") if el.data is not None else None
        return DataError(src, el.problem + span, raw)
    try:
        rec = _parse(el.data, src)
    except DataError as e:
        e.reason += span
        return e
    return rec, Source(file, index=el.index, line=el.line, id=record_id(rec))


def _iter_array(path: Path, strings_as_one: bool) -> Iterator[tuple[object, Source] | DataError]:
    file = str(path)
    with _open_json(path) as f:
        try:
            elements = iter_elements(f, MAX_DEPTH)
            for el in elements:
                item = _element_record(el, file)
                if strings_as_one and el.index == 0 and isinstance(item, tuple) and isinstance(item[0], str):
                    yield _strings_record(path, item[0], elements)
                    return
                yield item
        except NotAnArray:
            yield DataError(Source(file), "not a JSON array")


def _strings_record(path: Path, first: str, elements) -> tuple[object, Source] | DataError:
    """An array of strings as one record (a CPsyCounE dialogue): the first bad element makes it one DataError."""
    src = utterance_file_source(path)
    utterances: list[object] = [first]
    for el in elements:
        item = _element_record(el, str(path))
        if isinstance(item, DataError):
            return DataError(src, f"utterance {el.index + 1}: {item.reason}", utterances)
        utterances.append(item[0])
    return utterances, src


def utterance_file_source(path: Path) -> Source:
    # CPsyCounE names files 1.json, 2.json inside a topic folder: the folder makes the id unique.
    return Source(
        str(path), index=0, line=1, id=f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    )


def _iter_object_or_jsonl(path: Path) -> Iterator[tuple[object, Source] | DataError]:
    """A file starting with `{`: JSONL when its first line is a JSON value on its own, else one (pretty-printed)
    JSON object. A broken object is one reject (with the line of the error); it is read as JSONL instead only
    when some of its first lines are JSON values on their own (JSON lines whose first line is bad)."""
    with open(path, "rb") as f:
        first = next(_lines(f), b"").removeprefix(BOM)
    try:
        json.loads(first)
        is_jsonl = True
    except (ValueError, RecursionError):
        is_jsonl = False
    if not is_jsonl and path.stat().st_size <= MAX_SINGLE_OBJECT_BYTES:
        src = Source(str(path), index=0, line=1)
        try:
            rec = _parse(path.read_bytes().removeprefix(BOM), src)
        except DataError as e:
            if not _some_line_is_json(path):
                yield e
                return
        else:
            yield rec, replace(src, id=record_id(rec))
            return
    yield from _iter_jsonl(path)


def _some_line_is_json(path: Path, n: int = 20) -> bool:
    with open(path, "rb") as f:
        for i, line in enumerate(_lines(f)):
            if i >= n:
                return False
            try:
                json.loads(line)
                return True
            except (ValueError, RecursionError):
                continue
    return False


def iter_json_records(
    path: str | os.PathLike, strings_as_one: bool = True
) -> Iterator[tuple[object, Source] | DataError]:
    """(record, source) for every record of a `.jsonl`, JSON-array or JSON-object file, a DataError for each
    that cannot be read (and one for a whole file that is not JSON). `strings_as_one`: an array whose first
    element is a string is one record (a CPsyCounE dialogue). An empty file or `[]` yields nothing. OSError
    propagates (the caller names the file)."""
    p = Path(path)
    if problem := wide_encoding_problem(p):
        yield DataError(Source(str(p)), problem)
        return
    kind = "jsonl" if p.suffix.lower() == ".jsonl" else sniff(p)
    if kind == "jsonl":
        yield from _iter_jsonl(p)
    elif kind == "array":
        yield from _iter_array(p, strings_as_one)
    elif kind == "object":
        yield from _iter_object_or_jsonl(p)
    elif kind == "other":
        yield DataError(Source(str(p)), "not a JSON array, JSON object or JSONL file")


def record_id(rec: object) -> str | None:
    """The record's own `id` (PsyQA: `questionID`) as a one-line string (ids may be any JSON type in the wild)."""
    if not isinstance(rec, dict):
        return None
    v = rec.get("id", rec.get("questionID"))
    if v is None:
        return None
    try:
        s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)[:200]
    except (ValueError, RecursionError):
        s = f"<{type(v).__name__}>"
    s = " ".join(s.split())  # ids go into one-line messages
    return s[:80] or None
