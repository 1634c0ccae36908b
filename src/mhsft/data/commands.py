"""`mhsft data inspect | validate | convert | clean`: the data layer from the command line.

Every bad record is reported as one line `FILE:LINE: record ID: reason`, written with its reason to a
rejects JSONL file and counted; `--strict` stops at the first with a non-zero exit instead.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.args import DataArguments, parse_args, pick_subcommand, split_positional
from mhsft.data.clean import clean_dialogues
from mhsft.data.json_files import sniff
from mhsft.data.loader import Notices, Rejects, iter_datasets
from mhsft.data.readers import CONVERTERS, detect_record, list_data_files, write_jsonl
from mhsft.data.schema import DataError, Dialogue
from mhsft.data.stats import Stats, format_table
from mhsft.model import load_tokenizer
from mhsft.utils import UserError

SUBCOMMANDS = {
    "inspect": "statistics: dialogues, turns, characters, tokens (p50/p90/p99/max), truncation, packing efficiency",
    "validate": "check every record; one line per problem; exit 1 when any record is invalid",
    "convert": "write ShareGPT or messages JSONL that `swift sft --dataset` and `mhsft sft --dataset` accept",
    "clean": "normalize text, merge same-role turns, drop exact duplicates, report near-duplicates, redact PII",
}


@dataclass
class DataCommandArguments(DataArguments):
    model: str | None = field(
        default=None, metadata={"help": "Tokenizer for token statistics (a model id/dir or builtin:tiny)."}
    )
    use_hf: bool = field(
        default=False, metadata={"help": "Resolve hub ids on Hugging Face instead of ModelScope."}
    )
    output: str | None = field(default=None, metadata={"help": "Output JSONL (convert, clean)."})
    to: str = field(
        default="sharegpt", metadata={"help": "Output format for convert/clean: sharegpt | messages."}
    )
    rejects: str | None = field(
        default=None,
        metadata={
            "help": "Where bad records go (validate, convert, clean: default OUTPUT.rejects.jsonl, or "
            "./NAME.rejects.jsonl; inspect: only when given)."
        },
    )
    json: bool = field(default=False, metadata={"help": "inspect: print JSON instead of a table."})
    redact: bool = field(
        default=True, metadata={"help": "clean: redact personal data (phones, ID numbers, ...)."}
    )
    dedup: bool = field(default=True, metadata={"help": "clean: drop exact duplicate dialogues."})
    near_dup_threshold: float = field(
        default=0.8, metadata={"help": "clean: report pairs above this Jaccard similarity (0 disables)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _rejects(args: DataCommandArguments, path: Path | None) -> Rejects:
    return Rejects(path, args.strict, echo=_stderr, prefix="")


def _print_notices(notices: Notices) -> None:
    for line in notices.lines():
        print(line)


def _default_rejects(args: DataCommandArguments) -> Path:
    if args.rejects:
        return Path(args.rejects)
    if args.output:
        out = Path(args.output)
        return out.with_name(out.name.removesuffix(".jsonl").removesuffix(".json") + ".rejects.jsonl")
    name = Path(args.dataset[0].split("#")[0].rstrip("/")).name or "dataset"
    return Path(name.removesuffix(".jsonl").removesuffix(".json") + ".rejects.jsonl")


def _items(args: DataCommandArguments):
    it = _iter_specs(args)
    if not args.progress or not sys.stderr.isatty():
        return it
    from tqdm import tqdm

    return tqdm(it, desc="reading", unit=" dialogues", file=sys.stderr, mininterval=0.5)


def _iter_specs(args: DataCommandArguments):
    """Every record of every dataset; a dataset that holds no record at all (an empty file, a folder with
    no data files) is a UserError: it is a wrong path far more often than an intended empty dataset."""
    for spec in args.dataset:
        n = 0
        for item in iter_datasets([spec], fmt=args.dataset_format, use_hf=args.use_hf, seed=args.seed):
            n += 1
            yield item
        if n == 0:
            raise UserError(f"dataset {spec}: {_why_empty(spec)}")


def _why_empty(spec: str) -> str:
    p = Path(spec).expanduser()
    if not p.exists():  # `data.jsonl#100`
        p = Path(spec.rsplit("#", 1)[0]).expanduser()
    if p.is_dir():
        files = list_data_files(p)
        if not files:
            return "no .json, .jsonl or .txt data files in this folder"
        if all(sniff(f) == "array" for f in files):
            return "its data files are JSON arrays with no records"
        return "its data files hold no records"
    if p.is_file():
        return "a JSON array with no records ([])" if sniff(p) == "array" else "the file is empty"
    return "no records found"


def _recover(err: DataError, fmt: str) -> Dialogue | None:
    """The dialogue of a record that was rejected only by validation (two turns of one role in a row, an
    empty turn, ...), so that `clean` can repair what it can; None when the record is not even readable."""
    rec = err.raw
    kind = detect_record(rec) if fmt == "auto" else fmt
    if not isinstance(rec, dict) or kind not in CONVERTERS:
        return None
    try:
        return CONVERTERS[kind](rec, err.source)
    except DataError:
        return None


def cmd_inspect(args: DataCommandArguments) -> int:
    tokenizer = None
    if args.model:
        tokenizer = load_tokenizer(args.model, use_hf=args.use_hf)
    stats = Stats(max_length=args.max_length if tokenizer is not None else None)
    first_error = None
    # inspect prints its own summary of bad records: the rejects file is written only when asked for
    rejects = Rejects(Path(args.rejects) if args.rejects else None, args.strict, echo=lambda line: None)
    for item in _items(args):
        if isinstance(item, DataError):
            rejects.add(item)
            first_error = first_error or item
        stats.add(item, tokenizer)
    rejects.close()
    d = {"datasets": args.dataset, "model": args.model, **stats.to_dict()}
    if args.json:
        print(json.dumps(d, ensure_ascii=False, indent=2))
    else:
        title = ", ".join(args.dataset) + (f"  (tokens: {args.model})" if args.model else "")
        print(format_table(d, title), end="")
        if args.max_length and not args.model:
            print("--max_length needs --model for token statistics.", file=sys.stderr)
    if stats.rejected:
        where = (
            f"all are in {args.rejects}" if args.rejects else "`mhsft data validate` lists them one per line"
        )
        print(
            f"{stats.rejected:,} record(s) are invalid, the first: {first_error or 'see validate'}\n{where}.",
            file=sys.stderr,
        )
    return 0


def cmd_validate(args: DataCommandArguments) -> int:
    rejects, notices = _rejects(args, _default_rejects(args)), Notices()
    good = 0
    for item in _items(args):
        if isinstance(item, DataError):
            rejects.add(item)
        else:
            good += 1
            notices.add(item)
    summary = rejects.close()
    print(f"{good:,} valid dialogue(s); {summary}")
    _print_notices(notices)
    return 1 if rejects.count else 0


def _write(dialogues: list[Dialogue] | object, args: DataCommandArguments) -> int:
    return write_jsonl(dialogues, args.output, fmt=args.to)


def cmd_convert(args: DataCommandArguments) -> int:
    rejects, notices = _rejects(args, _default_rejects(args)), Notices()

    def good():
        for item in _items(args):
            if isinstance(item, DataError):
                rejects.add(item)
            else:
                notices.add(item)
                yield item

    n = _write(good(), args)
    summary = rejects.close()
    print(f"wrote {n:,} dialogue(s) as {args.to} JSONL to {args.output}; {summary}")
    _print_notices(notices)
    return 0


def cmd_clean(args: DataCommandArguments) -> int:
    rejects, notices = _rejects(args, _default_rejects(args)), Notices()
    dialogues = []
    for item in _items(args):
        if isinstance(item, DataError):
            # Clean exists to repair e.g. two user turns in a row, which reading alone rejects.
            d = _recover(item, args.dataset_format)
            if d is None:
                rejects.add(item)
            else:
                dialogues.append(d)
        else:
            notices.add(item)
            dialogues.append(item)
    res = clean_dialogues(
        dialogues, redact_pii=args.redact, dedup=args.dedup, near_dup_threshold=args.near_dup_threshold
    )
    for err in res.rejects:
        rejects.add(err)
    n = _write(res.dialogues, args)
    summary = rejects.close()
    st = res.stats
    pii = ", ".join(f"{k} {v:,}" for k, v in sorted(st.pii.items())) or "none"
    print(f"wrote {n:,} clean dialogue(s) to {args.output}; {summary}")
    print(f"  dialogues read: {st.input:,}")
    print(f"  exact duplicates dropped: {st.exact_duplicates:,}")
    print(f"  same-role turns merged: {st.turns_merged:,}")
    print(f"  personal data redacted: {pii}" + (f" (total {sum(st.pii.values()):,})" if st.pii else ""))
    print(f"  control characters removed: {st.control_chars_removed:,}")
    print(f"  whitespace characters removed: {st.whitespace_chars_removed:,}")
    print(f"  rejected after cleaning: {st.rejected:,}")
    print(f"  near-duplicate pairs (kept, not dropped): {st.near_duplicates:,}")
    _print_notices(notices)
    for a, b, sim in res.near_duplicates[:10]:
        print(f"    {a.where()} ~ {b.where()}  Jaccard {sim:.2f}")
    return 0


def _check_args(args: DataCommandArguments, sub: str) -> None:
    """Flag values that would otherwise fail only after reading the whole dataset."""
    if not args.dataset:
        raise UserError(f"mhsft data {sub}: give at least one dataset (a file, folder or hub id)")
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max_length must be a positive number of tokens, got {args.max_length}")
    if sub in ("convert", "clean"):
        if not args.output:
            raise UserError(f"{sub} needs --output FILE.jsonl")
        if args.to not in ("sharegpt", "messages"):
            raise UserError(f"--to must be sharegpt or messages, not {args.to!r}")
    for flag, path in (("--output", args.output), ("--rejects", args.rejects)):
        if path and Path(path).is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name like {Path(path) / 'data.jsonl'}")
        blocker = next((p for p in Path(path or ".").parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")
    if not 0 <= args.near_dup_threshold <= 1:
        raise UserError(f"--near_dup_threshold must be between 0 and 1, got {args.near_dup_threshold}")


def main(argv: list[str]) -> int:
    if (picked := pick_subcommand(argv, "data", "DATASET... [flags]", SUBCOMMANDS)) is None:
        return 0
    sub, rest = picked[0], split_positional(picked[1], DataCommandArguments, "dataset")
    if "-h" in rest or "--help" in rest:
        print(f"mhsft data {sub}: {SUBCOMMANDS[sub]}\n")
    args = parse_args(DataCommandArguments, rest, prog=f"mhsft data {sub}")
    _check_args(args, sub)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = {"inspect": cmd_inspect, "validate": cmd_validate, "convert": cmd_convert, "clean": cmd_clean}
    try:
        return command[sub](args)
    except OSError as e:  # an unwritable --output or rejects path, a full disk, ...
        where = f"{e.filename}: " if e.filename else ""
        raise UserError(f"mhsft data {sub}: {where}{e.strerror or e}") from None
