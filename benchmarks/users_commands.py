"""The users' own training commands through the CLI, beside HF + PEFT on the same batches (issue: the users'
command at the card's best speed).

The users' notes number two commands: 5.1 = Qwen2.5-7B, 8 rows x 3072 per micro-batch, 4 accumulation steps,
`--gradient_checkpointing true`, packing; 5.2 = Qwen2.5-32B, 2 x 4096, 8 accumulation steps. Each runs here as
`python -m mhsft sft <the command>` with only what cannot run on the lent machine substituted: the model is the
real architecture with random weights (a config-only folder, weights drawn on the GPU at load: random_model.py
--random_init), the dataset a local copy of EmoLLM's dialogues instead of the hub id, `--report_to none` instead
of SwanLab cloud, and `--max_steps N --logging_steps 1` so that a few optimizer steps are timed. Stacks:

  hf_peft            transformers + PEFT (sdpa, checkpointing, LoRA r8/alpha 32/dropout 0.05, all linear layers)
                     on the first micro-batches of the CLI's own epoch plan, padded rows (train_throughput.py's
                     worker; transformers masks attention per sample from the restarting position ids)
  mhsft_cli          the command unchanged (the execution plan on by default)
  mhsft_cli_written  the same with --auto_plan false (runs as written, Liger on by default)
  mhsft_cli_fp8      the same with --fp8 true
  mhsft_cli_80gb     the same with --plan_memory_gib 78 (the plan, and an allocator limit, of an 80 GB card)
  mhsft_cli_qlora    the same with --quant_method bnb --quant_bits 4 (QLoRA; _16gb / _24gb: with --plan_memory_gib;
                     _written: --auto_plan false). Models 7b, 32b, 32b_qlora (the 32B at 1 x 2048 x 8), tiny
  hf_peft_bnb        HF + PEFT + bitsandbytes NF4 (double quantization, bf16 compute, PEFT's k-bit preparation);
                     --micro_batch N for the largest micro-batch it fits (the same rows, regrouped)
  A stack may name switches away from the defaults after a `+`, set in the CLI's process before it parses its
  arguments: `mhsft_cli+concat` (the LoRA update inside gate/up's base GEMM, mhsft.train.concat_update),
  `+gqanative` (grouped k/v heads into torch's varlen_attn unexpanded, mhsft.packed_attention; the default since
  session 13), `+expandkv` (k/v expanded to the query heads first, the default before it), `+nomlp` (session 15's
  memory modes off, the default before session 16: no layer recomputing only its MLP's gate/up, norms' outputs kept).
  The QLoRA stacks quantize the drawn weights as from_pretrained would quantize them saved (mhsft.model's
  random-weight loader; tests/train/test_qlora.py checks the two equal), so nothing is written to disk.

tokens/s is the CLI's own per-step figure (real tokens, padding excluded), averaged over the steps after the first
(the first holds the plan's probes and the kernels' compilation); peak GiB is the CLI's logged peak of allocated
memory. Prints a table; writes JSON as
`{"card", "7b": {"hf_peft": {"tokens_per_s", "peak_gib"}, "mhsft_cli": {...}, ...}, "32b": {...}}`.

    python benchmarks/users_commands.py --data emollm_data.json --models 7b,32b --out users_commands_h200.json
    python benchmarks/users_commands.py --device cpu --models tiny --steps 2 ...   (the CPU smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# name -> (random_model config, the command's shape flags)
COMMANDS = {
    "7b": ("qwen2.5-7b", ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4",
                          "--max_length", "3072"]),
    "32b": ("qwen2.5-32b", ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8",
                            "--max_length", "4096"]),
    # QLoRA of the 32B for a 24 GB card (the shape: one 2048-token row per micro-batch, recompute)
    "32b_qlora": ("qwen2.5-32b", ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8",
                                  "--max_length", "2048"]),
    "tiny": ("tiny", ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                      "--max_length", "256"]),
}  # fmt: skip
STACK_FLAGS = {
    "mhsft_cli": [],
    "mhsft_cli_written": ["--auto_plan", "false"],
    "mhsft_cli_fp8": ["--fp8", "true"],
    "mhsft_cli_80gb": ["--plan_memory_gib", "78"],
    # QLoRA: the same command on a 4-bit base; `_16gb` plans for (and caps the allocator at) a 16 GB card
    "mhsft_cli_qlora": ["--quant_method", "bnb", "--quant_bits", "4"],
    "mhsft_cli_qlora_16gb": ["--quant_method", "bnb", "--quant_bits", "4", "--plan_memory_gib", "16"],
    "mhsft_cli_qlora_24gb": ["--quant_method", "bnb", "--quant_bits", "4", "--plan_memory_gib", "24"],
    "mhsft_cli_qlora_written": ["--quant_method", "bnb", "--quant_bits", "4", "--auto_plan", "false"],
}

# switches away from the defaults (`mhsft_cli+concat`), as the statements that set them in the CLI's process
SWITCHES = {
    "concat": "import mhsft.train.concat_update as m; m.enabled = True",
    "gqanative": "import mhsft.packed_attention as m; m._gqa_native[0] = True",
    # the default before session 13, for the A/B: k/v expanded to the query heads before varlen
    "expandkv": "import mhsft.packed_attention as m; m._gqa_native[0] = False",
    # session 15's memory modes off (the default before session 16, for the A/B): no layer recomputing only its MLP's
    # gate/up (mhsft.train.swiglu_down's mode "mlp"), the norms' outputs kept (mhsft.train.remade_norms)
    "nomlp": "import mhsft.train.plan as m; m.RECOMPUTE_MLP = False; m.REMAKE_NORMS = False",
}


def cli_command(switches: list[str]) -> list[str]:
    """`python -m mhsft`, or with switches the same entry point after the statements that set them."""
    if not switches:
        return [sys.executable, "-m", "mhsft"]
    on = "; ".join(SWITCHES[s] for s in switches)
    marker = f"print('[users_commands] switched on: {'+'.join(switches)}', flush=True)"
    return [sys.executable, "-c", f"{on}; {marker}; from mhsft.cli import main; raise SystemExit(main())"]


def users_command(
    model_dir: str, data: list[str], shape: list[str], out: str, steps: int, cuda: bool
) -> list[str]:
    """The README's first `mhsft sft` command (the users' 5.1), with the substitutions the docstring names."""
    return [
        "--model", model_dir, "--train_type", "lora", "--dataset", *data, "--num_train_epochs", "1", *shape,
        "--learning_rate", "2e-4", "--packing", "true", "--attn_impl", "flash_attn",
        *(["--bf16", "true"] if cuda else []), "--gradient_checkpointing", "true", "--save_steps", "200",
        "--save_total_limit", "3", "--output_dir", out, "--report_to", "none",
        "--max_steps", str(steps), "--logging_steps", "1",
    ]  # fmt: skip


def run_cli(argv: list[str], log: Path, switches: list[str]) -> dict:
    t = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}",
    }
    with open(log, "w", encoding="utf-8") as f:
        p = subprocess.run(
            [*cli_command(switches), "sft", *argv], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    wall = round(time.perf_counter() - t, 1)
    text = log.read_text(encoding="utf-8", errors="replace")
    if p.returncode != 0:
        return {"error": text[-1500:], "wall_s": wall}
    out = Path(argv[argv.index("--output_dir") + 1])
    (run,) = [d for d in out.iterdir() if d.name.startswith("v")]
    rows = [json.loads(x) for x in (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    timed = rows[1:] or rows
    args = json.loads((run / "args.json").read_text(encoding="utf-8"))
    return {
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in timed) / len(timed), 1),
        "peak_gib": max(r["memory_gib"] for r in rows),
        "steps_tokens_per_s": [r["tokens_per_s"] for r in rows],
        "losses": [r["loss"] for r in rows],
        "plan": args.get("plan", {}).get("line"),
        "wall_s": wall,
    }


def cli_batches(
    model_dir: str, argv: list[str], steps: int, path: Path, rows: int | None = None
) -> tuple[str, int, int]:
    """The micro-batches the CLI trains on in its first `steps` optimizer steps (the same argv through the same
    reader, template, packing and seed), in train_throughput.py's batch-file format. Returns (path, rows, seq)."""
    import torch

    from mhsft.args import parse_args
    from mhsft.data.loader import load_datasets
    from mhsft.model import load_tokenizer
    from mhsft.train.batches import epoch_plan
    from mhsft.train.sft import SftArguments, render_samples

    args = parse_args(SftArguments, argv, prog="users_commands")
    data = load_datasets(args.dataset, seed=args.seed)
    samples, _ = render_samples(data.train, load_tokenizer(model_dir), args.max_length, args.system)
    # HF + PEFT times micro-batches, not optimizer steps: 2 warm-up and up to 8 timed are enough
    plan = epoch_plan(samples, 0, args)[: min(steps * args.gradient_accumulation_steps, 10)]
    micro = [[[samples[i] for i in row] for row in mb] for mb in plan]
    if (
        rows
    ):  # the same rows in the same order, `rows` per micro-batch (a stack that fits fewer than the command's)
        flat = [row for mb in micro for row in mb]
        micro = [flat[i : i + rows] for i in range(0, len(flat), rows)][:10]
    torch.save({"micro": micro, "lengths": [len(s["input_ids"]) for s in samples]}, path)
    return str(path), rows or args.per_device_train_batch_size, args.max_length


def run_hf(
    config: str, batches: str, rows: int, seq: int, device: str, log: Path, model_dir: str | None = None
) -> dict:
    """HF + PEFT (with `model_dir`: HF + PEFT + bitsandbytes 4-bit of that folder) on the CLI's batches."""
    worker = "hf:bnb4" if model_dir else "hf"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--worker", worker, "--batches", batches,
           "--config", config, "--micro_batch", str(rows), "--seq", str(seq), "--warmup", "2", "--device", device,
           *(["--model_dir", model_dir] if model_dir else [])]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.write_text(p.stdout + p.stderr, encoding="utf-8")
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        oom = "OutOfMemoryError" in p.stderr or "out of memory" in p.stderr
        return {
            "error": "out of memory" if oom else p.stderr[-1500:],
            "wall_s": round(time.perf_counter() - t, 1),
        }
    r = json.loads(line[7:])
    return {"tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"], "losses": r["losses"],
            "wall_s": round(time.perf_counter() - t, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared/data/train/emollm_data.json")])
    ap.add_argument("--models", default="7b,32b")
    ap.add_argument("--stacks", default="hf_peft,mhsft_cli,mhsft_cli_written,mhsft_cli_fp8")
    ap.add_argument("--stacks_32b", default="hf_peft,mhsft_cli,mhsft_cli_80gb")
    ap.add_argument("--stacks_32b_qlora", default="mhsft_cli_qlora_24gb,mhsft_cli_qlora_written")
    ap.add_argument(
        "--steps", type=int, default=6, help="optimizer steps per CLI run (the first is not timed)"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--micro_batch", type=int, help="HF stacks: rows per micro-batch (default: the command's)"
    )
    ap.add_argument("--workdir", default="/tmp/users_commands")
    ap.add_argument("--out", default="users_commands.json")
    args = ap.parse_args()
    import random_model
    import torch

    from mhsft.files import write_json

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    result: dict = {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    for name in args.models.split(","):
        config, shape = COMMANDS[name]
        model_dir = str(random_model.build(config, work / f"model-{name}", args.device, random_init=True))
        stacks = {"32b": args.stacks_32b, "32b_qlora": args.stacks_32b_qlora}.get(name, args.stacks).split(
            ","
        )
        result[name] = {"command": users_command(model_dir, args.data, shape, "OUT", args.steps, cuda)}
        for stack in stacks:
            out = work / f"{name}-{stack}"
            argv = users_command(model_dir, args.data, shape, str(out), args.steps, cuda)
            if stack in ("hf_peft", "hf_peft_bnb"):
                batches, rows, seq = cli_batches(model_dir, argv, args.steps, work / f"batches-{name}.pt",
                                                 args.micro_batch)  # fmt: skip
                bnb = model_dir if stack == "hf_peft_bnb" else None
                r = run_hf(config, batches, rows, seq, args.device, work / f"{name}-{stack}.log", bnb)
            else:
                subprocess.run(["rm", "-rf", str(out)], check=True)
                base, *switches = stack.split("+")
                r = run_cli(argv + STACK_FLAGS[base], work / f"{name}-{stack}.log", switches)
            result[name][stack] = r
            print(json.dumps({"model": name, "stack": stack, **{k: v for k, v in r.items() if k != "error"}},
                             ensure_ascii=False), flush=True)  # fmt: skip
            if "error" in r:
                print(f"{name} {stack}: {r['error'][-600:]}", flush=True)
            # after every stack, so that a call stopped at its time limit keeps what finished
            write_json(args.out, result)
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\ncard: {result['card']}")
    print(f"{'model':<6}{'stack':<20}{'tokens/s':>10}{'peak GiB':>10}{'vs hf':>8}  plan")
    for name, stacks in result.items():
        if not isinstance(stacks, dict) or "command" not in stacks:
            continue
        hf = stacks.get("hf_peft", {}).get("tokens_per_s")
        for stack, r in stacks.items():
            if stack == "command":
                continue
            if "tokens_per_s" not in r:
                print(f"{name:<6}{stack:<20}{r.get('error', '')[-60:].strip()}")
                continue
            rel = f"{r['tokens_per_s'] / hf:.2f}x" if hf else "-"
            print(f"{name:<6}{stack:<20}{r['tokens_per_s']:>10,.0f}{r['peak_gib'] or 0:>10.1f}{rel:>8}  "
                  f"{(r.get('plan') or '')[:100]}")  # fmt: skip


if __name__ == "__main__":
    main()
