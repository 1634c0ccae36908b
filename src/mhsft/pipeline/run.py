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
from pathlib import Path

from mhsft.client import ensure_loopback_no_proxy, free_port, stop_process, wait_for_server
from mhsft.files import write_json, write_text
from mhsft.pipeline.plan import (
    Experiment,
    Stage,
    command,
    data_commands,
    load_experiment,
    outputs,
    plan,
    to_argv,
)
from mhsft.utils import UserError, get_logger, is_secret_name, redact_argv, register_secret, settings_hash

log = get_logger()
STAGES = ("data", "sft", "export", "eval_base", "eval_finetuned", "report")
USAGE = """usage: mhsft run EXPERIMENT.yaml [--from STAGE] [--dry_run]

Run an experiment: data -> sft -> export -> eval_base, eval_finetuned -> report, each stage's output under the
file's exp_dir. Finished stages whose settings and inputs have not changed are skipped, so after a crash the
same command continues where it stopped (sft from its newest checkpoint).

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
def parse_cli(argv: list[str]) -> tuple[str, str | None, bool]:
    path, start, dry = None, None, False
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            print(USAGE.format(stages=", ".join(STAGES)))
            raise SystemExit(0)
        if a in ("--from", "--from_stage") or a.startswith(("--from=", "--from_stage=")):
            start = a.split("=", 1)[1] if "=" in a else next(it, None)
            if not start:
                raise UserError("--from needs a stage name")
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
    return path, start, dry


def _register_secrets(obj, name: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _register_secrets(v, k)
    elif isinstance(obj, str) and is_secret_name(name):
        register_secret(obj)


def main(argv: list[str]) -> int:
    path, start, dry = parse_cli(list(argv))
    exp = load_experiment(path)
    _register_secrets(exp.sections)
    stages = plan(exp)
    names = [s.name for s in stages]
    if start == "eval":
        start = next((n for n in names if n.startswith("eval_")), start)
    if start is not None and start not in names:
        raise UserError(f"--from {start}: this experiment's stages are {', '.join(names)}")
    state, runner = State(exp.exp_dir), StageRunner(exp)
    print(f"experiment {exp.path} -> {exp.exp_dir}", flush=True)
    done: dict[str, dict] = {}
    # SIGTERM (a scheduler's stop) unwinds like Ctrl-C, so that the judge server is stopped on the way out.
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    t_all, forced, st = time.time(), False, stages[0]
    try:
        for i, st in enumerate(stages, 1):
            forced = forced or st.name == start
            h = stage_hash(st, state)
            rec = state.get(st.name)
            head = f"== [{i}/{len(stages)}] {st.name}: {st.title}"
            if not forced and rec.get("status") == "done" and rec.get("hash") == h and _outputs_exist(rec):
                print(
                    f"{head}: skipped (done {rec.get('finished')}; settings and inputs unchanged)", flush=True
                )
                done[st.name] = rec["outputs"]
                continue
            resume = not forced and rec.get("hash") == h
            why = {
                "running": " (continuing the interrupted run)",
                "done": " (run again: its outputs are missing)",
            }
            print(head + (why.get(rec.get("status"), "") if resume else ""), flush=True)
            if dry:
                _dry_run(st, exp, done, state, h)
                continue
            if not resume:
                runner.discard(st)
            t0 = time.time()
            state.set(st.name, {"hash": h, "status": "running", "started": _now()})
            if st.name == "data":
                outs = runner.run_data(st)
            else:
                judge = st.options.get("judge_deploy")
                url = runner.start_judge(judge) if judge else None
                st.out_dir.mkdir(parents=True, exist_ok=True)
                runner.mhsft(command(st, exp, done, url))
                outs = outputs(st)
            if not any(s.options.get("judge_deploy") for s in stages[i:]):
                runner.stop_judge()  # the evaluations are over: give its memory back before the report
            finished = _now()
            state.set(st.name, {**state.get(st.name), "status": "done", "finished": finished,
                                "seconds": round(time.time() - t0, 1), "token": settings_hash([h, finished]),
                                "outputs": outs})  # fmt: skip
            done[st.name] = outs
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
    if not dry:
        print(f"\nexperiment done in {time.time() - t_all:.0f}s: {exp.exp_dir}", flush=True)
        if "report" in done:
            html = Path(done["report"]["report"])
            print(f"report: {html}\n        {html.with_suffix('.md')}", flush=True)
    return 0


def _dry_run(st: Stage, exp: Experiment, done: dict, state: State, h: str) -> None:
    X = "EXP"
    placeholder = {
        "data": {"train": f"{X}/data/train.jsonl", "test": f"{X}/data/test_dialogues.jsonl"},
        "sft": {"run_dir": f"{X}/sft/vN-...", "checkpoint": f"{X}/sft/vN-.../checkpoint-N"},
        "export": {"model_dir": f"{X}/export/merged"},
        "report": {"report": f"{X}/report/report.html"},
    }
    if st.name == "data":
        for argv in data_commands(st, exp):
            print("  would run: " + _show(argv))
    else:
        url = "http://127.0.0.1:PORT/v1" if st.options.get("judge_deploy") else None
        print("  would run: " + _show(command(st, exp, done, url)))
    done[st.name] = placeholder.get(st.name, {"eval_dir": str(st.out_dir)})
    state.stages[st.name] = {**state.get(st.name), "token": "planned-" + h}  # later stages: changed upstream


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
