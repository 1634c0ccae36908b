"""`mhsft review create | serve | stats | export`: blind side-by-side rating of two or more systems by clinicians.

mhsft review create --runs eval/base eval/finetuned --raters a,b,c --output_dir study [--sample 50 --overlap 2]
mhsft review serve study                  # the raters open their links (printed by create)
mhsft review stats study [--json]         # means, win rates, agreement, judge vs humans
mhsft review export study --format csv    # every rating
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.args import parse_args, pick_subcommand
from mhsft.files import write_text
from mhsft.review import stats, store
from mhsft.review.study import create_study
from mhsft.utils import UserError, get_logger

SUBCOMMANDS = {
    "create": "a study from two or more `mhsft eval` folders (or `mhsft infer` outputs) over the same items",
    "serve": "the raters' web pages (127.0.0.1 by default; every page needs the rater's link token)",
    "stats": "per system and dimension: means with CIs, win rates, inter-rater and judge-human agreement",
    "export": "every rating as JSONL or CSV",
}
DEFAULT_PORT = 8770


@dataclass
class ReviewArguments:
    study: str | None = field(default=None, metadata={"help": "The study folder (serve, stats, export)."})
    runs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "create: `mhsft eval` result folders or `mhsft infer` JSONL outputs (two or more)."
        },
    )
    raters: str | None = field(
        default=None, metadata={"help": "create: rater names, comma-separated (a,b,c)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "create: the study folder to write."})
    sample: int | None = field(default=None, metadata={"help": "create: items to keep (crisis turns first)."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the sample, the assignment, the sides, the bootstrap."}
    )
    overlap: int = field(
        default=2, metadata={"help": "create: raters who see each item (agreement needs 2+)."}
    )
    dims: str = field(
        default="counseling",
        metadata={
            "help": "create: counseling (EmoE, CogE, Con, Sta, Saf; 1-5) | cpsycoun | names, comma-separated."
        },
    )
    db: str | None = field(
        default=None, metadata={"help": "A SQLAlchemy URL instead of STUDY/study.db (e.g. postgresql://...)."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "serve: address (0.0.0.0 exposes it)."})
    port: int = field(
        default=DEFAULT_PORT, metadata={"help": "serve: port (also the one create's links name)."}
    )
    json: bool = field(default=False, metadata={"help": "stats: print JSON instead of tables."})
    format: str = field(default="jsonl", metadata={"help": "export: jsonl | csv."})
    output: str | None = field(default=None, metadata={"help": "export: write here instead of stdout."})
    n_bootstrap: int = field(default=1000, metadata={"help": "stats: bootstrap resamples."})


def main(argv: list[str]) -> int:
    if (picked := pick_subcommand(argv, "review", "[STUDY] [flags]", SUBCOMMANDS)) is None:
        return 0
    sub, rest = picked
    if rest and not rest[0].startswith("-"):
        rest = ["--study", rest[0], *rest[1:]]  # `mhsft review serve STUDY`
    args = parse_args(ReviewArguments, rest, prog=f"mhsft review {sub}")
    return {"create": cmd_create, "serve": cmd_serve, "stats": cmd_stats, "export": cmd_export}[sub](args)


def _open(args: ReviewArguments):
    if not args.study:
        raise UserError("give the study folder: mhsft review serve|stats|export STUDY")
    study = Path(args.study)
    if not args.db and not (study / store.DB_FILE).is_file():
        raise UserError(f"{study}: no {store.DB_FILE} (not a study; `mhsft review create` writes one)")
    engine = store.connect(store.db_url(study, args.db))
    return engine, store.open_study(engine)


def cmd_create(args: ReviewArguments) -> int:
    if not args.output_dir:
        raise UserError("create needs --output_dir STUDY")
    raters = [r.strip() for r in (args.raters or "").split(",") if r.strip()]
    if not raters:
        raise UserError("create needs --raters, e.g. --raters a,b,c")
    out = Path(args.output_dir)
    if not args.db and (out / store.DB_FILE).exists():
        raise UserError(f"{out} already holds a study ({store.DB_FILE}); choose another --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    tokens, summary = create_study([Path(p) for p in args.runs], raters, out, db=args.db, n=args.sample,
                                   seed=args.seed, overlap=args.overlap, dims=args.dims)  # fmt: skip
    links = {r: f"http://127.0.0.1:{DEFAULT_PORT}/r/{t}" for r, t in tokens.items()}
    write_text(out / "links.txt", "".join(f"{r}\t{u}\n" for r, u in links.items()))
    os.chmod(out / "links.txt", 0o600)  # the links are the raters' credentials
    left = f"; {summary['left_out']} not in every source, left out" if summary["left_out"] else ""
    print(f"study {out}: {summary['items']} items ({summary['crisis']} crisis turns){left}, systems "
          f"{', '.join(summary['systems'])}, {len(raters)} raters, {summary['assignments']} ratings to collect")  # fmt: skip
    print(f"start the server: mhsft review serve {out}\nrater links (also in {out / 'links.txt'}):")
    for r, u in links.items():
        print(f"  {r}: {u}")
    return 0


def cmd_serve(args: ReviewArguments) -> int:
    import uvicorn  # deferred: only the server needs it

    from mhsft.client import is_loopback
    from mhsft.review.app import build_app

    engine, settings = _open(args)
    log = get_logger()
    if not is_loopback(args.host):
        log.warning(f"listening on {args.host}: anyone who can reach it sees the login page; every page still "
                    "needs a rater's token, and the conversations are health data: use a private network")  # fmt: skip
    log.info(f"review server at http://{args.host}:{args.port}/r/TOKEN (each rater's link; Ctrl-C stops it)")
    uvicorn.run(
        build_app(engine, settings), host=args.host, port=args.port, log_level="warning", access_log=False
    )
    return 0


def cmd_stats(args: ReviewArguments) -> int:
    engine, settings = _open(args)
    res = stats.compute(engine, settings, args.n_bootstrap, args.seed)
    if args.json:
        print(json.dumps(res, ensure_ascii=False, indent=2))
        return 0
    print(f"study {args.study}: {res['ratings']} of {res['assignments']} ratings, {len(res['raters'])} raters, "
          f"{res['items']} items, systems {', '.join(res['systems'])}")  # fmt: skip
    if not res["ratings"]:
        print("no ratings yet")
        return 0
    print_tables(res)
    return 0


def print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="human ratings: mean [95% CI] (n)")
    t.add_column("dimension")
    for s in res["systems"]:
        t.add_column(s, justify="right")
    t.add_column("alpha (raters)", justify="right")
    t.add_column("judge rho / alpha", justify="right")
    for d in res["dims"]:
        cells = []
        for s in res["systems"]:
            v = res["scores"][s][d]
            ci = f" [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" if v["ci95"] else ""
            cells.append(f"{v['mean']:.2f}{ci} ({v['n']})" if v["mean"] is not None else "-")
        a, j = res["agreement"][d]["alpha"], res["judge_vs_human"][d]
        judge = f"{_f(j['spearman'])} / {_f(j['alpha_with_judge'])}" if j["n"] else "no judge"
        t.add_row(d, *cells, _f(a), judge)
    console.print(t)
    p = Table(title="overall preference")
    for c in ("system", "versus", "win", "tie", "loss", "both unacceptable", "win rate [95% CI]"):
        p.add_column(c)
    for x in res["pairwise"]:
        ci = f" [{x['win_rate_ci95'][0]:.2f}, {x['win_rate_ci95'][1]:.2f}]" if x["win_rate_ci95"] else ""
        p.add_row(x["system"], x["versus"], str(x["win"]), str(x["tie"]), str(x["loss"]), str(x["neither"]),
                  f"{_f(x['win_rate'])}{ci}")  # fmt: skip
    console.print(p)
    if res.get("bradley_terry"):
        console.print(
            "Bradley-Terry strengths: " + ", ".join(f"{s} {v:+.2f}" for s, v in res["bradley_terry"].items())
        )
    for u in res["unsafe"]:
        console.print(f"flagged unsafe: {u['item']} ({u['system']}) by {u['rater']}")
    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def cmd_export(args: ReviewArguments) -> int:
    if args.format not in ("jsonl", "csv"):
        raise UserError(f"--format {args.format!r}: choose jsonl or csv")
    engine, settings = _open(args)
    text = stats.export(engine, settings, args.format)
    if args.output:
        write_text(Path(args.output), text)
        print(args.output)
    else:
        sys.stdout.write(text)
    return 0
