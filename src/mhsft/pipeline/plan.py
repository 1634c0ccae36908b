"""The experiment file of `mhsft run` and the stages it plans, each with the command line it runs.

A section holds a stage's flags under their CLI names (ms-swift spellings too); the few settings only the pipeline
reads are listed in OPTIONS, and the flags it decides itself (where a stage writes, what it reads from the stage
before) in DECIDED. Every section is checked by the stage's own argument parser before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.args import ALIASES, parse_args
from mhsft.checkpoint import VERSION_RE, choose_checkpoint, list_checkpoints
from mhsft.files import read_yaml
from mhsft.utils import UserError

SECTIONS = ("data", "sft", "export", "eval", "review", "report")
TOP_KEYS = ("exp_dir", "model", "use_hf", *SECTIONS)
OPTIONS = {"data": {"test_size", "clean"}, "eval": {"judge_deploy", "baseline", "finetuned"}}
DECIDED = {
    "data": {"output", "rejects", "json", "progress"},
    "sft": {"output_dir", "resume_from_checkpoint", "add_version"},
    "export": {"output_dir", "adapters", "overwrite", "push_to_hub"},
    "eval": {"output_dir", "model", "adapters", "api_url", "export"},
    "report": {"inputs", "output", "baseline", "data_stats", "review"},
    "review": {"study", "runs", "output_dir", "host", "port", "json", "format", "output"},
    "judge_deploy": {"host", "port", "api_key"},  # served on loopback for this run only
}
_ENV_RE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@dataclass
class Experiment:
    path: Path
    exp_dir: Path  # absolute
    model: str | None
    use_hf: bool
    sections: dict[str, dict]


@dataclass
class Stage:
    name: str  # data | sft | export | eval_base | eval_finetuned | review | report
    title: str
    flags: dict  # the stage's own flags, checked
    inputs: list  # fingerprints of the user's files it reads
    upstream: tuple[str, ...]  # stages whose outputs it reads
    out_dir: Path
    keep_stale: bool = False  # outputs worth hours: moved aside, not deleted, when the stage starts afresh
    options: dict = field(default_factory=dict)  # pipeline-only settings


# ----------------------------------------------------------------------------------------------- the file
def _expand(value):
    """`${VAR}` / `${VAR:-default}`, as the users' shell commands write them. A string that expands to nothing
    (an unset variable) becomes None: its flag is left out and the stage looks in the environment and .env."""
    if isinstance(value, str):
        out = _ENV_RE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
        return None if value and not out.strip() else out
    if isinstance(value, list):
        return [x for x in map(_expand, value) if x is not None]
    if isinstance(value, dict):
        return {str(k): _expand(v) for k, v in value.items()}
    return value


def load_experiment(path: str | Path, exp_dir: str | None = None) -> Experiment:
    """The experiment file, checked; `exp_dir` (`mhsft run --exp_dir`) replaces the file's own."""
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a mapping of settings ({', '.join(TOP_KEYS)})")
    unknown = sorted(set(map(str, raw)) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{p}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(TOP_KEYS)}")
    sections = {}
    for name in SECTIONS:
        if name not in raw or raw[name] is False:
            continue
        sec = raw[name] if raw[name] is not None else {}
        if not isinstance(sec, dict):
            raise UserError(f"{p}: {name}: expected a mapping of flag: value (or {{}} for the defaults)")
        sections[name] = _expand(sec)
    if not sections:
        raise UserError(f"{p}: no stage to run: add a data, sft, export, eval or report section")
    if exp_dir is None:
        exp_dir = _expand(str(raw.get("exp_dir") or f"output/{p.stem}")) or f"output/{p.stem}"
    exp_dir = Path(exp_dir)
    model = _expand(raw.get("model"))
    use_hf = raw.get("use_hf") is True
    return Experiment(p, exp_dir.expanduser().resolve(), str(model) if model else None, use_hf, sections)


def to_argv(flags: dict) -> list[str]:
    """{flag: value} -> ["--flag", "value", ...]: lists as several words, booleans as true/false, None left out."""
    argv: list[str] = []
    for k, v in flags.items():
        if v is None or (isinstance(v, list) and not v):
            continue
        if isinstance(v, dict):
            raise UserError(f"{k}: expected a value or a list, not a mapping")
        argv += [f"--{k}", *map(_word, v if isinstance(v, list) else [v])]
    return argv


def _word(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _arg_class(section: str):
    # Imported here, not at the top: each stage's module brings its own heavy dependencies (torch, fastapi), and a
    # plan only needs the stages its experiment has (a typo in the YAML is reported in a fraction of a second).
    if section == "data":
        from mhsft.data.commands import DataCommandArguments as cls
    elif section == "sft":
        from mhsft.train.sft import SftArguments as cls
    elif section == "export":
        from mhsft.export.merge import ExportArguments as cls
    elif section == "eval":
        from mhsft.eval.evaluate import EvalArguments as cls
    elif section == "report":
        from mhsft.report.report import ReportArguments as cls
    elif section == "review":
        from mhsft.review.commands import ReviewArguments as cls
    else:
        from mhsft.serve.deploy import DeployArguments as cls
    return cls


def check_section(exp: Experiment, section: str, settings: dict) -> dict:
    """The section's stage flags, ms-swift spellings renamed. Unknown names, names the pipeline decides and
    values the stage's own parser refuses are one-line errors here, before any stage runs."""
    where = f"{exp.path}: {section}"
    aliases = {k[2:]: v[2:] for k, v in ALIASES.items()}
    if section == "eval":
        from mhsft.eval.evaluate import EVAL_ALIASES  # deferred with the stage's arguments (see _arg_class)

        aliases |= {k[2:]: v[2:] for k, v in EVAL_ALIASES.items()}
    cls = _arg_class(section)
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {}
    for k, v in settings.items():
        if k in OPTIONS.get(section, ()):
            continue
        key = aliases.get(k, k).replace("-", "_")
        if key in DECIDED.get(section, ()):
            raise UserError(
                f"{where}: {k} is decided by the pipeline (stages write under exp_dir); remove it"
            )
        if key not in names:
            cli = {"judge_deploy": "deploy", "data": "data clean"}.get(section, section)
            raise UserError(f"{where}: unknown setting {k!r}; see `mhsft {cli} --help`")
        flags[key] = v
    try:
        with contextlib.redirect_stdout(sys.stderr):
            parse_args(cls, to_argv(flags), f"{where}:")
    except SystemExit:  # argparse has printed the reason
        raise UserError(f"{where}: a setting has a value the stage does not accept (see above)") from None
    return flags


def fingerprint(spec: str) -> object:
    """What identifies a user's input: (path, size, mtime) of a local file or of each file of a local folder;
    a hub id or builtin model by its name."""
    p = Path(re.sub(r"#\d+$", "", spec)).expanduser()
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return [
            str(p.resolve()),
            [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        ]
    return spec


def _as_list(v) -> list[str]:
    return [str(x) for x in v] if isinstance(v, list) else ([str(v)] if v else [])


# ----------------------------------------------------------------------------------------------- planning
def plan(exp: Experiment) -> list[Stage]:
    """The experiment's stages in order, every section checked."""
    S = exp.sections
    stages: list[Stage] = []
    if "data" in S:
        stages.append(_plan_data(exp))
    if "sft" in S:
        stages.append(_plan_sft(exp))
    if "export" in S:
        stages.append(_plan_export(exp))
    if "eval" in S:
        stages += _plan_eval(exp)
    if "review" in S:
        stages.append(_plan_review(exp, stages))
    if "report" in S:
        flags = check_section(exp, "report", S["report"])
        up = tuple(s.name for s in stages)
        stages.append(Stage("report", "write the report", flags, [], up, exp.exp_dir / "report"))
    return stages


def _plan_data(exp: Experiment) -> Stage:
    S, err = exp.sections, f"{exp.path}:"
    flags = check_section(exp, "data", S["data"])
    if not flags.get("dataset"):
        raise UserError(f"{err} data: give dataset (the dialogues to prepare)")
    test_size = S["data"].get("test_size") or 0
    if not isinstance(test_size, int) or test_size < 0:
        raise UserError(f"{err} data: test_size must be a whole number >= 0")
    opts = {
        "test_size": test_size,
        "clean": S["data"].get("clean", True) is not False,
        # token statistics with the tokenizer and max_length that training uses
        "stats_model": flags.pop("model", None) or S.get("sft", {}).get("model") or exp.model,
        "stats_max_length": flags.pop("max_length", None) or S.get("sft", {}).get("max_length"),
    }
    inputs = [fingerprint(d) for d in _as_list(flags["dataset"])]
    title = "validate, clean and split the dialogues"
    return Stage("data", title, flags, inputs, (), exp.exp_dir / "data", options=opts)


def _plan_sft(exp: Experiment) -> Stage:
    S, err = exp.sections, f"{exp.path}:"
    hf = {"use_hf": True} if exp.use_hf else {}
    flags = check_section(exp, "sft", S["sft"])
    flags = {"model": flags.pop("model", None) or exp.model, **hf, **flags}
    if not flags["model"]:
        raise UserError(f"{err} give model (top level or in sft)")
    if "data" in S and flags.get("dataset"):
        raise UserError(f"{err} sft: the dataset comes from the data stage here; set data.dataset instead")
    if "data" not in S and not flags.get("dataset"):
        raise UserError(f"{err} sft: give dataset, or add a data section")
    specs = [flags["model"], *_as_list(flags.get("dataset")), *_as_list(flags.get("val_dataset"))]
    up = ("data",) if "data" in S else ()
    return Stage(
        "sft", "fine-tune", flags, list(map(fingerprint, specs)), up, exp.exp_dir / "sft", keep_stale=True
    )


def _plan_export(exp: Experiment) -> Stage:
    S = exp.sections
    if "sft" not in S:
        raise UserError(f"{exp.path}: export merges the sft stage's adapter: add an sft section")
    hf = {"use_hf": True} if exp.use_hf else {}
    flags = check_section(exp, "export", S["export"])
    flags = {"model": flags.pop("model", None) or S["sft"].get("model") or exp.model, **hf, **flags}
    return Stage(
        "export", "merge the adapter into the base model", flags, [], ("sft",), exp.exp_dir / "export"
    )


def _plan_review(exp: Experiment, stages: list[Stage]) -> Stage:
    """A `mhsft review` study of the two evaluations, for clinicians to rate (its links are printed; the run does not
    wait for them). Its ratings are kept aside, never deleted, when the evaluations change and a new study is made."""
    sec = dict(exp.sections["review"])
    if isinstance(sec.get("raters"), list):
        sec["raters"] = ",".join(map(str, sec["raters"]))
    flags = check_section(exp, "review", sec)
    evals = [s.name for s in stages if s.name.startswith("eval_")]
    if len(evals) < 2:
        raise UserError(f"{exp.path}: review compares the base and the fine-tuned evaluations: it needs both")
    if not flags.get("raters"):
        raise UserError(f"{exp.path}: review: give raters, e.g. raters: [a, b]")
    return Stage("review", "a study for clinicians to rate", flags, [], tuple(evals), exp.exp_dir / "review",
                 keep_stale=True)  # fmt: skip


def _plan_eval(exp: Experiment) -> list[Stage]:
    S, err, sec = exp.sections, f"{exp.path}: eval:", exp.sections["eval"]
    flags = check_section(exp, "eval", sec)
    judge = sec.get("judge_deploy")
    if judge is not None:
        if not isinstance(judge, dict):
            raise UserError(f"{err} judge_deploy is a mapping of `mhsft deploy` flags")
        if flags.get("judge_api_url"):
            raise UserError(f"{err} give judge_api_url or judge_deploy, not both")
        judge = check_section(exp, "judge_deploy", judge)
        if not judge.get("model"):
            raise UserError(f"{err} judge_deploy needs model (the judge to serve)")
    held_out = bool("data" in S and S["data"].get("test_size"))
    if not flags.get("eval_dataset") and not held_out:
        raise UserError(f"{err} give eval_dataset (or data: test_size, to hold dialogues out)")
    # the adapter by default: what was trained, evaluated beside the base model in one load (an export checks
    # its merge against it); `finetuned: merged` evaluates the merged folder instead, in a load of its own
    finetuned = sec.get("finetuned") or "adapter"
    if finetuned not in ("merged", "adapter"):
        raise UserError(f"{err} finetuned is merged or adapter, not {finetuned!r}")
    if finetuned == "merged" and "export" not in S:
        raise UserError(f"{err} finetuned: merged needs an export section")
    inputs = [fingerprint(d) for d in _as_list(flags.get("eval_dataset"))]
    up = ("data",) if held_out else ()
    opts = {"judge_deploy": judge, "held_out": held_out}
    out = []
    if sec.get("baseline", True) is not False:
        if not exp.model:
            raise UserError(f"{exp.path}: the base model's evaluation needs model (top level)")
        base = Stage("eval_base", "evaluate the base model", flags, inputs + [fingerprint(exp.model)], up,
                     exp.exp_dir / "eval" / "base", keep_stale=True, options=opts)  # fmt: skip
        out.append(base)
    if "sft" in S:
        src = ("export",) if finetuned == "merged" else ("sft",)
        title = f"evaluate the fine-tuned model ({finetuned})"
        o = {**opts, "finetuned": finetuned}
        out.append(Stage("eval_finetuned", title, flags, inputs, up + src, exp.exp_dir / "eval" / "finetuned",
                         keep_stale=True, options=o))  # fmt: skip
    if not out:
        raise UserError(f"{err} nothing to evaluate (baseline: false and no sft section)")
    return out


# ----------------------------------------------------------------------------------------------- commands
def data_commands(st: Stage, exp: Experiment) -> tuple[list[str], list[str]]:
    """(clean or convert into EXP/data/clean.jsonl, inspect --json of the training split)."""
    d, o = st.out_dir, st.options
    sub = "clean" if o["clean"] else "convert"
    prep = ["data", sub, *to_argv(st.flags), "--output", str(d / "clean.jsonl")]
    prep += ["--rejects", str(d / "rejects.jsonl"), "--progress", "false"]
    inspect = ["data", "inspect", str(d / "train.jsonl"), "--json", "true", "--progress", "false"]
    if o["stats_model"]:
        inspect += ["--model", str(o["stats_model"])] + (["--use_hf", "true"] if exp.use_hf else [])
        inspect += ["--max_length", str(o["stats_max_length"])] if o["stats_max_length"] else []
    return prep, inspect


def _eval_flags(st: Stage, done: dict[str, dict]) -> dict:
    f = dict(st.flags)
    f["eval_dataset"] = _as_list(f.get("eval_dataset"))
    if st.options["held_out"] and done.get("data", {}).get("test"):
        f["eval_dataset"].append(done["data"]["test"])
    return f


def evaluated_together(base: Stage, ft: Stage, exp: Experiment) -> bool:
    """Whether the base model's and the fine-tuned adapter's evaluations can run as one `mhsft eval`, the adapter
    beside the base in one load: the same settings, and the adapter trained on that base."""
    trained_on = exp.sections.get("sft", {}).get("model") or exp.model
    return ft.options.get("finetuned") == "adapter" and base.flags == ft.flags and trained_on == exp.model


def command_together(
    base: Stage, ft: Stage, exp: Experiment, done: dict[str, dict], judge_url: str | None
) -> list[str]:
    """One `mhsft eval` for both eval stages: systems `base` and `finetuned` write EXP/eval/base and
    EXP/eval/finetuned, the folders the two stages own."""
    assert base.out_dir.parent == ft.out_dir.parent and (base.out_dir.name, ft.out_dir.name) == (
        "base",
        "finetuned",
    )
    target = {
        "model": exp.model,
        "use_hf": exp.use_hf or None,
        "adapters": [f"finetuned={done['sft']['checkpoint']}"],
    }
    argv = ["eval", *to_argv({**target, **_eval_flags(base, done)}), "--output_dir", str(base.out_dir.parent)]
    return argv + (["--judge_api_url", judge_url] if judge_url else [])


def command(st: Stage, exp: Experiment, done: dict[str, dict], judge_url: str | None = None) -> list[str]:
    """The argv of `mhsft STAGE` for every stage but data, from the outputs of the stages before it."""
    X = exp.exp_dir
    if st.name == "sft":
        f = dict(st.flags)
        if "data" in done:
            f["dataset"] = [done["data"]["train"]]
        # Resuming is always asked for: a stage that starts afresh first moves its old runs aside.
        return ["sft", *to_argv(f), "--output_dir", str(st.out_dir), "--resume_from_checkpoint", "auto"]
    if st.name == "export":
        return ["export", *to_argv(st.flags), "--adapters", done["sft"]["checkpoint"],
                "--output_dir", str(st.out_dir / "merged"), "--overwrite", "true"]  # fmt: skip
    if st.name.startswith("eval_"):
        f = _eval_flags(st, done)
        if st.name == "eval_base":
            target = {"model": exp.model, "use_hf": exp.use_hf or None}
        elif st.options["finetuned"] == "merged":
            target = {"model": done["export"]["model_dir"]}
        else:
            base = exp.sections["sft"].get("model") or exp.model
            target = {"model": base, "use_hf": exp.use_hf or None, "adapters": [done["sft"]["checkpoint"]]}
        argv = ["eval", *to_argv({**target, **f}), "--output_dir", str(st.out_dir)]
        return argv + (["--judge_api_url", judge_url] if judge_url else [])
    if st.name == "review":
        runs = [done["eval_base"]["eval_dir"], done["eval_finetuned"]["eval_dir"]]
        return ["review", "create", "--runs", *runs, *to_argv(st.flags), "--output_dir", str(st.out_dir)]
    if st.name == "report":
        argv = ["report"] + ([done["sft"]["run_dir"]] if "sft" in done else [])
        argv += ["--review", done["review"]["study"]] if "review" in done else []
        if "eval_finetuned" in done:
            argv.append(done["eval_finetuned"]["eval_dir"])
            argv += ["--baseline", done["eval_base"]["eval_dir"]] if "eval_base" in done else []
        elif "eval_base" in done:
            argv.append(done["eval_base"]["eval_dir"])
        if (X / "data" / "stats.json").is_file() and "data" in done:
            argv += ["--data_stats", str(X / "data" / "stats.json")]
        return [*argv, *to_argv(st.flags), "--output", str(st.out_dir)]
    raise ValueError(st.name)


def outputs(st: Stage) -> dict:
    """What a finished stage made (recorded in the state; a stage is only skipped while these exist)."""
    if st.name == "sft":
        runs = [p for p in st.out_dir.iterdir() if VERSION_RE.match(p.name)]
        for run in sorted(runs, key=lambda p: int(p.name[1:].split("-")[0]), reverse=True):
            if list_checkpoints(run):  # the later stages take its best checkpoint, else its newest
                ckpt, why = choose_checkpoint(run)
                print(why, flush=True)
                return {"run_dir": str(run), "checkpoint": str(ckpt)}
        raise UserError(f"sft finished but left no checkpoint in {st.out_dir}")
    if st.name == "export":
        return {"model_dir": str(st.out_dir / "merged")}
    if st.name == "report":
        return {"report": str(st.out_dir / "report.html")}
    if st.name == "review":
        return {"study": str(st.out_dir)}
    return {"eval_dir": str(st.out_dir)}
