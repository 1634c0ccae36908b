"""Evaluation throughput on one GPU: `mhsft eval` in-process (on the serving engine) against the same prompts through
`mhsft deploy` with `--api_url`, a CPsyExam-sized multiple-choice run end to end, and lm-eval's `hf` backend on
single-answer questions.

Model: Qwen2.5-7B's architecture with random weights (benchmarks/random_model.py), bf16. Stacks:

- `local`: EngineTarget.chat (what `mhsft eval --model` runs) on --streams conversations of about --prompt_tokens
  tokens, --gen_tokens new tokens each, --streams at a time (the engine's --max_batch_size);
- `deploy`: the same conversations through `mhsft deploy --max_batch_size STREAMS` and EndpointTarget.chat
  (what `mhsft eval --api_url` runs) with --concurrency STREAMS. Generated tokens are counted by the engine
  itself (its `generated_tokens`, read in-process and from the server's /health), so a reply that ends early
  counts what it generated. Each stack generates one warm-up round first (CUDA graph capture);
- `mcq`: `mhsft eval --model DIR --eval_dataset DATA --mcq_max_new_tokens 64` as a process, wall time from start
  to results.json (model load included): single-answer questions by log-likelihood, multiple-answer generated;
- `lm_eval`: `mhsft eval --export lm_eval` of the same set, then `lm_eval --model hf` on the first --lm_eval_limit
  single-answer questions, against `mhsft eval` on the same questions (--limit), both as processes.

    python benchmarks/eval_throughput.py --workdir /tmp/eb --data ../shared/data/eval/cpsyexam_train \
        --out benchmarks/results/eval_throughput_h200.json
    python benchmarks/eval_throughput.py --model_dir builtin:tiny --device cpu --streams 4 --gen_tokens 8 \
        --prompt_tokens 32 --data examples/data/demo_mcq.jsonl --workdir /tmp/eb   # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_throughput import subprocess_env  # noqa: E402  (after the path)

STACKS = ("local", "deploy", "mcq", "lm_eval")
TEXT = "来访者说：最近工作压力很大，晚上总是睡不着，脑子里反复想着白天的事情，也不知道该和谁说。"


def conversations(tok, n: int, prompt_tokens: int) -> list[list[dict]]:
    """n distinct conversations whose chat-templated prompts are about prompt_tokens tokens."""
    per = max(1, len(tok(TEXT, add_special_tokens=False).input_ids))
    body = TEXT * max(1, prompt_tokens // per)
    return [[{"role": "user", "content": f"{i}. {body}"}] for i in range(n)]


def _card(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def run_local(a, convs) -> dict:
    """EngineTarget.chat, as `mhsft eval --model` runs it: one warm-up round, then the timed one."""
    from mhsft.args import GenerationArguments
    from mhsft.eval.targets import EngineTarget, load_engine_for

    ns = SimpleNamespace(model=a.model_dir, device=a.device, torch_dtype=a.dtype, attn_impl=None, use_hf=False,
                         hub_token=None, max_batch_size=a.streams, max_model_len=a.max_model_len)  # fmt: skip
    t0 = time.perf_counter()
    engine = load_engine_for(ns, {})
    load_s = time.perf_counter() - t0
    try:
        target, gen = EngineTarget(engine), GenerationArguments(temperature=0.0)
        target.chat(convs[: a.streams], gen, 16)  # warm-up: CUDA graphs captured here
        before = engine.stats["generated_tokens"]
        t = time.perf_counter()
        target.chat(convs, gen, a.gen_tokens)
        dt = time.perf_counter() - t
        n = engine.stats["generated_tokens"] - before
    finally:
        engine.stop()
    return {"generated_tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1),
            "load_seconds": round(load_s, 1)}  # fmt: skip


def run_deploy(a, convs) -> dict:
    """The same conversations through `mhsft deploy`, by EndpointTarget.chat (what `mhsft eval --api_url` runs)."""
    from mhsft.args import GenerationArguments
    from mhsft.client import DeployProcess, get_json
    from mhsft.eval.targets import EndpointTarget

    argv = ["--model", a.model_dir, "--max_batch_size", str(a.streams), "--served_model_name", "bench"]
    argv += ["--torch_dtype", a.dtype] + (
        ["--max_model_len", str(a.max_model_len)] if a.max_model_len else []
    )
    argv += ["--device", a.device]
    log = Path(a.workdir) / "deploy.log"
    with DeployProcess(argv, log, env=subprocess_env(), timeout=900) as srv:
        target = EndpointTarget(srv.v1, None, "bench", concurrency=a.streams, timeout=600)
        gen = GenerationArguments(temperature=0.0)
        target.chat(convs[: a.streams], gen, 16)
        before = get_json(srv.url + "/health")[1]["generated_tokens"]
        t = time.perf_counter()
        out = target.chat(convs, gen, a.gen_tokens)
        dt = time.perf_counter() - t
        n = get_json(srv.url + "/health")[1]["generated_tokens"] - before
    failed = sum(not isinstance(o, str) for o in out)
    return {
        "generated_tokens": n,
        "seconds": round(dt, 3),
        "tokens_per_s": round(n / dt, 1),
        "failed": failed,
    }


def _mhsft(argv: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "wb") as f:
        p = subprocess.run(
            [sys.executable, "-m", "mhsft", *argv], stdout=f, stderr=subprocess.STDOUT, env=subprocess_env()
        )
    if p.returncode != 0:
        raise SystemExit(f"mhsft {argv[0]} failed (exit {p.returncode}); see {log}")
    return time.perf_counter() - t


def run_mcq(a) -> dict:
    """A whole CPsyExam-sized run: `mhsft eval` as a user types it, model load included."""
    out = Path(a.workdir) / "mcq"
    shutil.rmtree(out, ignore_errors=True)  # no resume: every question is asked
    argv = ["eval", "--model", a.model_dir, "--eval_dataset", a.data, "--mcq_max_new_tokens", "64",
            "--torch_dtype", a.dtype, "--device", a.device, "--output_dir", str(out), "--n_bootstrap", "0"]  # fmt: skip
    if a.mcq_batch:
        argv += ["--max_batch_size", str(a.mcq_batch)]
    argv += a.mcq_args.split()
    wall = _mhsft(argv, Path(a.workdir) / "mcq.log")
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    mc = [m["multiple_choice"] for m in res["metrics"].values() if "multiple_choice" in m]
    n = sum(m["n"] for m in mc)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    by = {k: sum(r.get("method") == k for r in rows) for k in ("loglikelihood", "generation")}
    return {"questions": n, "wall_s": round(wall, 1), "questions_per_s": round(n / wall, 1), "by_method": by,
            "timing": res.get("timing")}  # fmt: skip


def run_lm_eval(a) -> dict:
    """lm-eval's `hf` backend against `mhsft eval` on the same single-answer questions (log-likelihood), each a
    process with its own model load."""
    lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))
    if not Path(lm_eval).exists() and not shutil.which("lm_eval"):
        return {"skipped": "lm-eval is not installed"}
    tasks = Path(a.workdir) / "lm_eval_tasks"
    shutil.rmtree(tasks, ignore_errors=True)
    _mhsft(["eval", "--eval_dataset", a.data, "--export", "lm_eval", "--output_dir", str(tasks),
            "--model", a.model_dir], Path(a.workdir) / "export.log")  # fmt: skip
    task = _first_task(tasks)
    from mhsft.builtin import resolve_model

    n = a.lm_eval_limit
    cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={resolve_model(a.model_dir)},dtype={a.dtype}",
           "--tasks", task, "--include_path", str(tasks), "--batch_size", str(a.streams), "--limit", str(n),
           "--device", a.device, "--output_path", str(Path(a.workdir) / "lm_eval_out")]  # fmt: skip
    t = time.perf_counter()
    with open(Path(a.workdir) / "lm_eval.log", "wb") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env())
    lm_wall = time.perf_counter() - t
    if p.returncode != 0:
        return {"failed": f"lm_eval exited {p.returncode}; see lm_eval.log"}
    out = Path(a.workdir) / "mcq_single"
    shutil.rmtree(out, ignore_errors=True)
    single = _single_answer_file(a.data, Path(a.workdir) / "single.jsonl", n)
    ours = _mhsft(["eval", "--model", a.model_dir, "--eval_dataset", str(single),
                   "--mcq_mode", "loglikelihood", "--torch_dtype", a.dtype, "--device", a.device,
                   "--output_dir", str(out), "--n_bootstrap", "0"], Path(a.workdir) / "mcq_single.log")  # fmt: skip
    return {"questions": n, "lm_eval_hf_wall_s": round(lm_wall, 1), "mhsft_wall_s": round(ours, 1),
            "mhsft_vs_lm_eval": round(lm_wall / ours, 2)}  # fmt: skip


def _first_task(tasks: Path) -> str:
    """The task lm-eval runs for the single-answer questions (written by the export)."""
    for y in sorted(tasks.glob("*.yaml")):
        text = y.read_text(encoding="utf-8")
        if "output_type: multiple_choice" in text:
            return next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("task:"))
    raise SystemExit(f"no multiple-choice task in {tasks}")


def _single_answer_file(data: str, out: Path, n: int) -> Path:
    """The first n single-answer questions of `data` (those lm-eval's task runs with --limit n) as one JSONL."""
    from mhsft.eval.datasets import load_eval_set

    used, _ = load_eval_set(data, "single")
    with open(out, "w", encoding="utf-8") as f:
        for it in [it for it in used.mcq if not it.multi][:n]:
            rec = {"id": it.id, "question": it.question, "choices": it.options, "answer": ",".join(it.answer)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", default=None, help="a model folder (default: build the random --config)")
    ap.add_argument("--config", default="qwen2.5-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--streams", type=int, default=64, help="requests at once, in both stacks")
    ap.add_argument("--conversations", type=int, default=0, help="timed conversations (default 4 x streams)")
    ap.add_argument("--prompt_tokens", type=int, default=256)
    ap.add_argument("--gen_tokens", type=int, default=256)
    ap.add_argument("--max_model_len", type=int, default=2048)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "eval" / "cpsyexam_train"))
    ap.add_argument(
        "--mcq_batch", type=int, default=0, help="--max_batch_size of the mcq run (0: the default)"
    )
    ap.add_argument("--lm_eval_limit", type=int, default=2000)
    ap.add_argument("--mcq_args", default="", help="more `mhsft eval` flags for the mcq run")
    ap.add_argument("--stacks", default=",".join(STACKS))
    ap.add_argument("--workdir", default="/tmp/eval_bench")
    ap.add_argument("--out", default="eval_throughput.json")
    a = ap.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    if a.model_dir is None:
        from random_model import build

        a.model_dir = str(build(a.config, Path(a.workdir) / a.config, a.device))
    from mhsft.model import load_tokenizer

    convs = conversations(load_tokenizer(a.model_dir), a.conversations or 4 * a.streams, a.prompt_tokens)
    stacks = [s for s in a.stacks.split(",") if s]
    res: dict = {"card": _card(a.device), "model": a.model_dir if a.model_dir.startswith("builtin:") else a.config,
                 "streams": a.streams, "conversations": len(convs), "prompt_tokens": a.prompt_tokens,
                 "gen_tokens": a.gen_tokens, "data": Path(a.data).name}  # fmt: skip
    runners = {"local": lambda: run_local(a, convs), "deploy": lambda: run_deploy(a, convs), "mcq": lambda: run_mcq(a),
               "lm_eval": lambda: run_lm_eval(a)}  # fmt: skip
    for s in stacks:
        print(f"== {s}", flush=True)
        res[s] = runners[s]()
        if s == "mcq" and a.mcq_args:
            res[s]["flags"] = a.mcq_args
        print(json.dumps(res[s]), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=2, ensure_ascii=False), encoding="utf-8")
    if "local" in res and "deploy" in res:
        res["local_tokens_per_s"] = res["local"]["tokens_per_s"]
        res["deploy_tokens_per_s"] = res["deploy"]["tokens_per_s"]
        res["local_vs_deploy"] = round(res["local"]["tokens_per_s"] / res["deploy"]["tokens_per_s"], 3)
    if "mcq" in res:
        res["mcq_questions"], res["mcq_wall_s"] = res["mcq"]["questions"], res["mcq"]["wall_s"]
    Path(a.out).write_text(json.dumps(res, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\n{'stack':<10}{'tokens/s':>12}{'questions':>11}{'wall s':>9}  (on {res['card']})")
    for s in ("local", "deploy"):
        if s in res:
            print(f"{s:<10}{res[s]['tokens_per_s']:>12,.0f}{'':>11}{res[s]['seconds']:>9.1f}")
    if "mcq" in res:
        print(f"{'mcq':<10}{'':>12}{res['mcq']['questions']:>11,}{res['mcq']['wall_s']:>9.1f}")
    if "local_vs_deploy" in res:
        print(f"in-process / deploy at {a.streams} streams: {res['local_vs_deploy']:.2f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
