"""Summarize `benchmarks/gpu_scaling.sh`: one row per `mhsft sft` run (global real tokens/s, per GPU, scaling
against the one-GPU run of the same model, peak memory), as a markdown table on stdout and as JSON.

What `logging.jsonl` holds (mhsft/progress.py `log_metrics`): `tokens_per_s` is the real (non-padding) tokens of
ALL ranks in the logging window, summed with `accelerator.reduce`, divided by rank 0's wall time for that window:
a global number, not one GPU's. `memory_gib` is rank 0's `torch.cuda.max_memory_allocated`; the GPU monitor
(nvidia-smi memory.used, every GPU, the CUDA caching allocator included) gives the peak over all GPUs of a run.

    python benchmarks/scaling_summary.py --manifest runs.tsv [--gpu_monitor gpu.csv] [--skip 2] \
        --json scaling.json --md scaling.md

The manifest is tab-separated, one run a line: name, gpus, kind, model, start (epoch s), end, rc, output_dir,
note. A run's output_dir holds the run folder (`v*-*/logging.jsonl`) that `mhsft sft` made.

    python benchmarks/scaling_summary.py --balance DATA --max_length 3072 --batch 8 --ns 1 2 4 --steps 8 \
        --extra facts.json

computes, from mhsft's own data plan (same seed, tokenizer and packing as `mhsft sft`), how evenly the timed steps'
real tokens fall on the ranks (mean / max over ranks: a DDP step waits for its fullest rank), and stores it in
the facts file that the summary shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

GOALS = {2: 1.9, 4: 3.7}  # minimum speed-up over one GPU (DDP)
# One-GPU numbers of the same configuration from benchmarks/train_throughput.py (README, one H100): the base of the
# scaling column for a model that has no one-GPU run here (the 32B, which this script runs on two GPUs only).
REFERENCE_1GPU = {"32b": 2530.4, "7b": 10519.2}
TIMEOUT_RCS = {124, 137}


def read_manifest(path: str | Path) -> list[dict]:
    runs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        f = line.split("\t") + [""] * 9
        runs.append(
            {
                "name": f[0],
                "gpus": int(f[1]),
                "kind": f[2],
                "model": f[3],
                "start": float(f[4]) if f[4] else None,
                "end": float(f[5]) if f[5] else None,
                "rc": int(f[6]) if f[6] not in ("", "-") else None,
                "output_dir": f[7],
                "note": f[8],
            }
        )
    return runs


def read_log(output_dir: str) -> tuple[list[dict], str | None]:
    """The step records of the newest run folder in output_dir, and that folder."""
    d = Path(output_dir) if output_dir else None
    if d is None or not d.is_dir():
        return [], None
    logs = sorted(d.glob("v*/logging.jsonl"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return [], None
    recs = []
    for line in logs[-1].read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "tokens_per_s" in r and "step" in r:
            recs.append(r)
    return recs, str(logs[-1].parent)


def throughput(recs: list[dict], skip: int) -> dict:
    """Global tokens/s over the steps after `skip`: each logged window's tokens (tokens_per_s x its duration, the
    duration from the cumulative `elapsed_s`) summed, over the windows' total time; also the per-window median."""
    recs = sorted(recs, key=lambda r: r["step"])
    timed = [r for r in recs if r["step"] > skip]
    base = [r for r in recs if r["step"] <= skip]
    if not timed:
        return {}
    prev = base[-1]["elapsed_s"] if base else 0.0
    tokens = seconds = 0.0
    for r in timed:
        dt = max(r["elapsed_s"] - prev, 0.0)
        prev = r["elapsed_s"]
        tokens += r["tokens_per_s"] * dt
        seconds += dt
    tps = [r["tokens_per_s"] for r in timed]
    out = {
        "timed_steps": [timed[0]["step"], timed[-1]["step"]],
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else round(statistics.fmean(tps), 1),
        "tokens_per_s_median": round(statistics.median(tps), 1),
        "step_s": round(seconds / (timed[-1]["step"] - (base[-1]["step"] if base else 0)), 3)
        if seconds > 0
        else None,
        "rank0_peak_gib": max(r.get("memory_gib", 0.0) for r in recs),
        "last_loss": timed[-1].get("loss"),
    }
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    if mfu:
        out["mfu"] = round(statistics.fmean(mfu), 4)
    return out


def read_monitor(path: str | Path | None) -> list[tuple[float, int, float, float]]:
    """(epoch s, gpu index, memory.used MiB, utilization %) rows of the script's nvidia-smi loop."""
    rows = []
    if not path or not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) < 4:
            continue
        try:
            rows.append((float(f[0]), int(f[1]), float(f[2]), float(f[3])))
        except ValueError:
            continue
    return rows


def monitor_stats(rows, start: float | None, end: float | None) -> dict:
    if not rows or start is None or end is None:
        return {}
    win = [r for r in rows if start <= r[0] <= end]
    if not win:
        return {}
    per_gpu: dict[int, float] = {}
    for _, i, mem, _ in win:
        per_gpu[i] = max(per_gpu.get(i, 0.0), mem)
    busy = [u for *_, u in win if u > 0]
    return {
        "peak_gib_per_gpu": {str(i): round(m / 1024, 1) for i, m in sorted(per_gpu.items())},
        "peak_gib_any_gpu": round(max(per_gpu.values()) / 1024, 1),
        "mean_util_busy_gpus": round(statistics.fmean(busy), 1) if busy else None,
    }


def status(run: dict, stats: dict) -> str:
    note = f": {run['note']}" if run["note"] else ""
    if run["rc"] is None:
        return "skipped" + note
    if run["rc"] in TIMEOUT_RCS:
        return f"cut at its time limit (rc {run['rc']}); the steps logged before count" + note
    if run["rc"] != 0:
        return f"failed (rc {run['rc']})" + note
    return ("ok" if stats else "ok, but no step after the warm-up was logged") + note


def summarize(runs: list[dict], skip: int, monitor_rows=()) -> list[dict]:
    out = []
    for run in runs:
        recs, run_dir = read_log(run["output_dir"])
        stats = throughput(recs, skip)
        row = dict(run, run_dir=run_dir, steps_logged=len(recs), **stats)
        row.update(monitor_stats(monitor_rows, run["start"], run["end"]))
        row["status"] = status(run, stats)
        row["steps"] = recs
        out.append(row)
    # scaling against the one-GPU run of the same model, else against its one-GPU reference number
    for row in out:
        if not row.get("tokens_per_s"):
            continue
        row["per_gpu"] = round(row["tokens_per_s"] / row["gpus"], 1)
        one = next(
            (r for r in out if r["model"] == row["model"] and r["gpus"] == 1 and r.get("tokens_per_s")), None
        )
        base = one["tokens_per_s"] if one else REFERENCE_1GPU.get(row["model"])
        if not base:
            continue
        row["scaling_base"] = "measured" if one else f"reference {base:,.0f} (train_throughput.py, README)"
        row["scaling"] = round(row["tokens_per_s"] / base, 3)
        row["efficiency"] = round(row["scaling"] / row["gpus"], 3)
        goal = GOALS.get(row["gpus"]) if row["kind"] == "ddp" and one else None
        if goal:
            row["goal"] = f">= {goal}x: {'met' if row['scaling'] >= goal else 'not met'}"
    return out


def fmt(x, spec=",.0f", none="-"):
    return none if x is None else format(x, spec)


def rank_balance(dataset: str, max_length: int, batch: int, ns: list[int], steps: int, skip: int) -> dict:
    """{gpus: sum of rank tokens / (gpus x the fullest rank's tokens)} over steps skip+1..steps, from the plan
    `mhsft sft` builds (the tiny tokenizer, which the random-weight models carry)."""
    from mhsft.builtin import resolve_model
    from mhsft.data.loader import load_datasets
    from mhsft.model import load_tokenizer
    from mhsft.train.batches import epoch_plan
    from mhsft.train.sft import SftArguments, render_samples

    a = SftArguments(model="x", dataset=[dataset], packing=True, max_length=max_length,
                     per_device_train_batch_size=batch)  # fmt: skip
    data = load_datasets(a.dataset, seed=a.seed)
    samples, _ = render_samples(
        data.train, load_tokenizer(resolve_model("builtin:tiny")), max_length, a.system
    )
    plan = epoch_plan(samples, 0, a)

    def tokens(mb) -> int:
        return sum(len(samples[i]["input_ids"]) for row in mb for i in row)

    out = {}
    for n in ns:
        total = fullest = 0
        for step in range(skip, steps):
            group = [tokens(mb) for mb in plan[step * n : (step + 1) * n]]
            if len(group) < n:
                break
            total, fullest = total + sum(group), fullest + n * max(group)
        if fullest:
            out[str(n)] = round(total / fullest, 4)
    return out


def markdown(rows: list[dict], skip: int, extra: dict | None = None) -> str:
    head = (
        "| run | GPUs | global tokens/s | per GPU | scaling vs 1 GPU | step s | rank-0 peak GiB | "
        "max GPU mem GiB (nvidia-smi) | MFU | status |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        scaling = f"{r['scaling']:.2f}x ({100 * r['efficiency']:.0f}%)" if r.get("scaling") else "-"
        if r.get("goal"):
            scaling += f", goal {r['goal']}"
        if r.get("scaling_base", "measured") != "measured":
            scaling += f" vs {r['scaling_base']}"
        lines.append(
            f"| {r['name']} | {r['gpus']} | {fmt(r.get('tokens_per_s'))} | {fmt(r.get('per_gpu'))} | {scaling} | "
            f"{fmt(r.get('step_s'), '.2f')} | {fmt(r.get('rank0_peak_gib'), '.1f')} | "
            f"{fmt(r.get('peak_gib_any_gpu'), '.1f')} | {fmt(r.get('mfu'), '.1%')} | {r['status'].replace('|', '/')} |"
        )
    note = (
        f"\nSteps 1-{skip} are warm-up and left out. Global tokens/s = real (non-padding) tokens of all ranks "
        "(summed by mhsft's logger) over rank 0's wall time, steps weighted by their duration; per GPU = global / "
        "GPUs. Rank-0 peak = torch.cuda.max_memory_allocated on rank 0 (logging.jsonl); max GPU mem = nvidia-smi "
        "memory.used, highest GPU, sampled each second (includes the caching allocator's reserve).\n"
    )
    bal = (extra or {}).get("rank_token_balance") or {}
    if bal:
        note += (
            "\nToken balance over the ranks in the timed steps (mean / fullest rank, from mhsft's data plan; a DDP "
            "step waits for its fullest rank), so the best scaling these batches allow: "
            + ", ".join(f"{n} GPUs {b:.3f} ({int(n) * b:.2f}x)" for n, b in bal.items())
            + ".\n"
        )
    return head + "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default=None)
    p.add_argument("--gpu_monitor", default=None)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the averages")
    p.add_argument("--json", default=None, help="write the rows (with every logged step) here")
    p.add_argument("--md", default=None, help="write the markdown table here too")
    p.add_argument(
        "--extra", default=None, help="a JSON file of facts to keep in the JSON (machine, versions)"
    )
    p.add_argument(
        "--balance", default=None, metavar="DATASET", help="compute the rank token balance instead"
    )
    p.add_argument("--max_length", type=int, default=3072)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args(argv)
    extra: dict = {}
    if a.extra and Path(a.extra).is_file():
        try:
            extra = json.loads(Path(a.extra).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            extra = {"extra_unreadable": a.extra}
    if a.balance:
        extra["rank_token_balance"] = rank_balance(a.balance, a.max_length, a.batch, a.ns, a.steps, a.skip)
        print(json.dumps(extra["rank_token_balance"]))
        if a.extra:
            Path(a.extra).write_text(json.dumps(extra, ensure_ascii=False), encoding="utf-8")
        return 0
    if not a.manifest:
        p.error("give --manifest (or --balance)")
    rows = summarize(read_manifest(a.manifest), a.skip, read_monitor(a.gpu_monitor))
    md = markdown(rows, a.skip, extra)
    print(md)
    if a.md:
        Path(a.md).write_text(md, encoding="utf-8")
    if a.json:
        doc = {
            "skip_steps": a.skip,
            "tokens_per_s_meaning": "global: all ranks' real tokens / rank 0's window time (mhsft progress.py)",
            "goals": {str(k): v for k, v in GOALS.items()},
            **extra,
            "runs": rows,
        }
        Path(a.json).write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
