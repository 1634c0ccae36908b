"""Evaluation sets: exam multiple choice, open QA and counseling dialogues, from the formats in
../shared/data/README.md, detected per file:

- multiple-choice JSONL  {"id", "question", "choices": [...], "answer": "B" | "B,C"}
- CPsyExam JSON arrays   {"subject_name", "question_type", "kind", "question", "options": {A..E}, "answer", "id"}
- PCEB theory / moral    {"id", "question", "options", "answer": "ACD"}; single or multiple from the folder
- PCEB case groups       {"general_info", "case_introduction", "questions_and_answers": [...]}: sub-questions
                         share the case text, `单选：`/`多选：` says the type; essay cases (no options) are open QA
- open QA JSONL          {"question", "answer", "key_points"?: [...]}
- dialogues              anything `mhsft.data.readers` reads (CPsyCounE arrays, ShareGPT, messages, ...)

A bad record becomes a DataError (counted and skipped, or fatal with strict) and never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.data.loader import parse_spec
from mhsft.data.readers import detect_record, parse_record
from mhsft.data.schema import DataError, Dialogue, Source
from mhsft.utils import UserError

LETTERS = "ABCDEFGHIJ"
CASE_TYPE_RE = re.compile(r"^\s*(单选|多选)\s*[：:]\s*")
# `（10 分）`, `(2分)`, `（0.5 分）`: the scoring marks of PCEB's essay answers.
POINTS_RE = re.compile(r"[（(]\s*(\d+(?:\.\d+)?)\s*分\s*[）)]")
# Numbering and punctuation trimmed from the ends of a key point: `1）`, `①`, `2.`, `（3）`, `、`, `；`.
KP_LEAD_RE = re.compile(r"^[\s\d.．。、,，;；:：)）(（①②③④⑤⑥⑦⑧⑨⑩]+")
KP_TAIL_RE = re.compile(r"[\s、,，;；:：。.]+$")


@dataclass
class MCQItem:
    id: str
    question: str  # full text the model sees (a case's text included)
    options: dict[str, str]  # letter -> text, in letter order, empty options dropped
    answer: str  # gold letters, sorted: "B" or "ACD"
    multi: bool  # a multiple-answer question (even when its gold has one letter)
    subject: str = ""
    kind: str = ""  # knowledge | case
    dataset: str = ""

    @property
    def qtype(self) -> str:
        return "multi" if self.multi else "single"


@dataclass
class QAItem:
    id: str
    question: str
    answer: str
    key_points: list[str] = field(default_factory=list)
    key_point_weights: list[float] = field(default_factory=list)  # marks (分) per key point when known
    dataset: str = ""


@dataclass
class DialogueItem:
    id: str
    dialogue: Dialogue
    dataset: str = ""


@dataclass
class EvalSet:
    name: str
    spec: str
    files: list[str]
    sha256: str
    mcq: list[MCQItem] = field(default_factory=list)
    qa: list[QAItem] = field(default_factory=list)
    dialogues: list[DialogueItem] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.mcq) + len(self.qa) + len(self.dialogues)


# ---------------------------------------------------------------------------------------------------------
# Records


def normalize_answer(raw: object, letters: str, src: Source) -> str:
    """ "B", "B,C", "A、C", "acd" -> sorted gold letters; DataError when empty or naming a missing option."""
    if not isinstance(raw, str):
        raise DataError(src, f'answer is {type(raw).__name__}, expected letters like "B" or "B,C"')
    text = raw.strip().upper()
    if not re.fullmatch(r"[A-J](?:[\s,，、;；/]*[A-J])*[\s,，、;；/]*", text):
        raise DataError(src, f'answer {raw!r} is not option letters (like "B" or "B,C")')
    gold = sorted(set(re.findall(r"[A-J]", text)))
    missing = [g for g in gold if g not in letters]
    if missing:
        raise DataError(
            src, f"answer {raw!r} names option {', '.join(missing)}, but the options are {', '.join(letters)}"
        )
    return "".join(gold)


def _options(raw: object, src: Source) -> dict[str, str]:
    if isinstance(raw, list):
        if len(raw) > len(LETTERS):
            raise DataError(src, f"{len(raw)} choices; at most {len(LETTERS)} (A-J) are supported")
        raw = dict(zip(LETTERS, raw))
    if not isinstance(raw, dict):
        raise DataError(src, f"options are {type(raw).__name__}, expected a list or an object of letters")
    opts = {}
    for k, v in raw.items():
        key = str(k).strip().upper()
        if key not in LETTERS:
            raise DataError(src, f"option key {k!r} is not a letter A-J")
        if v is None or (isinstance(v, str) and not v.strip()):
            continue  # CPsyExam's unused option E is ""
        opts[key] = str(v).strip()
    if len(opts) < 2:
        raise DataError(src, f"{len(opts)} non-empty option(s); a multiple-choice question needs at least 2")
    return dict(sorted(opts.items()))


def _text_field(rec: dict, key: str, src: Source) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(src, f"missing or empty {key!r}")
    return v.strip()


def mcq_from_record(rec: dict, src: Source, dataset: str, path_parts: tuple[str, ...] = ()) -> MCQItem:
    """A multiple-choice JSONL / CPsyExam / PCEB theory-moral record."""
    question = _text_field(rec, "question", src)
    options = _options(rec.get("choices", rec.get("options")), src)
    letters = "".join(options)
    answer = normalize_answer(rec.get("answer"), letters, src)
    qt = str(rec.get("question_type") or rec.get("type") or "").lower()
    if qt in ("multi", "multiple"):
        multi = True
    elif qt == "single":
        multi = False
    elif "multiple" in path_parts:
        multi = True
    elif "single" in path_parts:
        multi = False
    else:
        multi = len(answer) > 1
    if not multi and len(answer) > 1:
        raise DataError(src, f"single-answer question with answer {answer}")
    subject = str(rec.get("subject_name") or rec.get("subject") or "")
    kind = str(rec.get("kind") or "")
    kind = {"analyse": "case", "analysis": "case"}.get(kind, kind)
    if not subject and path_parts:  # PCEB: theory|moral / single|multiple / second|third / file
        cat = next((p for p in path_parts if p in ("theory", "moral")), "")
        level = next((p for p in path_parts if p in ("second", "third")), "")
        subject = "/".join(x for x in (cat, level) if x)
        kind = kind or ("knowledge" if cat else "")
    return MCQItem(str(rec.get("id", src.index)), question, options, answer, multi, subject, kind, dataset)


def case_items(rec: dict, src: Source, dataset: str, level: str) -> tuple[list[MCQItem], list[QAItem]]:
    """A PCEB case group: choice sub-questions become MCQ items, open ones QA items; all share the case."""
    info = str(rec.get("general_info") or "").strip()
    intro = str(rec.get("case_introduction") or "").strip()
    case = "\n".join(
        x for x in (f"一般资料：{info}" if info else "", f"案例介绍：{intro}" if intro else "") if x
    )
    qas = rec.get("questions_and_answers")
    if not isinstance(qas, list) or not qas:
        raise DataError(src, "case group has no questions_and_answers")
    gid = str(rec.get("id", src.index))
    mcq, qa = [], []
    for j, q in enumerate(qas, 1):
        sub = Source(src.file, src.index, src.line, f"{gid}-{j}")
        if not isinstance(q, dict):
            raise DataError(sub, f"question {j} is {type(q).__name__}, expected an object")
        text = _text_field(q, "question", sub)
        if q.get("options") is None:
            ref = _text_field(q, "answer", sub)
            kps, weights = key_points_from_marks(ref)
            qa.append(QAItem(f"{gid}-{j}", f"{case}\n\n问题：{text}", ref, kps, weights, dataset))
            continue
        m = CASE_TYPE_RE.match(text)
        item = mcq_from_record(
            {**q, "question": f"{case}\n\n问题：{text[m.end() :] if m else text}", "id": f"{gid}-{j}"},
            sub,
            dataset,
        )
        if m:
            item.multi = m.group(1) == "多选"
        item.subject, item.kind = f"cases/{level}" if level else "cases", "case"
        mcq.append(item)
    return mcq, qa


def key_points_from_marks(reference: str) -> tuple[list[str], list[float]]:
    """PCEB essay answers mark each scoring point with `（N分）`: the text before each mark (back to the
    previous mark) is one key point, N its weight. No marks: no key points."""
    kps, weights, start = [], [], 0
    for m in POINTS_RE.finditer(reference):
        seg = reference[start : m.start()]
        start = m.end()
        seg = seg.strip().splitlines()[-1] if seg.strip() else ""
        seg = KP_TAIL_RE.sub("", KP_LEAD_RE.sub("", seg))
        if seg:
            kps.append(seg)
            weights.append(float(m.group(1)))
    return kps, weights


def qa_from_record(rec: dict, src: Source, dataset: str) -> QAItem:
    question = _text_field(rec, "question", src)
    answer = _text_field(rec, "answer", src)
    kps = rec.get("key_points")
    if kps is None:
        kps, weights = key_points_from_marks(answer)
    else:
        if not isinstance(kps, list) or not all(isinstance(k, str) and k.strip() for k in kps):
            raise DataError(src, "key_points must be a list of non-empty strings")
        kps, weights = [k.strip() for k in kps], []
    return QAItem(str(rec.get("id", src.index)), question, answer, kps, weights, dataset)


def record_kind(rec: object) -> str:
    """mcq | case | qa | dialogue | unknown for one parsed JSON record."""
    if isinstance(rec, dict):
        if "questions_and_answers" in rec:
            return "case"
        if "choices" in rec or "options" in rec:
            return "mcq"
        if "question" in rec and "answer" in rec:
            return "qa"
    return "dialogue" if detect_record(rec) else "unknown"


# ---------------------------------------------------------------------------------------------------------
# Files


def _records(path: Path) -> list[tuple[object, Source]]:
    """(record, source) for every record of a .json (array, object) or .jsonl file. A CPsyCounE file (an array
    of utterance strings) is one record. Raises DataError for an unreadable file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or str(e))
        raise DataError(Source(str(path)), f"cannot read: {why}") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".jsonl" or (stripped.startswith("{") and "\n{" in stripped):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                src = Source(str(path), len(out), i)
                try:
                    out.append((json.loads(line), src))
                except json.JSONDecodeError as e:
                    out.append((DataError(src, f"not valid JSON: {e.msg} (column {e.colno})"), src))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(Source(str(path), line=e.lineno), f"not valid JSON: {e.msg}") from None
    if isinstance(data, list) and data and all(isinstance(u, str) for u in data):
        return [(data, Source(str(path), 0, 1, path.stem))]
    items = data if isinstance(data, list) else [data]
    return [(r, Source(str(path), i)) for i, r in enumerate(items)]


def _file_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root and root.is_dir() else Path(path.name)
    return str(rel.with_suffix("")).replace("\\", "/")


def read_file(path: Path, root: Path, dataset: str, out: EvalSet) -> None:
    """Add every record of one file to `out` (bad ones to out.errors)."""
    try:
        records = _records(path)
    except DataError as e:
        out.errors.append(e)
        return
    fid = _file_id(path, root)
    parts = tuple(p.lower() for p in path.relative_to(root).parts) if root.is_dir() else ()
    level = next((p for p in parts if p in ("second", "third")), "")
    for rec, src in records:
        if isinstance(rec, DataError):
            out.errors.append(rec)
            continue
        local = rec.get("id") if isinstance(rec, dict) else None
        src = Source(src.file, src.index, src.line, str(local) if local is not None else src.id)
        try:
            kind = record_kind(rec)
            if kind == "mcq":
                item = mcq_from_record(rec, src, dataset, parts)
                item.id = f"{fid}#{item.id}" if "id" not in rec or root.is_dir() else item.id
                out.mcq.append(item)
            elif kind == "case":
                mcq, qa = case_items(rec, src, dataset, level)
                for it in (*mcq, *qa):
                    it.id = f"{fid}#{it.id}"
                out.mcq += mcq
                out.qa += qa
            elif kind == "qa":
                item = qa_from_record(rec, src, dataset)
                item.id = f"{fid}#{item.id}" if "id" not in rec or root.is_dir() else item.id
                out.qa.append(item)
            elif kind == "dialogue":
                d = parse_record(rec, "auto", src)
                did = fid if isinstance(rec, list) else f"{fid}#{src.id if src.id is not None else src.index}"
                out.dialogues.append(DialogueItem(did, d, dataset))
            else:
                raise DataError(
                    src,
                    "unrecognized record: expected a multiple-choice question (question, options/choices, "
                    "answer), an open question (question, answer), a PCEB case or a dialogue",
                )
        except DataError as e:
            out.errors.append(e)


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".json", ".jsonl")),
        key=lambda p: p.relative_to(root).parts,
    )


def sha256_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def _sample(items: list, n: int | None, rng: random.Random) -> list:
    """A seeded random sample of at most n items, in their original order (never repeats an item)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in keep]


def load_eval_set(
    spec_text: str, name: str, limit: int | None = None, seed: int = 42
) -> tuple[EvalSet, EvalSet]:
    """(the evaluated set, the rest of the same files) for one `--eval_dataset` spec: `PATH` or `PATH#N`.
    `#N` (or `limit`, whichever is smaller) keeps a seeded random sample of N items of each kind; the items left
    out are the pool few-shot exemplars may come from. Raises UserError for a missing path."""
    spec = parse_spec(spec_text)
    if not spec.local:
        raise UserError(
            f"--eval_dataset {spec_text}: no such file or folder (evaluation sets are local paths)"
        )
    root = Path(spec.name)
    files = _files(root)
    if not files:
        raise UserError(f"--eval_dataset {spec_text}: no .json or .jsonl files in {root}")
    full = EvalSet(name, spec_text, [str(f) for f in files], sha256_files(files, root))
    for f in files:
        read_file(f, root, name, full)
    n = min(x for x in (spec.sample, limit) if x is not None) if (spec.sample or limit) else None
    rng = random.Random(seed)
    used = EvalSet(name, spec_text, full.files, full.sha256, errors=full.errors)
    used.mcq, used.qa, used.dialogues = (_sample(x, n, rng) for x in (full.mcq, full.qa, full.dialogues))
    rest = EvalSet(name, spec_text, full.files, full.sha256)
    for attr in ("mcq", "qa", "dialogues"):
        chosen = {id(x) for x in getattr(used, attr)}
        setattr(rest, attr, [x for x in getattr(full, attr) if id(x) not in chosen])
    return used, rest
