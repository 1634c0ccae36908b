"""Cleaning of dialogues before training: normalize text, merge same-role turns, redact personal data,
drop exact duplicates and report near-duplicates.

Everything here works on `schema.Dialogue`; a dialogue that cleaning makes untrainable (a turn that was
only whitespace or control characters, a dialogue starting with the counselor, ...) goes to
`CleanResult.rejects` as a `DataError` with its reason and is never dropped silently.

Personal data (PII) is redacted with regular expressions plus checksums, aimed at Chinese counseling text:

- mobile numbers `1[3-9]` + 9 digits, with optional +86 / 0086 / 86 prefix and `-` or space separators;
- resident ID numbers: 18 digits with a valid GB 11643 check digit and a real birth date, and the old
  15-digit form with a real birth date (it has no check digit);
- bank cards: 16-19 digits passing the Luhn check, or starting with 62 (UnionPay: some older UnionPay
  cards do not use Luhn);
- landlines with an area code (`010-82951332`, `(0755)2562 9459`), and 7-8 digit local numbers after
  a keyword (`电话是 62751234`);
- emails, IPv4 addresses, passport numbers (E/G + 8 digits, E + letter + 7 digits, or any id after 护照),
  license plates (`京A·12345`), and QQ / WeChat ids, these only after a keyword (QQ号, 扣扣, 微信, vx, wx)
  because a bare 5-12 digit number or a word is not recognizably either.

Not redacted, on purpose:
- names (`我叫…`): regular expressions cannot tell `我叫小王` from `我叫不出来` / `我叫他走`, and the false
  positives would damage exactly the client's words the model must learn from; counseling corpora are
  normally pseudonymized upstream;
- URLs: counselors cite public resources; personal data inside a URL is still caught by the patterns above;
- public numbers: crisis hotlines and emergency numbers (`HOTLINES`), and 400/800 service numbers (they do not
  match the landline pattern), because counselors hand them out and the model should learn to.

Matching is done on a copy of the text with full-width ASCII (`１３８`, `＠`, `－`) mapped to ASCII, one char
for one char, so full-width numbers are caught while the rest of the text (，。！) is left untouched. Lookarounds
check digit / letter neighbours explicitly instead of `\\b`, which treats CJK characters as word characters.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from mhsft.data.schema import DataError, Dialogue, Source, Turn, validate_dialogue
from mhsft.utils import UserError

# ----------------------------------------------------------------------------------------------- text

# C0 and C1 controls except \t \n \r (\r becomes \n below), DEL, zero-width and bidi-override characters,
# the BOM and the word joiner. ZWJ is handled separately: it is meaningful inside emoji sequences.
_CONTROL = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]"
)
_EMOJI = r"\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F"
_ZWJ = re.compile(rf"(?<![{_EMOJI}])\u200d|\u200d(?![{_EMOJI}])")
_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+(?=\n)")
_MANY_BLANK_LINES = re.compile(r"\n{4,}")


def _normalize(s: str) -> tuple[str, int, int]:
    """`normalize_text` plus (control chars removed, whitespace chars removed)."""
    t = _ZWJ.sub("", _CONTROL.sub("", s))
    n_control = len(s) - len(t)
    u = _NEWLINES.sub("\n", t)
    u = _TRAILING_SPACE.sub("", u)
    u = _MANY_BLANK_LINES.sub("\n\n\n", u).strip()
    return u, n_control, len(t) - len(u)


def normalize_text(s: str) -> str:
    """Strip the ends, remove control and zero-width characters, turn \\r\\n / \\r into \\n, drop trailing
    spaces on each line and collapse 3+ blank lines to 2. Not NFKC: that would turn ，。！ into ASCII."""
    return _normalize(s)[0]


def merge_same_role(dialogue: Dialogue) -> Dialogue:
    """A copy of `dialogue` with consecutive turns of the same role joined by a newline."""
    turns: list[Turn] = []
    for t in dialogue.turns:
        if turns and turns[-1].role == t.role:
            turns[-1] = Turn(t.role, turns[-1].content + "\n" + t.content)
        else:
            turns.append(Turn(t.role, t.content))
    return Dialogue(turns=turns, system=dialogue.system, source=dialogue.source)


# ------------------------------------------------------------------------------------------------ PII

PLACEHOLDERS = {
    "email": "[邮箱]",
    "qq": "[QQ号]",
    "wechat": "[微信号]",
    "passport": "[护照号]",
    "id_card": "[身份证号]",
    "bank_card": "[银行卡号]",
    "mobile": "[手机号]",
    "landline": "[电话]",
    "ip": "[IP]",
    "license_plate": "[车牌号]",
}

# Public numbers counselors give out; compared digits-only. 110/120/119/12356... are too short to match any
# pattern, they are listed so that callers extending the set see what is already kept.
HOTLINES = frozenset(
    {
        "4001619995",  # 希望24热线
        "01082951332",  # 北京心理危机研究与干预中心
        "82951332",
        "8008101117",  # 北京心理危机研究与干预中心 (free line)
        "12356",  # 全国心理援助热线
        "12355",  # 青少年服务台
        "12320",  # 卫生热线
        "12338",  # 妇女维权热线
        "12345",
        "110",
        "120",
        "119",
    }
)

# Full-width ASCII -> ASCII and the ideographic space -> space, one char for one char so match positions in
# the probe are positions in the original text.
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}

_NOT_DIGIT_BEFORE = r"(?<![0-9])(?<![0-9][.])"  # not inside a number or a decimal fraction
_NOT_DIGIT_AFTER = r"(?![0-9])"
# After a keyword: optional 号/号码/账号, then optional 是/为/:/=, spaces anywhere.
_KEY_GLUE = r"\s*(?:号码|账号|号|ID|id)?\s*(?:[:=]|是|为)?\s*"


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        n = int(c)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _date_ok(y: int, m: int, d: int) -> bool:
    if not 1900 <= y <= datetime.date.today().year:
        return False
    try:
        datetime.date(y, m, d)
    except ValueError:
        return False
    return True


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def id_number_ok(s: str) -> bool:
    """Whether `s` (18 chars, or 15 digits for the pre-2004 form; separators ignored) is a plausible
    resident ID number: region code starting 1-8, a real birth date, and for 18 chars the GB 11643 check
    digit. A random 18-digit number passes with probability well under 1 in 10,000."""
    s = re.sub(r"[- ]", "", s).upper()
    if re.fullmatch(r"[0-9]{17}[0-9X]", s):
        if _ID_CHECK[sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS, strict=True)) % 11] != s[17]:
            return False
        y, m, d = int(s[6:10]), int(s[10:12]), int(s[12:14])
    elif re.fullmatch(r"[0-9]{15}", s):
        y, m, d = 1900 + int(s[6:8]), int(s[8:10]), int(s[10:12])
    else:
        return False
    return s[0] in "12345678" and _date_ok(y, m, d)


def _bank_card_ok(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return 16 <= len(digits) <= 19 and (_luhn_ok(digits) or digits.startswith("62"))


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


_PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
_PLATE_LETTER = "[A-HJ-NP-Z]"  # plates never use I or O

# (kind, pattern, validator, needs a digit). The part replaced is group "pii" when the pattern has one (the
# keyword before it stays), else the whole match. Order matters: emails first (they may hold a phone number),
# keyword-introduced ids before bare numbers, IDs before bank cards (an 18-digit ID may also pass Luhn).
_PATTERNS: list[tuple[str, re.Pattern, Callable[[str], bool] | None, bool]] = [
    (
        "email",
        re.compile(
            r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
        ),
        None,
        False,
    ),
    (
        "qq",
        re.compile(
            rf"(?<![A-Za-z])(?i:qq|扣扣|企鹅){_KEY_GLUE}(?P<pii>[1-9][0-9]{{4,11}}){_NOT_DIGIT_AFTER}"
        ),
        None,
        True,
    ),
    (
        "wechat",
        re.compile(
            rf"(?<![A-Za-z])(?:(?i:wechat|weixin|vx|wx|v信)|微信|威信|薇信){_KEY_GLUE}"
            r"(?P<pii>[A-Za-z][-_A-Za-z0-9]{5,19})(?![-_A-Za-z0-9])"
        ),
        None,
        False,
    ),
    ("passport", re.compile(rf"护照{_KEY_GLUE}(?P<pii>[A-Za-z0-9]{{7,9}})(?![A-Za-z0-9])"), _has_digit, True),
    (
        "id_card",
        re.compile(
            rf"{_NOT_DIGIT_BEFORE}(?:[0-9]{{6}}[- ]?[0-9]{{8}}[- ]?[0-9]{{3}}[0-9Xx]|[0-9]{{15}})(?![0-9Xx])"
        ),
        id_number_ok,
        True,
    ),
    (
        "bank_card",
        re.compile(
            rf"{_NOT_DIGIT_BEFORE}(?:[0-9]{{16,19}}|[0-9]{{4}}(?:[- ][0-9]{{4}}){{3}}(?:[- ]?[0-9]{{1,3}})?){_NOT_DIGIT_AFTER}"
        ),
        _bank_card_ok,
        True,
    ),
    (
        "mobile",
        re.compile(
            rf"{_NOT_DIGIT_BEFORE}(?:(?:\+|00)?86[- ]?|\((?:\+|00)?86\)[- ]?)?"
            rf"1[3-9][0-9][- ]?[0-9]{{4}}[- ]?[0-9]{{4}}{_NOT_DIGIT_AFTER}"
        ),
        None,
        True,
    ),
    (
        "landline",
        re.compile(
            rf"{_NOT_DIGIT_BEFORE}(?:\(0[1-9][0-9]{{1,2}}\)[- ]?|0[1-9][0-9]{{1,2}}[- ])[2-9][0-9]{{2,3}}[- ]?[0-9]{{4}}{_NOT_DIGIT_AFTER}"
        ),
        None,
        True,
    ),
    (
        "landline",
        re.compile(rf"(?:电话|座机|固话){_KEY_GLUE}(?P<pii>[2-9][0-9]{{6,7}}){_NOT_DIGIT_AFTER}"),
        None,
        True,
    ),
    (
        "ip",
        re.compile(
            r"(?<![0-9.])(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?!\.?[0-9])"
        ),
        None,
        True,
    ),
    (
        "passport",
        re.compile(rf"(?<![A-Za-z0-9])(?:[EG][0-9]{{8}}|E{_PLATE_LETTER}[0-9]{{7}})(?![A-Za-z0-9])"),
        None,
        True,
    ),
    (
        "license_plate",
        re.compile(
            rf"[{_PROVINCES}]{_PLATE_LETTER}[·• ]?(?=[A-Z0-9]{{0,5}}[0-9])[A-HJ-NP-Z0-9]{{5,6}}(?![A-Za-z0-9])"
        ),
        None,
        True,
    ),
]


def _redact_once(text: str, keep: Collection[str], counts: Counter) -> str:
    probe = text.translate(_FULLWIDTH)
    has_digit = any(c.isdigit() for c in probe)
    for kind, pattern, ok, needs_digit in _PATTERNS:
        if needs_digit and not has_digit:
            continue
        pieces: list[str] = []
        last = 0
        for m in pattern.finditer(probe):
            start, end = m.span("pii") if "pii" in pattern.groupindex else m.span()
            value = probe[start:end]
            if ok is not None and not ok(value):
                continue
            if kind in ("mobile", "landline") and re.sub(r"[^0-9]", "", value) in keep:
                continue
            pieces += [text[last:start], PLACEHOLDERS[kind]]
            last = end
            counts[kind] += 1
        if pieces:
            text = "".join(pieces) + text[last:]
            probe = text.translate(_FULLWIDTH)
    return text


def redact(text: str, keep: Collection[str] = HOTLINES) -> tuple[str, Counter]:
    """Replace personal data in `text` by placeholders such as `[手机号]`; return the new text and the count
    of replacements by kind (keys of `PLACEHOLDERS`). Numbers whose digits are in `keep` stay."""
    counts: Counter = Counter()
    # A replacement changes its neighbours' context (`<ID>13812345678` only shows an ID once the mobile
    # number next to it is gone), so repeat until nothing changes: redact(redact(x)) == redact(x).
    # Each round that changes anything removes digits or letters and adds none that can match, so few rounds.
    for _ in range(8):
        n = sum(counts.values())
        text = _redact_once(text, keep, counts)
        if sum(counts.values()) == n:
            break
    return text, counts


# -------------------------------------------------------------------------------------- near-duplicates


class NearDuplicate(NamedTuple):
    kept: Source  # the first dialogue of its group, the one others are compared to
    other: Source
    similarity: float  # estimated Jaccard similarity of character 5-gram sets


_SHINGLE = 5
_NUM_PERM = 128
_WS = re.compile(r"\s+")


def shingle_hashes(text: str) -> list[int]:
    """32-bit hashes of the character 5-grams of `text` (whitespace removed).

    Hashed here with a vectorized polynomial hash rather than datasketch's per-item sha1, which would
    dominate the run time at 100k dialogues; datasketch's affine32 scheme re-mixes the values anyway."""
    cps = np.frombuffer(_WS.sub("", text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cps) < _SHINGLE:
        cps = np.concatenate([cps, np.zeros(_SHINGLE - len(cps), dtype=np.uint64)])
    n = len(cps) - _SHINGLE + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(_SHINGLE):
        h = h * np.uint64(0x9E3779B97F4A7C15) + cps[j : j + n]  # wraps mod 2^64, as intended
    return (h >> np.uint64(32)).tolist()


def find_near_duplicates(
    dialogues: Sequence[Dialogue], threshold: float = 0.8, num_perm: int = _NUM_PERM
) -> list[NearDuplicate]:
    """Pairs (kept, other, similarity) of dialogues whose turn texts (system prompt excluded: datasets often
    share one) have an estimated Jaccard similarity >= `threshold` over character 5-grams, via MinHash LSH.

    Each dialogue is reported at most once, against the most similar earlier dialogue that is not itself a
    near-duplicate. Comparing only against those group heads keeps large groups of templated dialogues from
    turning into a quadratic number of pairs."""
    from datasketch import MinHash, MinHashLSH  # slow import (scipy), only needed here

    # Banding tuned for recall (lower LSH threshold, false negatives weighted high): a spurious candidate costs
    # one vectorized comparison below, a missed one loses a report. Recall is ~95% at J=0.8, ~99% at 0.85.
    lsh = MinHashLSH(threshold=max(threshold - 0.1, 0.05), num_perm=num_perm, weights=(0.3, 0.7))
    mh = MinHash(num_perm=num_perm, hashfunc=int)
    heads: list[tuple[Source, np.ndarray]] = []
    found: list[NearDuplicate] = []
    for d in dialogues:
        mh.clear()
        mh.update_batch(shingle_hashes("\n".join(t.content for t in d.turns)))
        best, best_sim = -1, 0.0
        for key in lsh.query(mh):
            sim = float(np.mean(heads[key][1] == mh.hashvalues))
            if sim > best_sim:
                best, best_sim = key, sim
        if best >= 0 and best_sim >= threshold:
            found.append(NearDuplicate(heads[best][0], d.source, round(best_sim, 4)))
        else:
            lsh.insert(len(heads), mh, check_duplication=False)
            heads.append((d.source, mh.hashvalues.copy()))
    return found


# --------------------------------------------------------------------------------------------- driver


@dataclass
class CleanStats:
    input: int = 0
    output: int = 0
    rejected: int = 0
    exact_duplicates: int = 0  # dropped
    near_duplicates: int = 0  # reported, kept
    turns_merged: int = 0  # turns folded into the previous turn of the same role
    control_chars_removed: int = 0
    whitespace_chars_removed: int = 0
    pii: Counter = field(default_factory=Counter)  # replacements by kind

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "pii"}
        d["pii"] = dict(sorted(self.pii.items()))
        d["pii_total"] = sum(self.pii.values())
        return d


@dataclass
class CleanResult:
    dialogues: list[Dialogue]
    stats: CleanStats
    rejects: list[DataError]
    near_duplicates: list[NearDuplicate]
    duplicates: list[tuple[Source, Source]]  # (kept, dropped) exact duplicates


def clean_dialogue(
    d: Dialogue, *, redact_pii: bool = True, keep: Collection[str] = HOTLINES, stats: CleanStats | None = None
) -> Dialogue:
    """The cleaned copy of one dialogue (same source); raises DataError if it is not trainable afterwards.
    Adds to `stats` when given (everything but input/output/duplicate counts)."""
    stats = stats if stats is not None else CleanStats()
    texts = [("system prompt", d.system)] if d.system is not None else []
    texts += [(f"turn {i + 1} ({t.role})", t.content) for i, t in enumerate(d.turns)]
    for what, value in texts:
        if not isinstance(value, str):
            raise DataError(
                d.source, f"{what}: text is {type(value).__name__}, not a string", d.to_messages()
            )

    def clean(s: str) -> str:
        s, n_control, n_space = _normalize(s)
        stats.control_chars_removed += n_control
        stats.whitespace_chars_removed += n_space
        if redact_pii and s:
            s, counts = redact(s, keep)
            stats.pii.update(counts)
        return s

    turns = []
    for i, t in enumerate(d.turns):
        content = clean(t.content)
        if not content:
            why = "empty text" if not t.content else "empty after removing whitespace and control characters"
            raise DataError(d.source, f"turn {i + 1} ({t.role}): {why}", d.to_messages())
        turns.append(Turn(t.role, content))
    system = clean(d.system) if d.system is not None else None
    out = merge_same_role(Dialogue(turns=turns, system=system or None, source=d.source))
    stats.turns_merged += len(turns) - len(out.turns)
    try:
        validate_dialogue(out)
    except DataError as e:
        merged = " (turn numbers after merging same-role turns)" if len(out.turns) != len(turns) else ""
        raise DataError(d.source, f"after cleaning: {e.reason}{merged}", d.to_messages()) from None
    return out


def clean_dialogues(
    dialogues: Iterable[Dialogue],
    *,
    redact_pii: bool = True,
    dedup: bool = True,
    near_dup_threshold: float | None = 0.8,
    keep: Collection[str] = HOTLINES,
) -> CleanResult:
    """Clean every dialogue (see `clean_dialogue`), then drop exact duplicates (same system prompt and turns
    after cleaning; the first is kept) and report near-duplicates at `near_dup_threshold` (None or 0: off).
    Near-duplicates are reported only, never dropped: a user must decide whether they are templated noise."""
    if near_dup_threshold is not None and not 0 <= near_dup_threshold <= 1:
        raise UserError(f"near-duplicate threshold must be between 0 and 1, got {near_dup_threshold}")
    stats = CleanStats()
    kept: list[Dialogue] = []
    rejects: list[DataError] = []
    duplicates: list[tuple[Source, Source]] = []
    seen: dict[tuple, Source] = {}
    for d in dialogues:
        stats.input += 1
        try:
            c = clean_dialogue(d, redact_pii=redact_pii, keep=keep, stats=stats)
        except DataError as e:
            rejects.append(e)
            continue
        if dedup:
            key = c.key()
            if key in seen:
                duplicates.append((seen[key], c.source))
                continue
            seen[key] = c.source
        kept.append(c)
    near = find_near_duplicates(kept, near_dup_threshold) if near_dup_threshold else []
    stats.output = len(kept)
    stats.rejected = len(rejects)
    stats.exact_duplicates = len(duplicates)
    stats.near_duplicates = len(near)
    return CleanResult(kept, stats, rejects, near, duplicates)
