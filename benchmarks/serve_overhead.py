"""What `mhsft deploy` costs on the CPU around the GPU's work, measurable on any machine: the real server (FastAPI,
uvicorn, the engine's scheduler and sampling, detokenization, SSE) on builtin:tiny, with the model's forward
replaced by a device clock: each step is queued on it and reading its tokens back sleeps until it would be done
(a sleep releases the GIL as a CUDA synchronize does). So the result is what the server reaches when the GPU step
takes --step_ms: the ideal is one token per stream per step.

On one H100 the engine's decode step for 64 rows of Qwen2.5-7B + LoRA takes 13.4 ms in-process and the prefill of
64 x 200 tokens 0.36 s (benchmarks/NOTES.md); the defaults replay that.

    python benchmarks/serve_overhead.py --out benchmarks/results/serve_overhead_cpu.json
    python benchmarks/serve_overhead.py --stream_interval 4     # other flags go to `mhsft deploy`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker_server(args, argv: list[str]) -> int:
    """`mhsft deploy` on a simulated device (the lm_head, sampling and everything after them are real)."""
    import torch

    from mhsft.serve import deploy as serve
    from mhsft.serve import engine as engine_module
    from mhsft.serve import sampling
    from mhsft.serve.engine import Engine

    # A device that runs one step after another while the host goes on: each forward is queued on a clock,
    # and reading a step's tokens back (`Pending.wait`) sleeps until the device would have finished it.
    device_free_at = [0.0]

    def fake_forward(self, ids, positions, slots, mask, kv_len, first_rows=0):
        rows, t = ids.shape
        cost = args.step_ms / 1000 if t == 1 else args.prefill_ms_per_row * rows / 1000
        device_free_at[0] = max(time.monotonic(), device_free_at[0]) + cost
        return torch.zeros(rows, t, self.config.hidden_size, dtype=self.dtype)

    real_sample_async = engine_module.sample_async

    def timed_sample_async(logits, rows):
        out = real_sample_async(logits, rows)
        out.ready_at = device_free_at[0]
        return out

    def wait_for_device(self):
        time.sleep(max(0.0, getattr(self, "ready_at", 0.0) - time.monotonic()))

    Engine._forward = fake_forward
    engine_module.sample_async = timed_sample_async
    sampling.Pending.wait = wait_for_device
    if args.tokens == "silent":
        # Every generated token decodes to no text (as a random-weight 7B model's ids past the tiny tokenizer's
        # vocabulary do in benchmarks/serve_throughput.py): the detokenizer's worst case.
        from mhsft.builtin import resolve_model
        from mhsft.model import load_tokenizer

        silent = load_tokenizer(resolve_model("builtin:tiny")).convert_tokens_to_ids("<|im_end|>")
        real_result = sampling.Pending.result

        def silent_result(self):
            out = real_result(self)
            out.tokens = [silent] * len(out.tokens)
            return out

        sampling.Pending.result = silent_result
    return serve.main(argv)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt_tokens", type=int, default=200)
    ap.add_argument("--gen_tokens", type=int, default=256)
    ap.add_argument("--step_ms", type=float, default=13.4)
    ap.add_argument("--prefill_ms_per_row", type=float, default=5.6)
    ap.add_argument("--tokens", default="text", choices=["text", "silent"],
                    help="silent: every token decodes to no text (the detokenizer's worst case)")  # fmt: skip
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        raise SystemExit(worker_server(args, rest))

    from serve_throughput import _round, subprocess_env

    from mhsft.builtin import resolve_model
    from mhsft.client import free_port, stop_process, wait_for_server

    model = resolve_model("builtin:tiny")
    port = free_port(0)
    server_argv = ["--model", model, "--served_model_name", "lora", "--device", "cpu", "--port", str(port),
                   "--max_batch_size", str(args.streams), "--max_model_len", "1024", *rest]  # fmt: skip
    cmd = [sys.executable, __file__, "--worker", f"--step_ms={args.step_ms}", f"--tokens={args.tokens}",
           f"--prefill_ms_per_row={args.prefill_ms_per_row}", *server_argv]  # fmt: skip
    log = Path(args.workdir) / "serve_overhead.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=ROOT)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=300, proc=proc)
        cold = asyncio.run(_round(port, args))
        warm = asyncio.run(_round(port, args))
    finally:
        stop_process(proc)
    prefill_s = args.prefill_ms_per_row * args.streams / 1000
    ideal_s = prefill_s + args.gen_tokens * args.step_ms / 1000
    ideal = args.streams * args.gen_tokens / ideal_s
    step_ms = (warm["seconds"] - warm["ttft_p50_s"]) / max(1, args.gen_tokens - 1) * 1000
    res = {**warm, "cold": cold, "ideal_tokens_per_s": ideal, "efficiency": warm["tokens_per_s"] / ideal,
           "step_ms_through_http": step_ms, "settings": {k: v for k, v in vars(args).items() if k != "worker"}}  # fmt: skip
    print(f"{args.streams} streams x {args.gen_tokens} {args.tokens} tokens, GPU step {args.step_ms} ms: "
          f"{warm['tokens_per_s']:,.0f} tokens/s of an ideal {ideal:,.0f} ({res['efficiency']:.0%}); "
          f"{step_ms:.1f} ms a step through HTTP; TTFT p50 {warm['ttft_p50_s']:.3f}s "
          f"p95 {warm['ttft_p95_s']:.3f}s (ideal {prefill_s:.3f}s)")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
