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
- `psyqa`     {"question", "description", "keywords", "answers": [{"answer_text", ...}], "questionID"}: one
              dialogue per answer (user = question + description, assistant = the answer), ids `QID-K`

Containers: JSON array files (streamed element by element, see json_array.py: memory stays bounded on
million-record files and a broken element costs only that element), JSONL (read as bytes line by line, so
one bad line costs only that line; CR-only line endings too), a single JSON object, text files, and folders
(recursed in sorted order, each file detected on its own). Input is UTF-8 (a BOM is allowed); a file in
UTF-16/32, GBK/GB18030 or Latin-1 is rejected with the `iconv` line that converts it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from mhsft.data.json_files import (
    BOM,
    error_line,
    head_text,
    iter_json_records,
    not_utf8,
    record_id,  # noqa: F401 - part of this module's interface (serve/infer.py)
    sniff,
    wide_encoding_problem,
)
from mhsft.data.schema import DataError, Dialogue, Source, Turn, validate_dialogue

FORMATS = ("sharegpt", "messages", "alpaca", "emollm", "cpsycound", "cpsycoune", "psyqa")
DATA_SUFFIXES = (".json", ".jsonl", ".txt")
# Metadata that hub snapshots and `datasets.save_to_disk` put next to the data; never dialogues.
METADATA_FILES = {
    "dataset_infos.json",
    "dataset_info.json",
    "dataset_dict.json",
    "state.json",
    "configuration.json",
}

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
# The counted notice for a CPsyCounD transcript that ends in a bare speaker prefix (`来访者：`): the empty turn
# is dropped, the dialogue kept.
EMPTY_LAST_TURN = "an empty last turn (a bare speaker prefix at the end of the transcript) was dropped"


# ---------------------------------------------------------------------------------------------------------
# One record -> Dialogue


def _short(v: object, n: int = 40) -> str:
    try:
        s = repr(v)
    except RecursionError:  # hostile input nests lists thousands deep
        s = f"<deeply nested {type(v).__name__}>"
    return s if len(s) <= n else s[: n - 3] + "..."


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


def psyqa_prompt(rec: dict, src: Source) -> str:
    """A PsyQA question as its asker put it: the question, then the description when there is one (the user turn
    in training, the prompt in evaluation). Raises DataError."""
    question = _text(rec.get("question"), src, "question").strip()
    if not question:
        raise DataError(src, "question: empty text")
    description = _text(_or_empty(rec.get("description")), src, "description").strip()
    return f"{question}\n{description}" if description else question


def _psyqa(rec: dict, src: Source) -> list[Dialogue | DataError]:
    """PsyQA: one dialogue per answer (user = question + description, assistant = the answer), ids `QID-K`. Each
    answer is its own record for counting: a bad answer is rejected alone. The labels (strategy spans) are not
    used for training."""
    user = psyqa_prompt(rec, src)
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers:
        raise DataError(
            src, f"'answers' is {_short(answers, 20)}, expected a non-empty list of {{answer_text}}"
        )
    qid = src.id if src.id is not None else f"#{src.index}"
    head = {k: v for k, v in rec.items() if k != "answers"}
    out: list[Dialogue | DataError] = []
    for k, a in enumerate(answers, 1):
        asrc = replace(src, id=f"{qid}-{k}")
        try:
            if not isinstance(a, dict):
                raise DataError(
                    asrc, f"answer {k} is {type(a).__name__}, expected an object with answer_text"
                )
            reply = _text(a.get("answer_text"), asrc, f"answer {k}")
            d = Dialogue([Turn("user", user), Turn("assistant", reply)], None, asrc)
            validate_dialogue(d)
            out.append(d)
        except DataError as e:
            e.raw = {**head, "answers": [a]}
            out.append(e)
    return out


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
    if "answers" in rec and "question" in rec:
        return "psyqa"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    return None


def parse_records(rec: object, fmt: str = "auto", source: Source | None = None) -> list[Dialogue | DataError]:
    """One parsed JSON record -> its validated dialogues (one; PsyQA: one per answer), a DataError (with
    `.raw = rec`) for each bad one. Never raises on data."""
    src = source or Source("<memory>")
    try:
        kind = detect_record(rec) if fmt == "auto" else fmt
        if kind == "psyqa":
            if not isinstance(rec, dict):
                raise DataError(src, f"record is a JSON {type(rec).__name__}, expected an object (psyqa)")
            return _psyqa(rec, src)
        return [parse_record(rec, kind or "auto", src)]
    except DataError as e:
        e.raw = rec if e.raw is None else e.raw
        return [e]


def parse_record(rec: object, fmt: str = "auto", source: Source | None = None) -> Dialogue:
    """One parsed JSON record -> validated Dialogue. Raises DataError (with `.raw = rec`) when it is bad.
    A PsyQA record holds several dialogues: read it with parse_records."""
    src = source or Source("<memory>")
    try:
        kind = detect_record(rec) if fmt == "auto" else fmt
        if kind is None:
            keys = ", ".join(_short(k, 20) for k in list(rec)[:8]) if isinstance(rec, dict) else ""
            got = f"an object with keys {keys}" if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
            raise DataError(
                src,
                f"unrecognized record ({got}); expected conversations (ShareGPT), messages, "
                "instruction/output (Alpaca), conversation (EmoLLM) or question/answers (PsyQA)",
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
    previous turn and so does a second turn of the same speaker (paragraph breaks kept). A bare speaker prefix
    at the very end (`来访者：`, an unfinished transcript) is dropped with the notice EMPTY_LAST_TURN in
    `Dialogue.notes`; an empty turn anywhere else is an error. Raises DataError."""
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
    turns = [Turn(role, "\n".join(lines).strip()) for role, lines in parts]
    notes = []
    if len(turns) > 1 and not turns[-1].content:
        turns.pop()
        notes.append(EMPTY_LAST_TURN)
    if not turns:
        raise DataError(source, "no speaker turns found (来访者：/心理咨询师：)", text)
    d = Dialogue(turns, None, source, notes)
    try:
        validate_dialogue(d)
    except DataError as e:
        e.raw = text
        raise
    return d


# ---------------------------------------------------------------------------------------------------------
# Files and folders


def _iter_text(path: Path) -> Iterator[Dialogue | DataError]:
    src = Source(str(path), index=0, line=1, id=path.stem)
    data = path.read_bytes().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield DataError(src, not_utf8(data, e))
        return
    try:
        yield parse_counseling_text(text, src)
    except DataError as e:
        yield e


def _iter_one_file(path: Path, fmt: str) -> Iterator[Dialogue | DataError]:
    if problem := wide_encoding_problem(path):
        yield DataError(Source(str(path)), problem)
        return
    if fmt == "cpsycound" or (fmt == "auto" and path.suffix.lower() == ".txt"):
        yield from _iter_text(path)
        return
    if path.suffix.lower() != ".jsonl" and sniff(path) == "other":
        if fmt == "auto" and SPEAKER_RE.match(head_text(path)):
            yield from _iter_text(path)
        else:
            yield DataError(Source(str(path)), "not a JSON array, JSONL or CPsyCoun text file")
        return
    for item in iter_json_records(path, strings_as_one=fmt in ("auto", "cpsycoune")):
        if isinstance(item, DataError):
            yield item
        else:
            yield from parse_records(item[0], fmt, item[1])


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
        yield DataError(Source(str(p)), f"cannot read: {error_line(e)}")
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
            yield DataError(Source(str(f), index=n), f"cannot read file: {e.strerror or error_line(e)}")
        except Exception as e:  # a reader bug must not kill a million-record run; report it like bad data
            yield DataError(
                Source(str(f), index=n), f"unexpected {type(e).__name__} while reading: {error_line(e)}"
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
        kind = "jsonl" if p.suffix.lower() == ".jsonl" else sniff(p)
        if kind == "empty":
            return kind
        if kind == "other":
            return "cpsycound" if SPEAKER_RE.match(head_text(p)) else "unknown"
        for i, item in enumerate(iter_json_records(p)):
            if not isinstance(item, DataError):
                return detect_record(item[0]) or "unknown"
            if i >= 20 or kind == "array":
                break
        return "unknown"
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
