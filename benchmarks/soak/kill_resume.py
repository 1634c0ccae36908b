"""SIGKILL-and-resume campaign (issue 19): `mhsft sft`, `mhsft export` and `mhsft run` on builtin:tiny (float32, CPU)
killed at random points and at chosen places inside their saves, each rerun with the same command until it ends,
and the result compared with an uninterrupted run.

    python benchmarks/soak/kill_resume.py            # full: >= 20 sft kill points, 8 export, 5 run (`make soak`)
    python benchmarks/soak/kill_resume.py --quick    # CI (tests/soak/test_kill_resume.py): 3 + 2 + 0

- sft (best checkpoint, early stopping, rotation and LoRA dropout all on, so that their state must survive too):
  after every kill only complete checkpoints are in sight (an interrupted save leaves a hidden temporary folder)
  and best.json names one of them; `--resume_from_checkpoint auto` continues; at the end the final adapter equals
  the uninterrupted run's within 1e-5 and the logged losses, evaluations, end line and best.json are equal.
- export: a killed export leaves no output folder, or a complete one (never one that looks complete and is not);
  the rerun completes and its tensors equal the uninterrupted export's.
- run: `mhsft run exp.yaml` killed (its stage processes die with it) and rerun until it ends: every stage done, and
  the adapter, merged weights and evaluation equal the uninterrupted experiment's. CI runs none (three process
  starts, a third of the quick campaign's time); tests/pipeline/test_run.py kills `mhsft run` inside its sft stage.
Kill points: a random time into the run (scaled by the uninterrupted run's duration), right after a chosen logged
training step (watching logging.jsonl), and inside a save (pause_shim.py: inside the checkpoint's temporary folder,
or before it is renamed into place). Prints a table, writes JSON, exits 1 when anything did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_throughput import subprocess_env  # noqa: E402  (after the path)

DATA = ROOT / "examples" / "data"
SHIM = Path(__file__).resolve().parent / "pause_shim.py"
TIMINGS = ("tokens_per_s", "elapsed_s", "eta_s", "memory_gib")
ATTEMPT_TIMEOUT = 600
# A constant high learning rate makes the validation loss fall, wobble and rise: the patience counter climbs and
# resets, early stopping ends the run at step 21 of 30, and the best checkpoint (kept by rotation) is not the last.
SFT = ["sft", "--model", "builtin:tiny", "--dataset", str(DATA / "demo_sharegpt.jsonl"), "--report_to", "none",
       "--torch_dtype", "float32", "--max_length", "256", "--per_device_train_batch_size", "2",
       "--gradient_accumulation_steps", "2", "--packing", "true", "--max_steps", "30", "--save_steps", "3",
       "--logging_steps", "1", "--learning_rate", "3", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
       "--max_grad_norm", "0", "--split_dataset_ratio", "0.2", "--per_device_eval_batch_size", "8",
       "--save_total_limit", "2", "--load_best_model_at_end", "true", "--early_stopping_patience", "3",
       "--gradient_checkpointing", "false", "--resume_from_checkpoint", "auto"]  # fmt: skip


def env() -> dict:
    # one thread per process: the same arithmetic in every attempt, and two processes fit two cores
    return {**subprocess_env(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------------- one attempt
def launch(argv: list[str], log: Path, pause: str | None, marker: Path) -> subprocess.Popen:
    """`mhsft ARGV` (through pause_shim.py when `pause` is POINT:N), output appended to `log`."""
    e = env()
    cmd = [sys.executable, "-m", "mhsft", *argv]
    if pause:
        cmd = [sys.executable, str(SHIM), *argv]
        e |= {"SOAK_PAUSE_AT": pause, "SOAK_MARKER": str(marker)}
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=e, cwd=log.parent)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process as a user's `kill -9` would; its children (`mhsft run`'s stages) die with it
    (PR_SET_PDEATHSIG), and are waited for, so that the rerun starts when they are gone."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=30)
    if alive:
        raise RuntimeError(f"children outlived the killed process: {[p.pid for p in alive]}")


def attempt(argv: list[str], point: dict | None, log: Path, watch) -> dict:
    """Run `mhsft ARGV`; kill it at `point` ({mode: time|step|save, at}) if it gets there first.
    Returns {killed, rc, seconds}: killed false means it ended by itself (rc its exit code)."""
    marker = log.parent / "pause.marker"
    marker.unlink(missing_ok=True)
    mode = point["mode"] if point else None
    proc = launch(argv, log, point["at"] if mode == "save" else None, marker)
    t0 = time.monotonic()
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        due = (mode == "time" and elapsed >= point["at"]) or (mode == "step" and watch() >= point["at"])
        if due or (mode == "save" and marker.exists()) or elapsed > ATTEMPT_TIMEOUT:
            kill(proc)
            return {
                "killed": True,
                "rc": None,
                "seconds": round(elapsed, 2),
                "timeout": elapsed > ATTEMPT_TIMEOUT,
            }
        time.sleep(0.005 if mode == "step" else 0.02)
    return {"killed": False, "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 2)}


def hung(res: dict) -> list[str]:
    """An attempt killed because it ran past ATTEMPT_TIMEOUT is a failure, not a kill point."""
    return [f"an attempt ran past {ATTEMPT_TIMEOUT} s"] if res.get("timeout") else []


def run_through(argv: list[str], log: Path) -> float:
    """An uninterrupted run; its wall time (raises if it failed)."""
    res = attempt(argv, None, log, lambda: 0)
    if res["rc"] != 0:
        raise RuntimeError(f"`mhsft {' '.join(argv[:1])}` failed (exit {res['rc']}); see {log}")
    return res["seconds"]


# ----------------------------------------------------------------------------------------------- what a run left
def newest_run(out: Path) -> Path | None:
    runs = [p for p in out.glob("v*-*") if p.is_dir()] if out.is_dir() else []
    return max(runs, key=lambda p: int(p.name[1:].split("-")[0])) if runs else None


def logged_step(out: Path) -> int:
    """The last training step logged in the newest run under `out` (0 before the first)."""
    run = newest_run(out)
    if run is None or not (run / "logging.jsonl").is_file():
        return 0
    step = 0
    for line in (run / "logging.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in row:
            step = max(step, int(row["step"]))
    return step


def visible_checkpoints_complete(run: Path) -> list[str]:
    """Problems a kill left in sight: a checkpoint folder without its completion marker or with unreadable
    weights, a best.json naming no complete checkpoint."""
    from safetensors.torch import load_file

    from mhsft.checkpoint import BEST_FILE, CKPT_RE, STATE_FILE

    bad = []
    for c in run.iterdir():
        if CKPT_RE.match(c.name):
            if not (c / STATE_FILE).is_file():
                bad.append(f"{c.name}: no {STATE_FILE}")
                continue
            try:
                load_file(str(c / "adapter_model.safetensors"))
            except Exception as e:  # a truncated file must be reported, whatever the reader raises
                bad.append(f"{c.name}: unreadable adapter ({type(e).__name__})")
    if (run / BEST_FILE).is_file():
        name = json.loads((run / BEST_FILE).read_text(encoding="utf-8"))["best_checkpoint"]
        if not (run / name / STATE_FILE).is_file():
            bad.append(f"best.json names {name}, not a complete checkpoint")
    return bad


def stable_log(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def compare_runs(run: Path, ref: Path) -> dict:
    """The final adapter (the run's final_checkpoint: its best) and the logs of a resumed run against the
    uninterrupted one."""
    from safetensors.torch import load_file

    log, ref_log = stable_log(run), stable_log(ref)
    final, ref_final = log[-1].get("final_checkpoint"), ref_log[-1].get("final_checkpoint")
    a = load_file(str(run / final / "adapter_model.safetensors")) if final else {}
    b = load_file(str(ref / ref_final / "adapter_model.safetensors"))
    diff = (
        max((float((a[k] - b[k]).abs().max()) for k in b), default=float("inf"))
        if a.keys() == b.keys()
        else None
    )
    losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
    ref_losses = [(r["step"], r["loss"]) for r in ref_log if "loss" in r]
    same_steps = [s for s, _ in losses] == [s for s, _ in ref_losses]
    loss_diff = max(abs(x - y) for (_, x), (_, y) in zip(losses, ref_losses)) if same_steps else None
    best = json.loads((run / "best.json").read_text()) if (run / "best.json").is_file() else None
    ref_best = json.loads((ref / "best.json").read_text())
    return {"final_checkpoint": final, "adapter_max_abs_diff": diff, "loss_max_abs_diff": loss_diff,
            "logs_equal": log == ref_log, "best_equal": best == ref_best,
            "equal": final == ref_final and diff is not None and diff <= 1e-5 and loss_diff == 0 and log == ref_log
            and best == ref_best}  # fmt: skip


# ----------------------------------------------------------------------------------------------- sft
def sft_point(rng: random.Random, i: int, ref_seconds: float, out: Path, quick: bool) -> dict:
    """The i-th kill point: in turn a random time, a logged step, a pause inside a checkpoint's folder, a pause
    before its rename. A save pause is at one of the saves still to come. CI's three take no random time: on a
    slow machine most of a tiny run is the process start, and a late one missed the run (a wasted trial)."""
    done = logged_step(out)
    modes = ("time", "step", "checkpoint-write", "checkpoint-publish")[1 if quick else 0 :]
    mode = modes[i % len(modes)]
    if mode == "time":
        return {"mode": "time", "at": round(rng.uniform(0.25, 0.95) * ref_seconds, 2)}
    if mode == "step":
        return {"mode": "step", "at": rng.randint(done + 1, max(done + 1, 20))}
    saves_left = max(1, (21 - done) // 3)
    return {"mode": "save", "at": f"{mode}:{rng.randint(1, saves_left)}"}


def sft_campaign(work: Path, n_kills: int, quick: bool, rng: random.Random) -> dict:
    ref_out = work / "sft-ref"
    ref_out.mkdir(parents=True)
    ref_seconds = run_through([*SFT, "--output_dir", str(ref_out)], ref_out / "log.txt")
    ref = newest_run(ref_out)
    points, trials, i = [], [], 0
    while sum(p["killed"] for p in points) < n_kills and len(trials) < 3 * n_kills:
        out = work / f"sft-{len(trials)}"
        out.mkdir()
        argv, log = [*SFT, "--output_dir", str(out)], out / "log.txt"
        # CI's three kill points in one trial (each trial costs an uninterrupted final attempt)
        kills_here, ended, failure = (3 if quick else rng.randint(1, 3)), False, None
        for _ in range(kills_here + 1):
            point = sft_point(rng, i, ref_seconds, out, quick) if kills_here > 0 else None
            run = newest_run(out)
            tmp_before = {p.name for p in run.glob(".tmp-checkpoint-*")} if run else set()
            res = attempt(argv, point, log, lambda out=out: logged_step(out))
            if not res["killed"]:
                ended, failure = res["rc"] == 0, None if res["rc"] == 0 else f"exit {res['rc']}"
                break
            i, kills_here = i + 1, kills_here - 1
            run = newest_run(out)
            tmp_after = {p.name for p in run.glob(".tmp-checkpoint-*")} if run else set()
            points.append({"trial": len(trials), **point, "killed": True, "seconds": res["seconds"],
                           "logged_step": logged_step(out), "mid_save": bool(tmp_after - tmp_before),
                           "problems": hung(res) + (visible_checkpoints_complete(run) if run else [])})  # fmt: skip
        cmp = compare_runs(newest_run(out), ref) if ended else {"equal": False}
        trials.append({"trial": len(trials), "ended": ended, "failure": failure, **cmp})
        for p in points:
            if p["trial"] == trials[-1]["trial"]:
                p["resumed_and_equal"] = cmp["equal"]
    return summarize("sft", points, trials, ref_seconds)


# ----------------------------------------------------------------------------------------------- export
def export_argv(ckpt: Path, out: Path) -> list[str]:
    return ["export", "--ckpt_dir", str(ckpt), "--merge_dtype", "float32", "--output_dir", str(out),
            "--overwrite", "true"]  # fmt: skip


def export_state(out: Path, ref: Path) -> str:
    """What a killed export left at its output: none | complete (and equal to the reference) | a problem."""
    from mhsft.checkpoint import EXPORT_META

    if not out.exists():
        return "none"
    if not (out / EXPORT_META).is_file():
        return "PROBLEM: an output folder without mhsft_export.json"
    return "complete" if exports_equal(out, ref) else "PROBLEM: complete-looking but different"


def exports_equal(out: Path, ref: Path) -> bool:
    from safetensors.torch import load_file

    from mhsft.files import read_json

    a, b = sorted(out.glob("*.safetensors")), sorted(ref.glob("*.safetensors"))
    if [p.name for p in a] != [p.name for p in b]:
        return False
    for x, y in zip(a, b):
        wa, wb = load_file(str(x)), load_file(str(y))
        if wa.keys() != wb.keys() or any(not wa[k].equal(wb[k]) for k in wb):
            return False
    keys = ("adapter_sha256", "merge_dtype", "base_model", "shards")
    ma, mb = read_json(out / "mhsft_export.json"), read_json(ref / "mhsft_export.json")
    return read_json(out / "config.json") == read_json(ref / "config.json") and all(
        ma.get(k) == mb.get(k) for k in keys
    )


def export_campaign(work: Path, ckpt: Path, n_kills: int, quick: bool, rng: random.Random) -> dict:
    ref = work / "export-ref" / "merged"
    ref.parent.mkdir(parents=True)
    ref_seconds = run_through(export_argv(ckpt, ref), ref.parent / "log.txt")
    points, trials = [], []
    # CI's few kill points all land inside the export; the full campaign adds random times
    modes = (
        ("export-write", "export-publish") if quick else ("time", "export-write", "export-publish", "time")
    )
    while len(points) < n_kills and len(trials) < 3 * n_kills:
        d = work / f"export-{len(trials)}"
        d.mkdir()
        out, ended = d / "merged", False
        # every kill mode both into a new folder and over a complete earlier export (--overwrite)
        mode, over = modes[len(trials) % len(modes)], (len(trials) // len(modes)) % 2 == 1
        if over:
            shutil.copytree(ref, out)
        point = {"mode": "time", "at": round(rng.uniform(0.2, 0.95) * ref_seconds, 2)}
        if mode != "time":
            point = {"mode": "save", "at": f"{mode}:1"}
        for p in (point, None):
            res = attempt(export_argv(ckpt, out), p, d / "log.txt", lambda: 0)
            if not res["killed"]:
                ended = res["rc"] == 0
                break
            points.append({"trial": len(trials), **p, "over_an_export": over, "seconds": res["seconds"],
                           "killed": True, "left": export_state(out, ref), "hung": hung(res)})  # fmt: skip
        equal = ended and exports_equal(out, ref)
        trials.append({"trial": len(trials), "ended": ended, "equal": equal})
        for p in points:
            if p["trial"] == trials[-1]["trial"]:
                p["resumed_and_equal"] = equal
                p["problems"] = p.pop("hung") + ([p["left"]] if p["left"].startswith("PROBLEM") else [])
    return summarize("export", points, trials, ref_seconds)


# ----------------------------------------------------------------------------------------------- mhsft run
def experiment(exp_dir: Path, quick: bool) -> str:
    """The full campaign's experiment: data (3 dialogues held out), sft with a validation split (the later stages
    take its best checkpoint), export and the fine-tuned model's evaluation. CI's: sft alone (each stage costs a
    process start, most of a tiny stage's time)."""
    import yaml

    sft = {"max_steps": 6 if quick else 12, "save_steps": 3, "logging_steps": 1, "max_length": 256,
           "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
           "report_to": ["none"], "torch_dtype": "float32", "learning_rate": 1e-2, "split_dataset_ratio": 0.2,
           "per_device_eval_batch_size": 8}  # fmt: skip
    exp: dict = {"exp_dir": str(exp_dir), "model": "builtin:tiny"}
    if quick:
        exp["sft"] = {**sft, "dataset": [str(DATA / "demo_sharegpt.jsonl")]}
    else:
        exp["data"] = {"dataset": [str(DATA / "demo_sharegpt.jsonl")], "test_size": 3}
        exp["sft"] = sft
        exp["export"] = {"merge_dtype": "float32", "verify": False}
        exp["eval"] = {"eval_dataset": [str(DATA / "demo_mcq.jsonl")], "baseline": False, "limit": 4,
                       "max_new_tokens": 8}  # fmt: skip
    return yaml.safe_dump(exp, allow_unicode=True, sort_keys=False)


def experiment_outcome(exp_dir: Path) -> dict:
    """What a finished experiment holds, with paths made relative to it (to compare two experiments)."""
    from safetensors.torch import load_file

    state = json.loads((exp_dir / ".mhsft" / "state.json").read_text(encoding="utf-8"))["stages"]
    ckpt = Path(state["sft"]["outputs"]["checkpoint"])
    out = {"status": {k: v["status"] for k, v in state.items()}, "checkpoint": ckpt.name,
           "adapter": load_file(str(ckpt / "adapter_model.safetensors"))}  # fmt: skip
    if "data" in state:
        out["train"] = (exp_dir / "data" / "train.jsonl").read_bytes()
    if "export" in state:
        out["merged"] = load_file(str(exp_dir / "export" / "merged" / "model.safetensors"))
    if "eval_finetuned" in state:
        out["metrics"] = json.loads((exp_dir / "eval" / "finetuned" / "results.json").read_text())["metrics"]
    return out


def outcomes_equal(a: dict, b: dict) -> tuple[bool, float | None]:
    if a.keys() != b.keys() or a["adapter"].keys() != b["adapter"].keys():
        return False, None
    diff = max(float((a["adapter"][k] - b["adapter"][k]).abs().max()) for k in b["adapter"])
    merged = all(a["merged"][k].equal(b["merged"][k]) for k in b.get("merged", {}))
    same = all(a.get(k) == b.get(k) for k in ("status", "checkpoint", "train", "metrics"))
    return same and merged and diff <= 1e-5, diff


def run_campaign(work: Path, n_kills: int, quick: bool, rng: random.Random) -> dict:
    ref_dir = work / "run-ref"
    ref_dir.mkdir(parents=True)
    (ref_dir / "exp.yaml").write_text(experiment(ref_dir / "exp", quick), encoding="utf-8")
    ref_seconds = run_through(["run", str(ref_dir / "exp.yaml")], ref_dir / "log.txt")
    ref = experiment_outcome(ref_dir / "exp")
    points, trials = [], []
    while len(points) < n_kills and len(trials) < 3 * n_kills:
        d = work / f"run-{len(trials)}"
        d.mkdir()
        (d / "exp.yaml").write_text(experiment(d / "exp", quick), encoding="utf-8")
        argv, ended = ["run", str(d / "exp.yaml")], False
        kills_here = 1 if quick else rng.randint(1, 2)
        for k in range(kills_here + 1):
            point = (
                {"mode": "time", "at": round(rng.uniform(0.1, 0.9) * ref_seconds, 2)}
                if k < kills_here
                else None
            )
            res = attempt(argv, point, d / "log.txt", lambda: 0)
            if not res["killed"]:
                ended = res["rc"] == 0
                break
            state = d / "exp" / ".mhsft" / "state.json"
            stages = json.loads(state.read_text())["stages"] if state.is_file() else {}
            points.append({"trial": len(trials), **point, "seconds": res["seconds"], "killed": True,
                           "stages": {k: v["status"] for k, v in stages.items()}, "problems": hung(res)})  # fmt: skip
        equal, diff = outcomes_equal(experiment_outcome(d / "exp"), ref) if ended else (False, None)
        trials.append({"trial": len(trials), "ended": ended, "equal": equal, "adapter_max_abs_diff": diff})
        for p in points:
            if p["trial"] == trials[-1]["trial"]:
                p["resumed_and_equal"] = equal
    return summarize("run", points, trials, ref_seconds)


# ----------------------------------------------------------------------------------------------- report
def summarize(name: str, points: list[dict], trials: list[dict], ref_seconds: float) -> dict:
    ok = [p for p in points if p.get("resumed_and_equal") and not p.get("problems")]
    return {"campaign": name, "uninterrupted_seconds": ref_seconds, "kill_points": len(points),
            "mid_save": sum(bool(p.get("mid_save")) or p["mode"] == "save" for p in points),
            "resumed_and_equal": len(ok), "problems": [x for p in points for x in p.get("problems", [])],
            "trials": trials, "points": points}  # fmt: skip


def table(results: list[dict]) -> str:
    head = (
        f"{'campaign':<9}{'kill points':>12}{'in a save':>11}{'resumed = uninterrupted':>25}{'problems':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = f"{r['resumed_and_equal']}/{r['kill_points']}"
        lines.append(
            f"{r['campaign']:<9}{r['kill_points']:>12}{r['mid_save']:>11}{ratio:>25}{len(r['problems']):>10}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI's size: 3 sft and 2 export kill points")
    ap.add_argument("--sft_kills", type=int, default=None, help="sft kill points (default 24; --quick 3)")
    ap.add_argument(
        "--export_kills", type=int, default=None, help="export kill points (default 8; --quick 2)"
    )
    ap.add_argument(
        "--run_kills", type=int, default=None, help="mhsft run kill points (default 5; --quick 0)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir", default=None, help="where the runs go (default: a temporary folder, removed)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak_kill_resume.json"))
    a = ap.parse_args()
    n = {"sft": a.sft_kills or (3 if a.quick else 24), "export": a.export_kills or (2 if a.quick else 8),
         "run": a.run_kills if a.run_kills is not None else (0 if a.quick else 5)}  # fmt: skip
    rng = random.Random(a.seed)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="mhsft-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        sft = sft_campaign(work, n["sft"], a.quick, rng)
        from mhsft.checkpoint import choose_checkpoint

        ckpt, _ = choose_checkpoint(
            newest_run(work / "sft-ref")
        )  # the reference run's best, as users export it
        exp = export_campaign(work, ckpt, n["export"], a.quick, rng)
        results = [sft, exp] + ([run_campaign(work, n["run"], a.quick, rng)] if n["run"] else [])
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    passed = all(
        r["resumed_and_equal"] == r["kill_points"] >= n[r["campaign"]] and not r["problems"] for r in results
    )
    report = {"quick": a.quick, "seed": a.seed, "seconds": round(time.time() - t0, 1), "passed": passed,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "goals": n,
              "results": results}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(table(results))
    print(f"{'passed' if passed else 'FAILED'} in {report['seconds']:.0f}s; wrote {a.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
