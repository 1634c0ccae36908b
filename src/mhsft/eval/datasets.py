"""Evaluation sets: exam multiple choice, open QA and counseling dialogues, from the formats in
../shared/data/README.md, detected per file:

- multiple-choice JSONL  {"id", "question", "choices": [...], "answer": "B" | "B,C"}
- CPsyExam JSON arrays   {"subject_name", "question_type", "kind", "question", "options": {A..E}, "answer", "id"}
- PCEB theory / moral    {"id", "question", "options", "answer": "ACD"}; single or multiple from the folder
- PCEB case groups       {"general_info", "case_introduction", "questions_and_answers": [...]}: sub-questions
                         share the case text, `单选：`/`多选：` says the type; essay cases (no options) are open QA
- CMMLU / C-Eval CSV      header `,Question,A,B,C,D,Answer` (CMMLU) or `id,question,A,B,C,D,answer[,explanation]`
                         (C-Eval); the subject is the file name without `_dev`/`_val`/`_test`. A row without an
                         answer (C-Eval's test split has none) is counted as unanswered and not scored.
- open QA JSONL          {"question", "answer", "key_points"?: [...]}
- PsyQA                  {"question", "description", "answers": [{"answer_text"}, ...], "questionID"}: open QA,
                         question + description asked, every answer a reference
- dialogues              anything `mhsft.data.readers` reads (CPsyCounE arrays, ShareGPT, messages, ...)

One rule for a question labelled single-answer whose gold has several letters (a CPsyExam `question_type`, a PCEB
`single/` folder or `单选：` prefix): it is scored as a multiple-answer question, and counted in the set's notices
(SINGLE_WITH_SEVERAL_LETTERS). A bad record becomes a DataError (counted and skipped, or fatal with strict) and
never a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.data.json_files import BOM, iter_json_records, not_utf8
from mhsft.data.loader import parse_spec
from mhsft.data.readers import detect_record, parse_record, psyqa_prompt
from mhsft.data.schema import DataError, Dialogue, Source
from mhsft.utils import UserError

LETTERS = "ABCDEFGHIJ"
CASE_TYPE_RE = re.compile(r"^\s*(单选|多选)\s*[：:]\s*")
# `（10 分）`, `(2分)`, `（0.5 分）`: the scoring marks of PCEB's essay answers.
POINTS_RE = re.compile(r"[（(]\s*(\d+(?:\.\d+)?)\s*分\s*[）)]")
# Numbering and punctuation trimmed from the ends of a key point: `1）`, `①`, `2.`, `（3）`, `、`, `；`.
KP_LEAD_RE = re.compile(r"^[\s\d.．。、,，;；:：)）(（①②③④⑤⑥⑦⑧⑨⑩]+")
KP_TAIL_RE = re.compile(r"[\s、,，;；:：。.]+$")
EVAL_SUFFIXES = (".json", ".jsonl", ".csv")
# A CSV file's split, after the subject in its name: `professional_psychology_test.csv`.
CSV_SPLIT_RE = re.compile(r"_(dev|val|validation|test|train)$", re.I)
# Notices: what reading decided about some items, counted per set, logged as `NAME: NOTICE: N`.
SINGLE_WITH_SEVERAL_LETTERS = (
    "questions labelled single-answer whose gold has several letters (scored as multiple-answer questions)"
)
UNANSWERED = "questions without an answer (C-Eval's test split publishes none; counted, not scored)"
PSYQA_BAD_ANSWERS = "PsyQA answers without text (not used as references)"


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
    note: str = ""  # a notice about how the item was read (SINGLE_WITH_SEVERAL_LETTERS), counted per set

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
    references: list[str] = field(default_factory=list)  # every reference answer (PsyQA); empty: [answer]

    @property
    def refs(self) -> list[str]:
        return self.references or [self.answer]


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
    notices: Counter = field(default_factory=Counter)  # how many items each notice concerns

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
    labelled = _labelled_multi(rec, path_parts)
    multi, note = labelled if labelled is not None else len(answer) > 1, ""
    if labelled is False and len(answer) > 1:  # the one rule for every reader: trust the gold, and say so
        multi, note = True, SINGLE_WITH_SEVERAL_LETTERS
    subject = str(rec.get("subject_name") or rec.get("subject") or "")
    kind = str(rec.get("kind") or "")
    kind = {"analyse": "case", "analysis": "case"}.get(kind, kind)
    if not subject and path_parts:  # PCEB: theory|moral / single|multiple / second|third / file
        cat = next((p for p in path_parts if p in ("theory", "moral")), "")
        level = next((p for p in path_parts if p in ("second", "third")), "")
        subject = "/".join(x for x in (cat, level) if x)
        kind = kind or ("knowledge" if cat else "")
    return MCQItem(
        str(rec.get("id", src.index)), question, options, answer, multi, subject, kind, dataset, note
    )


def _labelled_multi(rec: dict, path_parts: tuple[str, ...]) -> bool | None:
    """Whether the question is labelled multiple-answer (True), single-answer (False) or not at all (None): its
    `question_type`, else a `multiple/` or `single/` folder (PCEB)."""
    qt = str(rec.get("question_type") or rec.get("type") or "").lower()
    if qt in ("multi", "multiple"):
        return True
    if qt == "single":
        return False
    if "multiple" in path_parts:
        return True
    if "single" in path_parts:
        return False
    return None


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
        labelled = {"question_type": "multi" if m.group(1) == "多选" else "single"} if m else {}
        item = mcq_from_record(
            {
                **q,
                "question": f"{case}\n\n问题：{text[m.end() :] if m else text}",
                "id": f"{gid}-{j}",
                **labelled,
            },
            sub,
            dataset,
        )
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


def qa_from_record(rec: dict, src: Source, dataset: str) -> tuple[QAItem, int]:
    question = _text_field(rec, "question", src)
    answer = _text_field(rec, "answer", src)
    kps = rec.get("key_points")
    if kps is None:
        kps, weights = key_points_from_marks(answer)
    else:
        if not isinstance(kps, list) or not all(isinstance(k, str) and k.strip() for k in kps):
            raise DataError(src, "key_points must be a list of non-empty strings")
        kps, weights = [k.strip() for k in kps], []
    return QAItem(str(rec.get("id", src.index)), question, answer, kps, weights, dataset), 0


def psyqa_item(rec: dict, src: Source, dataset: str) -> tuple[QAItem, int]:
    """A PsyQA question as open QA: asked as question + description (what training's user turn is), every answer
    a reference. Returns the item and how many answers had no text (not used)."""
    question = psyqa_prompt(rec, src)
    answers = rec.get("answers")
    if not isinstance(answers, list):
        raise DataError(src, f"'answers' is {type(answers).__name__}, expected a list of {{answer_text}}")
    refs = [
        a["answer_text"].strip()
        for a in answers
        if isinstance(a, dict) and isinstance(a.get("answer_text"), str)
    ]
    refs = [r for r in refs if r]
    if not refs:
        raise DataError(src, "no answer with text: nothing to compare with")
    qid = rec.get("questionID", rec.get("id", src.index))
    return QAItem(str(qid), question, refs[0], dataset=dataset, references=refs), len(answers) - len(refs)


def record_kind(rec: object) -> str:
    """mcq | case | psyqa | qa | dialogue | unknown for one parsed JSON record."""
    if isinstance(rec, dict):
        if "questions_and_answers" in rec:
            return "case"
        if "choices" in rec or "options" in rec:
            return "mcq"
        if "question" in rec and "answers" in rec:
            return "psyqa"
        if "question" in rec and "answer" in rec:
            return "qa"
    return "dialogue" if detect_record(rec) else "unknown"


# ---------------------------------------------------------------------------------------------------------
# Files


def _records(path: Path):
    """(record, source) or DataError for every record of a .json / .jsonl file (the training readers' containers:
    one bad element or line costs only itself) or a CMMLU / C-Eval .csv file."""
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path)
    else:
        yield from iter_json_records(path, strings_as_one=True)


def _csv_columns(header: list[str], src: Source) -> dict[str, int]:
    """Column name -> index: `id` (CMMLU's unnamed first column too), `question`, option letters, `answer`,
    `explanation`. DataError when there is no question column or fewer than two options."""
    cols: dict[str, int] = {}
    for i, name in enumerate(header):
        key = name.strip().lower()
        key = {"": "id", "unnamed: 0": "id"}.get(key, key)
        key = key.upper() if len(key) == 1 and key.upper() in LETTERS else key
        cols.setdefault(key, i)
    if "question" not in cols or sum(k in cols for k in LETTERS) < 2:
        raise DataError(
            src,
            f"not a CMMLU / C-Eval CSV: the header {','.join(header)[:80]!r} needs question, A, B, ... columns",
        )
    return cols


def _csv_records(path: Path):
    """CMMLU (`,Question,A,B,C,D,Answer`) and C-Eval (`id,question,A,B,C,D,answer[,explanation]`) rows as
    multiple-choice records; the subject is the file name without its split. A row without an answer keeps
    `answer` None (C-Eval's test split)."""
    file = str(path)
    data = path.read_bytes().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield DataError(Source(file), not_utf8(data, e))
        return
    subject = CSV_SPLIT_RE.sub("", path.stem)
    # newline="" as the csv docs ask: a quoted field keeps its line breaks, and U+2028 or \x85 break no row
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        cols = _csv_columns(header, Source(file, line=1))
        index, line = 0, reader.line_num + 1
        for row in reader:
            src, line = Source(file, index=index, line=line), reader.line_num + 1
            if not any(x.strip() for x in row):
                continue
            index += 1
            if len(row) != len(header):
                yield DataError(src, f"{len(row)} fields, the header has {len(header)}", row)
                continue
            rec = {k: row[i].strip() for k, i in cols.items() if k != "explanation"}
            opts = {k: rec.pop(k) for k in LETTERS if k in rec}
            rec = {**rec, "options": opts, "subject": subject, "answer": rec.get("answer") or None}
            yield rec, Source(file, src.index, src.line, rec.get("id") or None)
    except DataError as e:
        yield e
    except csv.Error as e:  # a NUL byte, a quote left open to the end of the file
        yield DataError(Source(file, line=reader.line_num), f"not valid CSV: {e}")


def _file_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root and root.is_dir() else Path(path.name)
    return str(rel.with_suffix("")).replace("\\", "/")


def read_file(path: Path, root: Path, dataset: str, out: EvalSet) -> None:
    """Add every record of one file to `out` (bad ones to out.errors, notices counted in out.notices)."""
    fid = _file_id(path, root)
    parts = tuple(p.lower() for p in path.relative_to(root).parts) if root.is_dir() else ()
    level = next((p for p in parts if p in ("second", "third")), "")
    try:
        for item in _records(path):
            if isinstance(item, DataError):
                out.errors.append(item)
                continue
            rec, src = item
            local = rec.get("id") if isinstance(rec, dict) else None
            src = Source(src.file, src.index, src.line, str(local) if local is not None else src.id)
            try:
                _add_record(rec, src, (fid, root.is_dir(), parts, level), dataset, out)
            except DataError as e:
                out.errors.append(e)
    except OSError as e:
        out.errors.append(DataError(Source(str(path)), f"cannot read: {e.strerror or e}"))


def _add_record(rec: object, src: Source, where: tuple, dataset: str, out: EvalSet) -> None:
    fid, in_folder, parts, level = where
    kind = record_kind(rec)
    if kind == "mcq" and (rec.get("answer") is None or rec.get("answer") == ""):
        out.notices[UNANSWERED] += 1  # C-Eval's test split; never scored, never silently dropped
    elif kind == "mcq":
        item = mcq_from_record(rec, src, dataset, parts)
        item.id = f"{fid}#{item.id}" if "id" not in rec or in_folder else item.id
        out.notices.update([item.note] if item.note else [])
        out.mcq.append(item)
    elif kind == "case":
        mcq, qa = case_items(rec, src, dataset, level)
        for it in (*mcq, *qa):
            it.id = f"{fid}#{it.id}"
        out.notices.update(m.note for m in mcq if m.note)
        out.mcq += mcq
        out.qa += qa
    elif kind in ("qa", "psyqa"):
        item, unused = qa_from_record(rec, src, dataset) if kind == "qa" else psyqa_item(rec, src, dataset)
        has_id = "id" in rec or "questionID" in rec
        item.id = f"{fid}#{item.id}" if not has_id or in_folder else item.id
        if unused:
            out.notices[PSYQA_BAD_ANSWERS] += unused
        out.qa.append(item)
    elif kind == "dialogue":
        d = parse_record(rec, "auto", src)
        did = fid if isinstance(rec, list) else f"{fid}#{src.id if src.id is not None else src.index}"
        out.dialogues.append(DialogueItem(did, d, dataset))
    else:
        raise DataError(
            src,
            "unrecognized record: expected a multiple-choice question (question, options/choices, "
            "answer), an open question (question, answer), a PsyQA question (question, answers), a PCEB "
            "case or a dialogue",
        )


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EVAL_SUFFIXES),
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
        raise UserError(f"--eval_dataset {spec_text}: no .json, .jsonl or .csv files in {root}")
    full = EvalSet(name, spec_text, [str(f) for f in files], sha256_files(files, root))
    for f in files:
        read_file(f, root, name, full)
    n = min(x for x in (spec.sample, limit) if x is not None) if (spec.sample or limit) else None
    rng = random.Random(seed)
    used = EvalSet(name, spec_text, full.files, full.sha256, errors=full.errors, notices=full.notices)
    used.mcq, used.qa, used.dialogues = (_sample(x, n, rng) for x in (full.mcq, full.qa, full.dialogues))
    rest = EvalSet(name, spec_text, full.files, full.sha256)
    for attr in ("mcq", "qa", "dialogues"):
        chosen = {id(x) for x in getattr(used, attr)}
        setattr(rest, attr, [x for x in getattr(full, attr) if id(x) not in chosen])
    return used, rest
