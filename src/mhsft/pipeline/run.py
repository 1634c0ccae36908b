"""`mhsft run exp.yaml [--from STAGE]`: a whole experiment from one YAML file, finished stages skipped.

    exp_dir: output/demo            # every stage writes under it
    model: builtin:tiny             # the base model of every stage
    data:   {dataset: [a.jsonl], test_size: 5}
    sft:    {max_steps: 30, learning_rate: 1e-3}
    export: {merge_dtype: float32}
    eval:   {eval_dataset: [mcq.jsonl], limit: 20, judge_deploy: {model: builtin:tiny}}
    report: {}

Stages, in order: data (clean + split into EXP/data), sft (EXP/sft), export (EXP/export/merged), eval_base and
eval_finetuned (EXP/eval/{base,finetuned}), report (EXP/report). Each runs as its own `python -m mhsft STAGE`
process: memory is returned between stages, and a crash is an exit code. EXP/.mhsft/state.json records per stage a
hash of its settings, of the user's files it reads (size, mtime) and of the runs of the stages before it; a stage
whose hash is unchanged and whose outputs exist is skipped. A stage interrupted under the same hash continues its
own work (sft from its newest checkpoint, eval from its predictions cache); a changed or `--from`-forced stage
starts afresh, its previous sft/eval outputs moved to EXP/.mhsft/stale/. The file format is in mhsft.pipeline.plan.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mhsft.client import ensure_loopback_no_proxy, free_port, stop_process, unreachable, wait_for_server
from mhsft.files import write_json, write_text
from mhsft.folder_lock import LOCK_NAME, hold
from mhsft.pipeline.plan import (
    Experiment,
    Stage,
    command,
    command_together,
    data_commands,
    evaluated_together,
    load_experiment,
    outputs,
    plan,
    to_argv,
)
from mhsft.utils import UserError, get_logger, is_secret_name, redact_argv, register_secret, settings_hash

log = get_logger()
STAGES = ("data", "sft", "export", "eval_base", "eval_finetuned", "report")
USAGE = """usage: mhsft run EXPERIMENT.yaml [--exp_dir DIR] [--from STAGE] [--dry_run]

Run an experiment: data -> sft -> export -> eval_base, eval_finetuned -> report, each stage's output under the
file's exp_dir. Finished stages whose settings and inputs have not changed are skipped, so after a crash the
same command continues where it stopped (sft from its newest checkpoint).

  --exp_dir DIR  write under DIR instead of the file's exp_dir (one experiment file, several folders)
  --from STAGE   run STAGE and every stage after it, finished or not ({stages}; eval = the first eval)
  --dry_run      print each stage's command line and whether it would run; run nothing

Settings use each stage's flag names (see examples/*.yaml and `mhsft STAGE --help`).
"""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class State:
    """EXP/.mhsft/state.json: per stage {hash, status running|done, started, finished, token, outputs}, written
    atomically at every change, so a kill at any moment leaves the last consistent state."""

    def __init__(self, exp_dir: Path):
        self.path = exp_dir / ".mhsft" / "state.json"
        self.stages: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.stages = dict(json.loads(self.path.read_text(encoding="utf-8"))["stages"])
            except (ValueError, OSError, KeyError, TypeError):
                log.warning(f"{self.path} is unreadable: every stage runs again")

    def get(self, name: str) -> dict:
        return self.stages.get(name, {})

    def set(self, name: str, rec: dict) -> None:
        self.stages[name] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"version": 1, "stages": self.stages})


def stage_hash(st: Stage, state: State) -> str:
    """Settings + the user's files + the runs of the stages before it (their tokens change when they rerun)."""
    ups = {u: state.get(u).get("token") for u in st.upstream}
    return settings_hash(
        {"stage": st.name, "flags": st.flags, "options": st.options, "inputs": st.inputs, "up": ups}
    )


def _outputs_exist(rec: dict) -> bool:
    paths = [v for v in (rec.get("outputs") or {}).values() if isinstance(v, str)]
    return bool(paths) and all(Path(p).exists() for p in paths)


# ----------------------------------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when `mhsft run` dies, even by SIGKILL, so that no orphaned trainer or
    judge server keeps running (and writing) behind a rerun."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _popen_kwargs() -> dict:
    return {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}


class StageFailed(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _show(argv: list[str]) -> str:
    return "mhsft " + " ".join(shlex.quote(a) for a in redact_argv(argv))


class StageRunner:
    """Runs the stages' processes, the judge server, and the data stage's split."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.judge: subprocess.Popen | None = None
        self.judge_url: str | None = None

    def mhsft(self, argv: list[str], capture: bool = False) -> str:
        print("$ " + _show(argv), flush=True)
        p = subprocess.run(
            [sys.executable, "-m", "mhsft", *argv],
            stdout=subprocess.PIPE if capture else None,
            text=True,
            **_popen_kwargs(),
        )
        if p.returncode != 0:
            raise StageFailed(p.returncode)
        return p.stdout or ""

    def start_judge(self, flags: dict) -> str:
        """`mhsft deploy FLAGS` on a loopback port, once per `mhsft run`; returns its /v1 URL."""
        if self.judge_url:
            return self.judge_url
        ensure_loopback_no_proxy()
        # the same port from run to run when it is free: the judge URL is part of the eval stage's cache key
        try:
            port = free_port(20000 + int(settings_hash(flags), 16) % 20000)
        except OSError:
            raise UserError("no free loopback port for the judge server") from None
        argv = ["deploy", *to_argv(flags), "--host", "127.0.0.1", "--port", str(port)]
        logf = self.exp.exp_dir / ".mhsft" / "judge_deploy.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        print(f"starting the judge: {_show(argv)}  (log: {logf})", flush=True)
        with open(logf, "ab") as fh:
            self.judge = subprocess.Popen(
                [sys.executable, "-m", "mhsft", *argv], stdout=fh, stderr=subprocess.STDOUT, **_popen_kwargs()
            )
        url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_for_server(url, timeout=900, proc=self.judge)
        except (TimeoutError, RuntimeError) as e:
            self.stop_judge()
            raise UserError(f"the judge server did not start ({e}); see {logf}") from None
        self.judge_url = url
        return url

    def stop_judge(self) -> None:
        p, self.judge, self.judge_url = self.judge, None, None
        if p is None:
            return
        stop_process(p)
        print("stopped the judge server", flush=True)

    def discard(self, st: Stage) -> None:
        """Room for a fresh run of a stage: training runs and evaluations go to .mhsft/stale/, the rest
        (data, merged model, report: quick to remake) is deleted."""
        if not st.out_dir.exists():
            return
        if st.keep_stale:
            stale = self.exp.exp_dir / ".mhsft" / "stale" / f"{st.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            stale.parent.mkdir(parents=True, exist_ok=True)
            os.replace(st.out_dir, stale)
            print(f"previous {st.name} outputs moved to {stale}", flush=True)
        elif st.out_dir.is_dir():
            shutil.rmtree(st.out_dir)

    def run_data(self, st: Stage) -> dict:
        """Clean (or convert) into EXP/data, hold `test_size` dialogues out (seeded), and write the training
        split's statistics (tokens with the training tokenizer and max_length) to stats.json for the report."""
        d = st.out_dir
        d.mkdir(parents=True, exist_ok=True)
        prep, inspect = data_commands(st, self.exp)
        summary = self.mhsft(prep, capture=True)
        sys.stdout.write(summary)
        lines = [ln for ln in (d / "clean.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
        n_test = st.options["test_size"]
        if n_test >= len(lines) > 0 or not lines:
            raise UserError(
                f"data: {len(lines)} usable dialogues; test_size {n_test} leaves none to train on"
            )
        test = set(random.Random(st.flags.get("seed", 42)).sample(range(len(lines)), n_test))
        _write_lines(d / "train.jsonl", [ln for i, ln in enumerate(lines) if i not in test])
        out = {"train": str(d / "train.jsonl")}
        if n_test:
            _write_lines(d / "test_dialogues.jsonl", [ln for i, ln in enumerate(lines) if i in test])
            out["test"] = str(d / "test_dialogues.jsonl")
        print(f"{len(lines) - n_test} dialogues to train on, {n_test} held out for evaluation", flush=True)
        stats = json.loads(self.mhsft(inspect, capture=True))
        stats["prepared"] = {
            "sources": st.flags["dataset"],
            "train": len(lines) - n_test,
            "test": n_test,
            "summary": [ln.strip() for ln in summary.splitlines() if ln.strip()],
        }
        write_json(d / "stats.json", stats)
        return out


def _write_lines(path: Path, lines: list[str]) -> None:
    write_text(path, "".join(ln + "\n" for ln in lines))


# ----------------------------------------------------------------------------------------------- CLI
def parse_cli(argv: list[str]) -> tuple[str, str | None, bool, str | None]:
    """(experiment file, --from stage, --dry_run, --exp_dir)."""
    path, start, dry, exp_dir = None, None, False, None
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            print(USAGE.format(stages=", ".join(STAGES)))
            raise SystemExit(0)
        if a in ("--from", "--from_stage") or a.startswith(("--from=", "--from_stage=")):
            start = a.split("=", 1)[1] if "=" in a else next(it, None)
            if not start:
                raise UserError("--from needs a stage name")
        elif a in ("--exp_dir", "--exp-dir") or a.startswith(("--exp_dir=", "--exp-dir=")):
            exp_dir = a.split("=", 1)[1] if "=" in a else next(it, None)
            if not exp_dir:
                raise UserError("--exp_dir needs a folder")
        elif a in ("--dry_run", "--dry-run"):
            dry = True
        elif a.startswith("-"):
            raise UserError(f"mhsft run: unrecognized argument {a}; see mhsft run --help")
        elif path is None:
            path = a
        else:
            raise UserError("mhsft run takes one experiment file")
    if path is None:
        raise UserError("mhsft run: give the experiment file, e.g. mhsft run examples/demo.yaml")
    return path, start, dry, exp_dir


def _register_secrets(obj, name: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _register_secrets(v, k)
    elif isinstance(obj, str) and is_secret_name(name):
        register_secret(obj)


def main(argv: list[str]) -> int:
    path, start, dry, exp_dir = parse_cli(list(argv))
    exp = load_experiment(path, exp_dir)
    _register_secrets(exp.sections)
    stages = plan(exp)
    first = _first_forced([s.name for s in stages], start)  # stages from here on run whether done or not
    held = contextlib.ExitStack()
    if not dry:  # one `mhsft run` per experiment folder: a second would run the same stages into it
        held.enter_context(hold(exp.exp_dir / ".mhsft" / LOCK_NAME, f"the experiment folder {exp.exp_dir}"))
    state, runner = State(exp.exp_dir), StageRunner(exp)
    print(f"experiment {exp.path} -> {exp.exp_dir}", flush=True)
    if not dry:
        warn_if_judge_down(stages, state)
    done: dict[str, dict] = {}
    # SIGTERM (a scheduler's stop) unwinds like Ctrl-C, so that the judge server is stopped on the way out.
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    t_all, st = time.time(), stages[0]
    try:
        i = 0
        while i < len(stages):
            st = stages[i]
            group, i = _next_group(stages, i, first, state, exp)
            if not group:
                done[st.name] = state.get(st.name)["outputs"]
            elif dry:
                _dry_run(group, exp, done, state)
            else:
                run_group(group, runner, exp, done, state, later=stages[i:])
    except StageFailed as e:
        log.error(
            f"error: stage {st.name} failed (exit {e.code}); fix the cause and run `mhsft run {exp.path}` again: "
            "finished stages are skipped"
        )
        return 1
    finally:
        runner.stop_judge()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        held.close()
    if not dry:
        print(f"\nexperiment done in {time.time() - t_all:.0f}s: {exp.exp_dir}", flush=True)
        if "report" in done:
            html = Path(done["report"]["report"])
            print(f"report: {html}\n        {html.with_suffix('.md')}", flush=True)
    return 0


def warn_if_judge_down(stages: list[Stage], state: State) -> None:
    """An external judge (eval's judge_api_url) that does not answer now is said before the stages that come first,
    not when the evaluation reaches it after training. A warning, not an error: a judge may be started later, and
    the evaluation itself stops with its own error if it is still down then."""
    seen = set()
    for st in stages:
        url = st.flags.get("judge_api_url") if st.name.startswith("eval_") else None
        if not url or url in seen or state.get(st.name).get("status") == "done":
            continue
        seen.add(url)
        if reason := unreachable(url):
            log.warning(
                f"the judge at {url} does not answer now ({reason}); {st.name} needs it after the stages "
                "before it: start it by then (a failed evaluation is run again alone: finished stages are skipped)"
            )


def _first_forced(names: list[str], start: str | None) -> int:
    """The index of the --from stage (`eval`: the first evaluation), from which stages run whether done or not;
    past the end without --from."""
    if start == "eval":
        start = next((n for n in names if n.startswith("eval_")), start)
    if start is not None and start not in names:
        raise UserError(f"--from {start}: this experiment's stages are {', '.join(names)}")
    return names.index(start) if start else len(names)


def _next_group(
    stages: list[Stage], i: int, first: int, state: State, exp: Experiment
) -> tuple[list[Decision], int]:
    """The stage at `i` (with eval_finetuned when it runs in eval_base's `mhsft eval`), its heading printed:
    (what runs, [] when the stage is skipped; the index of the stage after them)."""
    st, d = stages[i], decide(stages[i], state, i >= first)
    head = f"== [{i + 1}/{len(stages)}] {st.name}: {st.title}"
    i += 1
    if not d.run:
        rec = state.get(st.name)
        print(f"{head}: skipped (done {rec.get('finished')}; settings and inputs unchanged)", flush=True)
        return [], i
    print(head + d.why, flush=True)
    group = [d]
    nxt = stages[i] if i < len(stages) else None
    if st.name == "eval_base" and nxt is not None and evaluated_together(st, nxt, exp):
        d = decide(nxt, state, i >= first)
        if d.run:  # the fine-tuned adapter beside the base, in one `mhsft eval` (one load)
            i += 1
            print(
                f"== [{i}/{len(stages)}] {nxt.name}: {nxt.title}{d.why}: with {st.name}, in one load",
                flush=True,
            )
            group.append(d)
    return group, i


@dataclass
class Decision:
    """Whether a stage runs: `run` false when it is done under the same hash with its outputs in place (and not
    forced by --from); `resume` when it continues work started under the same hash."""

    stage: Stage
    hash: str
    run: bool
    resume: bool
    why: str = ""


def decide(st: Stage, state: State, forced: bool) -> Decision:
    h = stage_hash(st, state)
    rec = state.get(st.name)
    if not forced and rec.get("status") == "done" and rec.get("hash") == h and _outputs_exist(rec):
        return Decision(st, h, run=False, resume=True)
    resume = not forced and rec.get("hash") == h
    why = {"running": " (continuing the interrupted run)", "done": " (run again: its outputs are missing)"}
    return Decision(st, h, run=True, resume=resume, why=why.get(rec.get("status"), "") if resume else "")


def run_group(group: list[Decision], runner: StageRunner, exp: Experiment, done: dict, state: State,
              later: list[Stage]) -> None:  # fmt: skip
    """Run a stage (or the two eval stages as one `mhsft eval`) and record it done with its outputs."""
    t0 = time.time()
    for d in group:
        if not d.resume:
            runner.discard(d.stage)
        state.set(d.stage.name, {"hash": d.hash, "status": "running", "started": _now()})
    st = group[0].stage
    if st.name == "data":
        outs = [runner.run_data(st)]
    else:
        judge = st.options.get("judge_deploy")
        url = runner.start_judge(judge) if judge else None
        for d in group:
            d.stage.out_dir.mkdir(parents=True, exist_ok=True)
        together = len(group) > 1
        runner.mhsft(
            command_together(st, group[1].stage, exp, done, url) if together else command(st, exp, done, url)
        )
        outs = [outputs(d.stage) for d in group]
    if not any(s.options.get("judge_deploy") for s in later):
        runner.stop_judge()  # the evaluations are over: give its memory back before the report
    finished = _now()
    for d, o in zip(group, outs):
        state.set(d.stage.name, {**state.get(d.stage.name), "status": "done", "finished": finished,
                                 "seconds": round(time.time() - t0, 1), "token": settings_hash([d.hash, finished]),
                                 "outputs": o})  # fmt: skip
        done[d.stage.name] = o


def _dry_run(group: list[Decision], exp: Experiment, done: dict, state: State) -> None:
    X = "EXP"
    placeholder = {
        "data": {"train": f"{X}/data/train.jsonl", "test": f"{X}/data/test_dialogues.jsonl"},
        "sft": {"run_dir": f"{X}/sft/vN-...", "checkpoint": f"{X}/sft/vN-.../checkpoint-N"},
        "export": {"model_dir": f"{X}/export/merged"},
        "report": {"report": f"{X}/report/report.html"},
        "review": {"study": f"{X}/review"},
    }
    st = group[0].stage
    if st.name == "data":
        for argv in data_commands(st, exp):
            print("  would run: " + _show(argv))
    else:
        url = "http://127.0.0.1:PORT/v1" if st.options.get("judge_deploy") else None
        argv = (
            command_together(st, group[1].stage, exp, done, url)
            if len(group) > 1
            else command(st, exp, done, url)
        )
        print("  would run: " + _show(argv))
    for d in group:
        done[d.stage.name] = placeholder.get(d.stage.name, {"eval_dir": str(d.stage.out_dir)})
        # later stages: changed upstream
        state.stages[d.stage.name] = {**state.get(d.stage.name), "token": "planned-" + d.hash}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
