"""Serving throughput on one GPU: `mhsft deploy` end to end through HTTP, against transformers' own `generate`
(static batch, and one prompt at a time) and `generate_batch` (its continuous batching), on the same prompts.

Model: Qwen2.5-7B's architecture with random weights (benchmarks/random_model.py) plus a LoRA adapter of rank 8
on every linear layer, served by name. Workload: --streams concurrent streams of --gen_tokens generated tokens
from --prompt_tokens-token prompts, EOS disabled. The server is measured twice in a row with the same workload:
`cold` (its first, which captures the CUDA graphs) and `warm`. Metrics: aggregate generated tokens/s (all tokens
/ wall time from the first request sent to the last token received) and time to first token (p50 / p95).

The client is asyncio over raw sockets (no dependency beyond the standard library); it asks for `logprobs: 0` so
that every token arrives as its own chunk even when the tiny tokenizer (which the random model shares) cannot
decode it, which makes token counts and time to first token exact.

    python benchmarks/serve_throughput.py --workdir /tmp --out benchmarks/results/serve_throughput_7b_h100.json
    python benchmarks/serve_throughput.py --model_dir builtin:tiny --device cpu --streams 4 --gen_tokens 16 \
        --prompt_tokens 20 --stacks server,static   # smoke test of the script itself on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
STACKS = ("server", "server_sync", "server_eager", "static", "generate_batch", "sequential")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def subprocess_env() -> dict:
    """The environment for the mhsft processes a benchmark starts: this checkout's src first, loopback unproxied."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    return env


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random token ids from the tiny tokenizer's range (the random model shares that tokenizer)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, 2000) for _ in range(length)] for _ in range(n)]


# ------------------------------------------------------------------------------------------------ workers


def _load(args):
    import torch
    from peft import PeftModel

    from mhsft.model import load_model

    model = load_model(args.model_dir, dtype=args.dtype, device=args.device)
    model = PeftModel.from_pretrained(model, args.adapter).eval()
    for cfg in (model.generation_config,):
        cfg.eos_token_id = None  # EOS disabled: every row generates exactly gen_tokens
        cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    # The random model is saved for training (use_cache=False in its config): without this, `generate` recomputes
    # the whole sequence at every step, which is what made the static batch of 64 run past 150 s on the H100.
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return model, torch


def _sync(torch, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def worker_prepare(args) -> dict:
    """The random model (once) and a rank-8 LoRA adapter on every linear layer, with non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mhsft.model import load_model

    if not args.model_dir.startswith("builtin:") and not (Path(args.model_dir) / "config.json").is_file():
        from random_model import build

        build(args.config, args.model_dir, args.device)
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        model = load_model(args.model_dir, dtype=args.dtype, device=args.device)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        model.save_pretrained(adapter)
        (adapter / "args.json").write_text(json.dumps({"model": args.model_dir}), encoding="utf-8")
    return {"model_dir": args.model_dir, "adapter": str(adapter)}


def worker_static(args) -> dict:
    """transformers' `generate` on one static batch of all prompts (greedy)."""
    model, torch = _load(args)
    ids = torch.tensor(prompts(args.streams, args.prompt_tokens), device=args.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # warm-up
        _sync(torch, args.device)
        t = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=args.gen_tokens, do_sample=False
        )
        _sync(torch, args.device)
        dt = time.perf_counter() - t
    n = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"generated_tokens": int(n), "seconds": dt, "tokens_per_s": n / dt}


def worker_sequential(args) -> dict:
    """transformers' `generate`, one prompt at a time (the first prompt only: the rate is per request)."""
    model, torch = _load(args)
    ids = torch.tensor(prompts(1, args.prompt_tokens), device=args.device)
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        _sync(torch, args.device)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=args.gen_tokens, do_sample=False)
        _sync(torch, args.device)
        dt = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    return {"generated_tokens": int(n), "seconds": dt, "tokens_per_s": n / dt}


def worker_generate_batch(args) -> dict:
    """transformers' continuous batching (`generate_batch`) on the same prompts; the second call is timed."""
    from transformers import GenerationConfig

    model, torch = _load(args)
    gc = GenerationConfig(max_new_tokens=args.gen_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    inputs = prompts(args.streams, args.prompt_tokens)
    res = {}
    for run in ("cold", "warm"):
        _sync(torch, args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate_batch(inputs=inputs, generation_config=gc, progress_bar=False)
        _sync(torch, args.device)
        dt = time.perf_counter() - t
        n = sum(len(o.generated_tokens) for o in out.values())
        if n == 0:  # seen on transformers 5.17 + CUDA: say what came back instead of reporting 0 tokens/s
            first = next(iter(out.values()), None)
            raise RuntimeError(
                f"generate_batch returned {len(out)} outputs and no tokens; first: {first!r:.500}"
            )
        res[run] = {"generated_tokens": n, "seconds": dt, "tokens_per_s": n / dt}
    return {**res["warm"], "cold": res["cold"]}


# ------------------------------------------------------------------------------------------------ server


async def _stream(port: int, body: dict, t0: float) -> tuple[float | None, int]:
    """One streamed completion; (time to first token from t0, tokens received)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}: {(await reader.read(2000))!r}")
    while (await reader.readline()).strip():
        pass  # headers
    ttft, n, buf = None, 0, b""
    while True:  # chunked transfer encoding, carrying SSE events
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            choice = (json.loads(ev[6:]).get("choices") or [{}])[0]
            got = len((choice.get("logprobs") or {}).get("tokens") or [])
            if got and ttft is None:
                ttft = time.perf_counter() - t0
            n += got
    writer.close()
    return ttft, n


async def _round(port: int, args) -> dict:
    bodies = [
        {"model": "lora", "prompt": p, "max_tokens": args.gen_tokens, "temperature": 0, "ignore_eos": True,
         "stream": True, "logprobs": 0}
        for p in prompts(args.streams, args.prompt_tokens)
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_stream(port, b, t0) for b in bodies))
    dt = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in res if t is not None)
    n = sum(k for _, k in res)
    return {
        "generated_tokens": n,
        "seconds": dt,
        "tokens_per_s": n / dt,
        "ttft_min_s": ttfts[0] if ttfts else None,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
        "streams_complete": sum(k == args.gen_tokens for _, k in res),
    }


def run_server(args, stack: str) -> dict:
    """server: `mhsft deploy` as shipped; server_sync: each decode step read back before the next is queued;
    server_eager: no CUDA graphs."""
    from mhsft.client import DeployProcess, get_json

    graphs = stack != "server_eager"
    log = Path(args.workdir) / f"{stack}.log"
    argv = ["--async_scheduling", str(stack != "server_sync").lower(), "--model", args.model_dir, "--adapters", f"lora={args.adapter}", "--max_batch_size", str(args.streams),
            "--device", args.device, "--max_model_len", str(args.max_model_len), "--cuda_graphs", str(graphs).lower(),
            "--torch_dtype", args.dtype]  # fmt: skip
    t = time.perf_counter()
    with DeployProcess(argv, log, env=subprocess_env(), timeout=600, cwd=ROOT) as server:
        startup = time.perf_counter() - t
        cold = asyncio.run(_round(server.port, args))
        warm = asyncio.run(_round(server.port, args))
        stats = get_json(f"{server.url}/health")[1]
    return {**warm, "cold": cold, "startup_s": startup, "server_stats": stats, "log": str(log)}


# ------------------------------------------------------------------------------------------------ main


def _in_subprocess(stack: str, args) -> dict:
    """Run one worker in its own process, so that each stack starts with the whole GPU to itself."""
    argv = [sys.executable, __file__, "--worker", stack] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "stacks", "out") and v is not None
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen2.5-7b")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--model_dir", default=None, help="default WORKDIR/CONFIG-random (built once)")
    ap.add_argument("--adapter", default=None, help="default WORKDIR/CONFIG-lora8 (made once)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt_tokens", type=int, default=200)
    ap.add_argument("--gen_tokens", type=int, default=256)
    ap.add_argument("--max_model_len", type=int, default=1024)
    ap.add_argument("--stacks", default=",".join(STACKS), help=f"any of {','.join(STACKS)}")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model_dir is None:
        args.model_dir = str(Path(args.workdir) / f"{args.config}-random")
    if args.model_dir.startswith("builtin:"):
        from mhsft.builtin import resolve_model

        args.model_dir = resolve_model(args.model_dir)
    args.adapter = args.adapter or str(Path(args.workdir) / f"{Path(args.model_dir).name}-lora8")

    if args.worker:
        fn = {"prepare": worker_prepare, "static": worker_static, "sequential": worker_sequential,
              "generate_batch": worker_generate_batch}[args.worker]  # fmt: skip
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return

    import torch
    import transformers

    info = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": args.config if "random" in Path(args.model_dir).name else args.model_dir,
        "lora_rank": 8,
        "streams": args.streams,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
    }
    print(json.dumps(info), flush=True)
    prep = _in_subprocess("prepare", args)
    if "error" in prep:
        raise SystemExit(f"preparing the model failed:\n{prep['error']}")
    results: dict = {}
    for stack in [s.strip() for s in args.stacks.split(",") if s.strip()]:
        t = time.perf_counter()
        try:
            if stack.startswith("server"):
                results[stack] = run_server(args, stack)
            else:
                results[stack] = _in_subprocess(stack, args)
        except Exception as e:  # one stack failing must not lose the others' numbers
            results[stack] = {"error": f"{type(e).__name__}: {e}"}
        r = results[stack]
        print(f"{stack:>15}: " + (f"{r['tokens_per_s']:8.0f} tokens/s" if "tokens_per_s" in r else r["error"][-500:])
              + (f"  ttft p50 {r['ttft_p50_s']:.3f}s p95 {r['ttft_p95_s']:.3f}s" if r.get("ttft_p50_s") else "")
              + f"  ({time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
        report = {**info, "results": results}
        if args.out:  # after every stack: a later one running out of time loses only itself
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
