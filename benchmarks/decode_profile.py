"""Where a batched decode step of the serving engine spends its time, without HTTP: the engine of
`mhsft deploy` driven directly on Qwen2.5-7B's architecture (random weights) + a rank-8 LoRA, --streams rows
of --prompt_tokens-token prompts, for each variant: prefill time of all rows at once, the first decode step
(CUDA-graph capture included), the steady decode step (sampling and Python included), and the GPU time of
one step alone (graph replay, or the eager forward). Variants: transformers' SDPA and PEFT's LoRA forward
(`base`) against the engine's fast paths (`fast`: grouped-query decode attention without repeated KV heads,
LoRA in the model dtype with one addmm, rows packed in the first slots read as a view of the cache, SDPA
without cuDNN's kernel), with CUDA graphs on and off; `fast+graphs+cudnn` isolates the cuDNN choice. Each
variant first serves 3 short requests, so the measured prefill is a shape the engine has not seen. A profiler
table of the eager step's top kernels is printed for the eager variants.

    python benchmarks/decode_profile.py --workdir /tmp --out $OUT/decode_profile.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _timed(torch, fn, n: int = 1) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def _top_kernels(torch, fn, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except Exception:  # the sort key's name differs between torch versions
            continue
    return ""


def run_variant(torch, model, tok, names, prompts, args, graphs, fast, cudnn, sync=False) -> dict:
    from mhsft.serve.engine import Engine, Request, SamplingParams

    engine = Engine(model, tok, names, max_batch_size=args.streams, max_model_len=args.max_model_len,
                    cuda_graphs=graphs, fast_paths=fast, async_scheduling=not sync)  # fmt: skip
    engine.cudnn_attention = cudnn
    res: dict = {"graphs": graphs, "fast_paths": fast, "cudnn_attention": cudnn, "async_scheduling": not sync}
    with torch.inference_mode():
        # A few short requests first, as a server meets them: the measured prefill is then a new shape.
        for p in prompts[:3]:
            engine.submit(
                Request(p[:100], SamplingParams(max_new_tokens=2), lambda e: None, adapter=names[0])
            )
        while engine.pending:
            engine._iteration()
        for p in prompts:
            sp = SamplingParams(max_new_tokens=10**6, ignore_eos=True, logprobs=0)
            engine.submit(Request(p, sp, lambda e: None, adapter=names[0]))
        engine.waiting.extend(engine._drain_inbox())
        res["prefill_s"] = _timed(torch, lambda: engine.inflight.extend(engine._admit()))
        res["first_step_s"] = _timed(torch, engine._iteration)
        res["step_ms"] = 1000 * _timed(torch, engine._iteration, args.steps)
        res["graphs_in_use"] = engine.use_graphs
        rows = sorted(engine.running.values(), key=lambda r: r.slot)
        dev = engine.device
        pos = torch.tensor([r.cache_len for r in rows], device=dev)[:, None]
        slots = torch.tensor([r.slot for r in rows], device=dev)
        ids = engine.slot_tokens[slots][:, None]
        kv = -(-(max(r.cache_len for r in rows) + 1) // 256) * 256
        first = len(rows) if fast and all(r.slot == i for i, r in enumerate(rows)) else 0
        res["kv_len"], res["packed_view"] = kv, bool(first)

        def eager():
            engine._eager_step(ids, pos, slots, kv, first)

        if engine.use_graphs and engine.graphs:
            g = next(iter(engine.graphs.values()))
            res["gpu_step_ms"] = 1000 * _timed(torch, g.graph.replay, 20)
        res["eager_step_ms"] = 1000 * _timed(torch, eager, 5)
        if not graphs:
            res["profile"] = _top_kernels(torch, eager)
        res["tokens_per_s_engine"] = args.streams / (res["step_ms"] / 1000)
    engine.graphs.clear()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen2.5-7b")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt_tokens", type=int, default=300, help="300: the KV bucket of 512, mid-benchmark")
    ap.add_argument("--max_model_len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--only_fast", action="store_true", help="only fast+graphs, asynchronous and one step at a time"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import transformers
    from serve_throughput import prompts, worker_prepare

    from mhsft.model import load_for_inference

    prep_args = argparse.Namespace(
        config=args.config, workdir=args.workdir, device="cuda", dtype="bfloat16",
        model_dir=str(Path(args.workdir) / f"{args.config}-random"),
        adapter=str(Path(args.workdir) / f"{args.config}-random-lora8"),
    )  # fmt: skip
    t = time.perf_counter()
    worker_prepare(prep_args)
    gc.collect()
    torch.cuda.empty_cache()
    model, tok, names = load_for_inference(None, [f"lora={prep_args.adapter}"], "bfloat16", None, "cuda")
    print(f"model ready in {time.perf_counter() - t:.0f}s", flush=True)
    ps = prompts(args.streams, args.prompt_tokens)
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "transformers": transformers.__version__, "streams": args.streams,
            "prompt_tokens": args.prompt_tokens}  # fmt: skip
    results = []
    # base first: the fast LoRA forward, once switched on, stays on
    variants = [
        (False, False, True, False),
        (False, True, True, False),
        (True, True, True, False),
        (True, True, False, True),
        (True, True, False, False),
        (True, False, False, False),
    ]
    if args.only_fast:
        variants = [v for v in variants if v[0] and v[1] and not v[2]]
    for fast, graphs, cudnn, sync in variants:
        t = time.perf_counter()
        try:
            r = run_variant(torch, model, tok, names, ps, args, graphs, fast, cudnn, sync)
        except Exception as e:  # keep the other variants' numbers
            r = {"graphs": graphs, "fast_paths": fast, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        gc.collect()  # the variant's engine (KV cache, graphs) is garbage now
        torch.cuda.empty_cache()
        label = f"{'fast' if fast else 'base'}+{'graphs' if graphs else 'eager'}{'+cudnn' if cudnn else ''}"
        label += "+sync" if sync else ""
        if "error" in r:
            print(f"{label:>12}: {r['error']}", flush=True)
        else:
            print(f"{label:>12}: prefill {r['prefill_s']:.3f}s  first step {r['first_step_s']:.3f}s  step "
                  f"{r['step_ms']:.1f} ms ({r['tokens_per_s_engine']:.0f} tok/s)  gpu "
                  f"{r.get('gpu_step_ms', float('nan')):.1f} ms  eager fwd {r['eager_step_ms']:.1f} ms  "
                  f"graphs in use: {r['graphs_in_use']}  ({time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
            if r.get("profile"):
                print(r["profile"], flush=True)
    report = {**info, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
