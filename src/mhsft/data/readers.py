"""Read every dataset format users bring into `Dialogue`s, one record at a time.

Readers never raise on bad data: `iter_file` yields a `DataError` for each bad record (and a single
`DataError` for a whole-file problem such as a missing or unreadable file) so that callers can count,
print and write rejects and carry on. Formats (see ../shared/data/README.md):

- `sharegpt`  {"system"?, "conversations": [{"from": human|user|gpt|assistant|system, "value"}]}
- `messages`  {"messages": [{"role": system|user|assistant, "content"}]}   (OpenAI)
- `alpaca`    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
- `emollm`    {"conversation": [{"system"?, "input", "output"}, ...]}         (XTuner / EmoLLM)
- `cpsycound` plain text, `来访者：` / `心理咨询师：` turns separated by blank lines; one file = one dialogue
- `cpsycoune` a JSON array of `求助者：` / `支持者：` utterances; one file = one dialogue

Containers: JSON array files (streamed with ijson, so memory stays bounded on million-record files),
JSONL (read as bytes line by line, so one bad line costs only that line), a single JSON object, text
files, and folders (recursed in sorted order, each file detected on its own).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import ijson

from mhsft.data.schema import DataError, Dialogue, Source, Turn, validate_dialogue

FORMATS = ("sharegpt", "messages", "alpaca", "emollm", "cpsycound", "cpsycoune")
DATA_SUFFIXES = (".json", ".jsonl", ".txt")
# Metadata that hub snapshots and `datasets.save_to_disk` put next to the data; never dialogues.
METADATA_FILES = {
    "dataset_infos.json",
    "dataset_info.json",
    "dataset_dict.json",
    "state.json",
    "configuration.json",
}
BOM = b"\xef\xbb\xbf"
# Above this size a file that starts with `{` but whose first line is not JSON is read as JSONL
# (one error per line) rather than parsed whole as a single pretty-printed object.
MAX_SINGLE_OBJECT_BYTES = 64 << 20
MAX_DEPTH = 64  # JSON nesting of one array element; real records nest 4 deep

ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# CPsyCounD (text) and CPsyCounE (utterance list) speakers; full-width or ASCII colon.
SPEAKERS = {"来访者": "user", "求助者": "user", "心理咨询师": "assistant", "支持者": "assistant"}
SPEAKER_RE = re.compile(r"^\s*(来访者|求助者|心理咨询师|支持者)\s*[：:]\s*")


# ---------------------------------------------------------------------------------------------------------
# One record -> Dialogue


def _short(v: object, n: int = 40) -> str:
    try:
        s = repr(v)
    except RecursionError:  # hostile input nests lists thousands deep
        s = f"<deeply nested {type(v).__name__}>"
    return s if len(s) <= n else s[: n - 3] + "..."


def record_id(rec: object) -> str | None:
    """The record's own `id` as a one-line string (ids may be any JSON type in the wild)."""
    if not isinstance(rec, dict) or rec.get("id") is None:
        return None
    v = rec["id"]
    try:
        s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)[:200]
    except (ValueError, RecursionError):
        s = f"<{type(v).__name__}>"
    s = " ".join(s.split())  # ids go into one-line messages
    return s[:80] or None


def _text(v: object, src: Source, what: str) -> str:
    """A turn's text. OpenAI-style content parts ([{"type": "text", "text": ...}]) are joined."""
    if isinstance(v, list) and v and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in v):
        v = "".join(p["text"] for p in v)
    if v is None:
        raise DataError(src, f"{what}: text is missing")
    if not isinstance(v, str):
        raise DataError(src, f"{what}: text is {type(v).__name__}, not a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows "\ud800"; such a string cannot be tokenized or written back out.
        raise DataError(src, f"{what}: text contains an unpaired surrogate (invalid Unicode)") from None
    return v


def _system(v: object, src: Source) -> str | None:
    if v is None:
        return None
    s = _text(v, src, "system prompt")
    return s if s.strip() else None


def _from_turn_list(items: object, src: Source, key: str) -> tuple[str | None, list[Turn]]:
    """ShareGPT and OpenAI messages: a list of {from|role, value|content}; a system turn only first."""
    if not isinstance(items, list):
        raise DataError(src, f"'{key}' is {type(items).__name__}, expected a list of turns")
    system, turns = None, []
    for i, m in enumerate(items, 1):
        if not isinstance(m, dict):
            raise DataError(src, f"turn {i} is {type(m).__name__}, expected an object")
        speaker = m.get("from", m.get("role"))
        role = ROLE_NAMES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                src, f"turn {i}: unknown speaker {_short(speaker)} (expected user/assistant/system)"
            )
        text = _text(m["value"] if "value" in m else m.get("content"), src, f"turn {i} ({role})")
        if role == "system":
            if i != 1:
                raise DataError(src, f"turn {i}: a system message may only come first")
            system = text if text.strip() else None
        else:
            turns.append(Turn(role, text))
    return system, turns


def _sharegpt(rec: dict, src: Source) -> Dialogue:
    key = "conversations" if "conversations" in rec else "conversation"
    if key not in rec:
        raise DataError(src, "ShareGPT record has no 'conversations'")
    inner, turns = _from_turn_list(rec[key], src, key)
    top = _system(rec.get("system"), src)
    if top and inner and top != inner:
        raise DataError(src, "two different system prompts ('system' field and a system turn)")
    return Dialogue(turns, top or inner, src)


def _messages(rec: dict, src: Source) -> Dialogue:
    if "messages" not in rec:
        raise DataError(src, "record has no 'messages'")
    system, turns = _from_turn_list(rec["messages"], src, "messages")
    return Dialogue(turns, system, src)


def _or_empty(v: object) -> object:
    return "" if v is None else v


def _alpaca(rec: dict, src: Source) -> Dialogue:
    if "output" not in rec:
        raise DataError(src, "Alpaca record has no 'output'")
    turns = []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise DataError(src, f"'history' is {type(history).__name__}, expected a list of [question, answer]")
    for i, pair in enumerate(history, 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(src, f"history item {i} is not a [question, answer] pair")
        turns += [
            Turn("user", _text(pair[0], src, f"history {i} question")),
            Turn("assistant", _text(pair[1], src, f"history {i} answer")),
        ]
    instruction = _text(_or_empty(rec.get("instruction")), src, "instruction")
    inp = _text(_or_empty(rec.get("input")), src, "input")
    user = instruction + "\n" + inp if instruction and inp.strip() else instruction or inp
    turns += [Turn("user", user), Turn("assistant", _text(rec["output"], src, "output"))]
    return Dialogue(turns, _system(rec.get("system"), src), src)


def _emollm(rec: dict, src: Source) -> Dialogue:
    conv = rec.get("conversation")
    if not isinstance(conv, list):
        raise DataError(src, f"'conversation' is {type(conv).__name__}, expected a list of turns")
    system, turns = None, []
    for i, t in enumerate(conv, 1):
        if not isinstance(t, dict):
            raise DataError(src, f"turn {i} is {type(t).__name__}, expected an object")
        if i == 1:
            system = _system(t.get("system"), src)
        elif t.get("system") and t.get("system") != system:
            raise DataError(src, f"turn {i}: a system prompt may only be on the first turn")
        turns += [
            Turn("user", _text(t.get("input"), src, f"turn {i} input")),
            Turn("assistant", _text(t.get("output"), src, f"turn {i} output")),
        ]
    return Dialogue(turns, system, src)


def _utterances(rec: object, src: Source) -> Dialogue:
    """CPsyCounE: ["求助者：…", "支持者：…", ...]."""
    if not isinstance(rec, list):
        raise DataError(src, f"record is {type(rec).__name__}, expected a list of utterances")
    turns = []
    for i, u in enumerate(rec, 1):
        u = _text(u, src, f"utterance {i}")
        m = SPEAKER_RE.match(u)
        if not m:
            raise DataError(src, f"utterance {i} has no speaker prefix (求助者：/支持者：): {_short(u)}")
        turns.append(Turn(SPEAKERS[m.group(1)], u[m.end() :].strip()))
    return Dialogue(turns, None, src)


CONVERTERS = {"sharegpt": _sharegpt, "messages": _messages, "alpaca": _alpaca, "emollm": _emollm}


def detect_record(rec: object) -> str | None:
    """The format of one parsed JSON record, or None when it matches none."""
    if isinstance(rec, list):
        return "cpsycoune" if rec and all(isinstance(u, str) for u in rec) else None
    if not isinstance(rec, dict):
        return None
    if "conversations" in rec:
        return "sharegpt"
    if "messages" in rec:
        return "messages"
    if "conversation" in rec:
        conv = rec["conversation"]
        first = conv[0] if isinstance(conv, list) and conv else None
        return "sharegpt" if isinstance(first, dict) and ("from" in first or "role" in first) else "emollm"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    return None


def parse_record(rec: object, fmt: str = "auto", source: Source | None = None) -> Dialogue:
    """One parsed JSON record -> validated Dialogue. Raises DataError (with `.raw = rec`) when it is bad."""
    src = source or Source("<memory>")
    try:
        kind = detect_record(rec) if fmt == "auto" else fmt
        if kind is None:
            keys = ", ".join(_short(k, 20) for k in list(rec)[:8]) if isinstance(rec, dict) else ""
            got = f"an object with keys {keys}" if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
            raise DataError(
                src,
                f"unrecognized record ({got}); expected conversations (ShareGPT), messages, "
                "instruction/output (Alpaca) or conversation (EmoLLM)",
            )
        if kind == "cpsycoune":
            d = _utterances(rec, src)
        elif kind in CONVERTERS:
            if not isinstance(rec, dict):
                raise DataError(src, f"record is a JSON {type(rec).__name__}, expected an object ({kind})")
            d = CONVERTERS[kind](rec, src)
        else:
            raise DataError(src, f"format {kind!r} cannot be read from a JSON record")
        validate_dialogue(d)
        return d
    except DataError as e:
        e.raw = rec
        raise


def parse_counseling_text(text: str, source: Source) -> Dialogue:
    """CPsyCounD text: speaker-prefixed turns separated by blank lines; an unprefixed line continues the
    previous turn and so does a second turn of the same speaker (paragraph breaks kept). Raises DataError."""
    parts: list[list] = []  # [role, [lines]]
    blank = False
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            blank = True
            continue
        m = SPEAKER_RE.match(s)
        if m and parts and parts[-1][0] == SPEAKERS[m.group(1)]:
            # The speaker prefix is a transcript's only turn boundary: a speaker who goes on after a
            # narration line (`（经过一段时间的催眠引导）`, 37 of 400 CPsyCounD files) is still one turn.
            parts[-1][1].append("\n" + s[m.end() :])
        elif m:
            parts.append([SPEAKERS[m.group(1)], [s[m.end() :]]])
        elif not parts:
            raise DataError(
                replace(source, line=lineno),
                f"text before the first speaker (来访者：/心理咨询师：): {_short(s)}",
                text,
            )
        else:
            parts[-1][1].append("\n" + s if blank else s)
        blank = False
    if not parts:
        raise DataError(source, "no speaker turns found (来访者：/心理咨询师：)", text)
    d = Dialogue([Turn(role, "\n".join(lines).strip()) for role, lines in parts], None, source)
    try:
        validate_dialogue(d)
    except DataError as e:
        e.raw = text
        raise
    return d


# ---------------------------------------------------------------------------------------------------------
# Files and folders


def _convert(rec: object, fmt: str, src: Source) -> Dialogue | DataError:
    try:
        return parse_record(rec, fmt, src)
    except DataError as e:
        return e


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def _sniff(path: Path) -> str:
    """Container of a file from its first bytes: array | object | empty | text | unknown."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        while head and not head.lstrip():
            head = f.read(1 << 16)
    head = head.removeprefix(BOM).lstrip()
    if not head:
        return "empty"
    c = head[:1]
    if c == b"[":
        return "array"
    if c == b"{":
        return "object"
    if SPEAKER_RE.match(head[:64].decode("utf-8", "ignore")):
        return "text"
    return "unknown"


def _iter_jsonl(path: Path, fmt: str) -> Iterator[Dialogue | DataError]:
    file = str(path)
    with open(path, "rb") as f:
        index = 0
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            src = Source(file, index=index, line=lineno)
            index += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataError(
                    src, f"line is not valid UTF-8 (byte {e.start})", raw.decode("utf-8", "replace")
                )
                continue
            try:
                rec = json.loads(text)
            except (ValueError, RecursionError) as e:
                yield DataError(src, f"invalid JSON: {_first_line(e)}", text.rstrip("\r\n"))
                continue
            yield _convert(rec, fmt, replace(src, id=record_id(rec)))


def _utterance_file_source(path: Path) -> Source:
    # CPsyCounE names files 1.json, 2.json inside a topic folder: the folder makes the id unique.
    return Source(
        str(path), index=0, line=1, id=f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    )


TOO_DEEP = object()


def _array_items(f) -> Iterator[object]:
    """The elements of a top-level JSON array, one at a time (memory: one element).

    Built from ijson's raw events rather than `ijson.items` because the latter keeps a prefix string per
    nesting level, so a hostile `[[[[...` 50k deep takes gigabytes; here an element nested deeper than
    MAX_DEPTH is skipped unbuilt and comes out as TOO_DEEP."""
    events = ijson.basic_parse(f, use_float=True)
    if next(events, (None, None))[0] != "start_array":
        raise ValueError("not a JSON array")
    depth, builder = 0, None
    for ev, val in events:
        if depth == 0:
            if ev == "end_array":
                for _ in events:  # let the parser report trailing garbage
                    pass
                return
            builder = ijson.ObjectBuilder()
        if ev in ("start_map", "start_array"):
            depth += 1
        elif ev in ("end_map", "end_array"):
            depth -= 1
        if builder is not None:
            builder.event(ev, val)
            if depth > MAX_DEPTH:
                builder = None
        if depth == 0:
            yield builder.value if builder is not None else TOO_DEEP


def _open_json(path: Path):
    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    if f.read(3) != BOM:
        f.seek(0)
    return f


def _iter_array(path: Path, fmt: str) -> Iterator[Dialogue | DataError]:
    file = str(path)
    index = 0
    with _open_json(path) as f:
        items = _array_items(f)
        try:
            for rec in items:
                if index == 0 and isinstance(rec, str) and fmt in ("auto", "cpsycoune"):
                    # An array of strings is one CPsyCounE dialogue, not a list of records.
                    utterances = [rec]
                    for u in items:
                        index += 1
                        utterances.append(u)
                    yield _convert(utterances, "cpsycoune", _utterance_file_source(path))
                    return
                if rec is TOO_DEEP:
                    yield DataError(Source(file, index=index), f"record nests deeper than {MAX_DEPTH} levels")
                else:
                    yield _convert(rec, fmt, Source(file, index=index, id=record_id(rec)))
                index += 1
        except Exception as e:  # ijson's C backend raises several types; any of them ends the file here
            yield DataError(
                Source(file, index=index),
                f"invalid JSON at array element {index}: {_first_line(e)}; the rest of the file is skipped",
            )


def _iter_object_or_jsonl(path: Path, fmt: str) -> Iterator[Dialogue | DataError]:
    """A file starting with `{`: JSONL when its first line is a JSON value on its own, else one
    (pretty-printed) JSON object; when that fails too, JSONL so each bad line is reported."""
    with open(path, "rb") as f:
        first = f.readline().removeprefix(BOM)
    try:
        json.loads(first)
        is_jsonl = True
    except (ValueError, RecursionError):
        is_jsonl = False
    if not is_jsonl and path.stat().st_size <= MAX_SINGLE_OBJECT_BYTES:
        try:
            rec = json.loads(path.read_bytes().removeprefix(BOM))
        except (ValueError, RecursionError):
            rec = None
        if rec is not None:
            yield _convert(rec, fmt, Source(str(path), index=0, line=1, id=record_id(rec)))
            return
    yield from _iter_jsonl(path, fmt)


def _iter_text(path: Path) -> Iterator[Dialogue | DataError]:
    src = Source(str(path), index=0, line=1, id=path.stem)
    data = path.read_bytes().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield DataError(src, f"not valid UTF-8 text (byte {e.start})")
        return
    try:
        yield parse_counseling_text(text, src)
    except DataError as e:
        yield e


def _iter_one_file(path: Path, fmt: str) -> Iterator[Dialogue | DataError]:
    if fmt == "cpsycound" or (fmt == "auto" and path.suffix.lower() == ".txt"):
        yield from _iter_text(path)
        return
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, fmt)
        return
    kind = _sniff(path)
    if kind == "array":
        yield from _iter_array(path, fmt)
    elif kind == "object":
        yield from _iter_object_or_jsonl(path, fmt)
    elif kind == "text" and fmt == "auto":
        yield from _iter_text(path)
    elif kind != "empty":
        yield DataError(Source(str(path)), "not a JSON array, JSONL or CPsyCoun text file")


def list_data_files(folder: str | os.PathLike) -> list[Path]:
    """Data files under `folder` (.json/.jsonl/.txt, recursively, sorted; hidden and hub metadata skipped)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name in METADATA_FILES or not name.lower().endswith(DATA_SUFFIXES):
                continue
            out.append(Path(root, name))
    return sorted(out, key=lambda p: p.relative_to(folder).parts)


def iter_file(path: str | os.PathLike, fmt: str = "auto") -> Iterator[Dialogue | DataError]:
    """Every record of a file or folder: a Dialogue for each good one, a DataError for each bad one.

    Never raises on data: a missing or unreadable file, an unknown `fmt` or a broken file is yielded as
    a single DataError for that file (records before the point of failure are still yielded)."""
    p = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        yield DataError(Source(str(p)), f"unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
        return
    try:
        files = list_data_files(p) if p.is_dir() else [p] if p.exists() else None
    except (OSError, ValueError) as e:  # permission denied, a NUL byte in the name, ...
        yield DataError(Source(str(p)), f"cannot read: {_first_line(e)}")
        return
    if files is None:
        yield DataError(Source(str(p)), "no such file or folder")
        return
    for f in files:
        n = 0
        try:
            for item in _iter_one_file(f, fmt):
                n += 1
                yield item
        except OSError as e:
            yield DataError(Source(str(f), index=n), f"cannot read file: {e.strerror or _first_line(e)}")
        except Exception as e:  # a reader bug must not kill a million-record run; report it like bad data
            yield DataError(
                Source(str(f), index=n), f"unexpected {type(e).__name__} while reading: {_first_line(e)}"
            )


def detect_format(path: str | os.PathLike) -> str:
    """The format of a file (from its first record), `mixed` for a folder of several formats, `empty` for
    an empty file, `unknown` when nothing matches. Never raises."""
    p = Path(path)
    try:
        if p.is_dir():
            kinds = {detect_format(f) for f in list_data_files(p)} - {"empty"}
            return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "empty")
        if p.suffix.lower() == ".txt":
            return "cpsycound"
        kind = "jsonl" if p.suffix.lower() == ".jsonl" else _sniff(p)
        if kind in ("text", "empty"):
            return "cpsycound" if kind == "text" else kind
        if kind == "array":
            with _open_json(p) as f:
                first = next(_array_items(f), None)
            return "cpsycoune" if isinstance(first, str) else detect_record(first) or "unknown"
        with open(p, "rb") as f:
            for i, line in enumerate(f):
                if i >= 20:
                    break
                try:
                    return detect_record(json.loads(line.removeprefix(BOM))) or "unknown"
                except (ValueError, RecursionError):
                    continue
        rec = (
            json.loads(p.read_bytes().removeprefix(BOM))
            if p.stat().st_size <= MAX_SINGLE_OBJECT_BYTES
            else None
        )
        return detect_record(rec) or "unknown"
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# Writing


def dialogue_record(d: Dialogue, fmt: str = "sharegpt") -> dict:
    """The JSON record for one dialogue, as `swift sft --dataset` and `iter_file` read it."""
    rec = d.to_sharegpt() if fmt == "sharegpt" else {"messages": d.to_messages()}
    return {"id": d.source.id, **rec} if d.source.id not in (None, "") else rec


def write_jsonl(dialogues: Iterable[Dialogue], path: str | os.PathLike, fmt: str = "sharegpt") -> int:
    """Write dialogues as ShareGPT or messages JSONL, atomically (a temp file renamed into place).
    Returns the number written. Raises DataError for a dialogue whose text is not valid Unicode."""
    if fmt not in ("sharegpt", "messages"):
        raise ValueError(f"write_jsonl: fmt must be sharegpt or messages, not {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for d in dialogues:
                line = json.dumps(dialogue_record(d, fmt), ensure_ascii=False)
                try:
                    f.write(line + "\n")
                except UnicodeEncodeError:
                    raise DataError(
                        d.source, "text contains an unpaired surrogate (invalid Unicode)"
                    ) from None
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
