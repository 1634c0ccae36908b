"""FP8 against bf16 over the same batches: the users' 7B command through the CLI twice, with and without --fp8,
for N optimizer steps (default 50), every step logged; prints the per-step loss difference and writes JSON.

    python benchmarks/fp8_loss.py --data emollm_data.json --steps 50 --accumulation 1 --out fp8_loss.json

--accumulation 1 keeps the 8 x 3072 micro-batch but makes each optimizer step one micro-batch, so 50 steps take
a minute on an H200; the batches and their order are the same in both runs (same seed, same plan of the epoch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import users_commands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--model", default="7b")
    ap.add_argument("--workdir", default="/tmp/fp8_loss")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="fp8_loss.json")
    args = ap.parse_args()
    import random_model
    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config, shape = users_commands.COMMANDS[args.model]
    shape = list(shape)
    shape[shape.index("--gradient_accumulation_steps") + 1] = str(args.accumulation)
    model_dir = str(random_model.build(config, work / f"model-{args.model}", args.device, random_init=True))
    runs = {}
    for name, flags in (("bf16", []), ("fp8", ["--fp8", "true"])):
        out = work / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        argv = users_commands.users_command(
            model_dir, args.data, shape, str(out), args.steps, args.device == "cuda"
        )
        runs[name] = users_commands.run_cli(argv + flags, work / f"{name}.log")
        print(json.dumps({"run": name, **{k: v for k, v in runs[name].items() if k != "losses"}}), flush=True)
    a, b = runs["bf16"]["losses"], runs["fp8"]["losses"]
    rel = [abs(y - x) / abs(x) for x, y in zip(a, b)]
    summary = {
        "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "steps": len(rel),
        "mean_loss_bf16": round(statistics.fmean(a), 5),
        "mean_loss_fp8": round(statistics.fmean(b), 5),
        "mean_rel_diff": round(statistics.fmean(rel), 6),
        "max_rel_diff": round(max(rel), 6),
        "last_rel_diff": round(rel[-1], 6),
        "speedup": round(runs["fp8"]["tokens_per_s"] / runs["bf16"]["tokens_per_s"], 3),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"\n{'step':>5}{'bf16':>11}{'fp8':>11}{'rel diff':>10}")
    for i, (x, y) in enumerate(zip(a, b), 1):
        if i <= 3 or i % 10 == 0 or i == len(a):
            print(f"{i:>5}{x:>11.5f}{y:>11.5f}{abs(y - x) / abs(x):>10.2%}")
    print(
        f"mean loss bf16 {summary['mean_loss_bf16']}  fp8 {summary['mean_loss_fp8']}; per-step relative difference"
        f" mean {summary['mean_rel_diff']:.3%}, max {summary['max_rel_diff']:.3%}; fp8 {summary['speedup']}x"
    )


if __name__ == "__main__":
    main()
