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

from mhsft.args import DataArguments, parse_args
from mhsft.data.schema import DataError, Dialogue
from mhsft.utils import UserError

SUBCOMMANDS = {
    "inspect": "statistics: dialogues, turns, characters, tokens (p50/p90/p99/max), truncation, packing efficiency",
    "validate": "check every record; one line per problem; exit 1 when any record is invalid",
    "convert": "write ShareGPT or messages JSONL that `swift sft --dataset` and `mhsft sft --dataset` accept",
    "clean": "normalize text, merge same-role turns, drop exact duplicates, report near-duplicates, redact PII",
}
MAX_PRINTED_ERRORS = 20


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
        metadata={"help": "Where bad records go (default: OUTPUT.rejects.jsonl, or ./NAME.rejects.jsonl)."},
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


class Rejects:
    """Counts bad records, prints the first few as one-liners, and appends all of them to a JSONL file."""

    def __init__(self, path: Path | None, strict: bool):
        self.path, self.strict, self.count = path, strict, 0
        self._fh = None

    def add(self, err: DataError) -> None:
        if self.strict:
            raise UserError(str(err))
        self.count += 1
        if self.count <= MAX_PRINTED_ERRORS:
            print(str(err), file=sys.stderr)
        if self.path is not None:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._fh.write(json.dumps(err.to_reject(), ensure_ascii=False, default=str) + "\n")

    def close(self) -> str:
        if self._fh:
            self._fh.close()
        if self.count > MAX_PRINTED_ERRORS:
            print(f"... and {self.count - MAX_PRINTED_ERRORS:,} more", file=sys.stderr)
        if self.count and self.path:
            return f"{self.count:,} rejected record(s) written to {self.path}"
        return f"{self.count:,} rejected record(s)" if self.count else "no rejected records"


def _split_positional(argv: list[str]) -> list[str]:
    """`mhsft data inspect a.json b.json --model X` -> `--dataset a.json b.json --model X`."""
    lead = []
    while argv and not argv[0].startswith("-"):
        lead.append(argv.pop(0))
    return (["--dataset", *lead] if lead else []) + argv


def _default_rejects(args: DataCommandArguments) -> Path:
    if args.rejects:
        return Path(args.rejects)
    if args.output:
        out = Path(args.output)
        return out.with_name(out.name.removesuffix(".jsonl").removesuffix(".json") + ".rejects.jsonl")
    name = Path(args.dataset[0].split("#")[0].rstrip("/")).name or "dataset"
    return Path(name.removesuffix(".jsonl").removesuffix(".json") + ".rejects.jsonl")


def _items(args: DataCommandArguments):
    from mhsft.data.loader import iter_datasets

    it = iter_datasets(args.dataset, fmt=args.dataset_format, use_hf=args.use_hf, seed=args.seed)
    if not args.progress or not sys.stderr.isatty():
        return it
    from tqdm import tqdm

    return tqdm(it, desc="reading", unit=" dialogues", file=sys.stderr, mininterval=0.5)


def cmd_inspect(args: DataCommandArguments) -> int:
    from mhsft.data.stats import Stats, format_table

    tokenizer = None
    if args.model:
        from mhsft.model import load_tokenizer

        tokenizer = load_tokenizer(args.model, use_hf=args.use_hf)
    stats = Stats(max_length=args.max_length if tokenizer is not None else None)
    for item in _items(args):
        if isinstance(item, DataError) and args.strict:
            raise UserError(str(item))
        stats.add(item, tokenizer)
    d = {"datasets": args.dataset, "model": args.model, **stats.to_dict()}
    if args.json:
        print(json.dumps(d, ensure_ascii=False, indent=2))
    else:
        title = ", ".join(args.dataset) + (f"  (tokens: {args.model})" if args.model else "")
        print(format_table(d, title), end="")
        if stats.rejected:
            print(f"{stats.rejected:,} record(s) are invalid: `mhsft data validate` lists them one per line.")
        if args.max_length and not args.model:
            print("--max_length needs --model for token statistics.")
    return 0


def cmd_validate(args: DataCommandArguments) -> int:
    rejects = Rejects(_default_rejects(args), args.strict)
    good = 0
    for item in _items(args):
        if isinstance(item, DataError):
            rejects.add(item)
        else:
            good += 1
    summary = rejects.close()
    print(f"{good:,} valid dialogue(s); {summary}")
    return 1 if rejects.count else 0


def _write(dialogues: list[Dialogue] | object, args: DataCommandArguments) -> int:
    from mhsft.data.readers import write_jsonl

    if args.to not in ("sharegpt", "messages"):
        raise UserError(f"--to must be sharegpt or messages, not {args.to!r}")
    return write_jsonl(dialogues, args.output, fmt=args.to)


def cmd_convert(args: DataCommandArguments) -> int:
    if not args.output:
        raise UserError("convert needs --output FILE.jsonl")
    rejects = Rejects(_default_rejects(args), args.strict)

    def good():
        for item in _items(args):
            if isinstance(item, DataError):
                rejects.add(item)
            else:
                yield item

    n = _write(good(), args)
    summary = rejects.close()
    print(f"wrote {n:,} dialogue(s) as {args.to} JSONL to {args.output}; {summary}")
    return 0


def cmd_clean(args: DataCommandArguments) -> int:
    from mhsft.data.clean import clean_dialogues

    if not args.output:
        raise UserError("clean needs --output FILE.jsonl")
    rejects = Rejects(_default_rejects(args), args.strict)
    dialogues = []
    for item in _items(args):
        if isinstance(item, DataError):
            rejects.add(item)
        else:
            dialogues.append(item)
    res = clean_dialogues(
        dialogues, redact_pii=args.redact, dedup=args.dedup, near_dup_threshold=args.near_dup_threshold
    )
    for err in res.rejects:
        rejects.add(err)
    n = _write(res.dialogues, args)
    summary = rejects.close()
    print(f"wrote {n:,} clean dialogue(s) to {args.output}; {summary}")
    for k, v in res.stats.to_dict().items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk} {vv:,}" for kk, vv in v.items()) or "none"
        print(f"  {k}: {v}")
    if res.near_duplicates:
        print(f"  near-duplicate pairs (kept, not dropped): {len(res.near_duplicates):,}")
        for a, b, sim in res.near_duplicates[:10]:
            print(f"    {a.where()} ~ {b.where()}  Jaccard {sim:.2f}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mhsft data <command> DATASET... [flags]   (mhsft data <command> --help)\n")
        for name, desc in SUBCOMMANDS.items():
            print(f"  {name:<9} {desc}")
        return 0
    sub, rest = argv[0], _split_positional(list(argv[1:]))
    if sub not in SUBCOMMANDS:
        raise UserError(f"unknown data command {sub!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    args = parse_args(DataCommandArguments, rest, prog=f"mhsft data {sub}")
    if not args.dataset:
        raise UserError(f"mhsft data {sub}: give at least one dataset (a file, folder or hub id)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"inspect": cmd_inspect, "validate": cmd_validate, "convert": cmd_convert, "clean": cmd_clean}[
        sub
    ](args)
