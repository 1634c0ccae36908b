"""`mhsft deploy --infer_backend vllm|sglang|lmdeploy`: start that engine's own OpenAI-compatible server with
the flags that match ours. vLLM and SGLang serve LoRA adapters by name; LMDeploy cannot apply a LoRA adapter to
its TurboMind engine, so the adapter is merged into the base model first, by running the export stage
(`mhsft export`, its own process: serving and exporting are independent stages), and the merged folder is served.

None of these engines can be installed on the CPU machines the tests run on: the tests check the command lines
built and the merge-first rule, not the engines themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mhsft.checkpoint import export_matches
from mhsft.client import ensure_loopback_no_proxy
from mhsft.model import DTYPES, model_ids, parse_adapters, resolve_model_dir
from mhsft.utils import MASK, UserError, get_logger


def _lora_rank(path: str) -> int | None:
    try:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
        return int(cfg.get("r") or 0) or None
    except (OSError, ValueError, TypeError):
        return None


def vllm_command(args, base_dir: str, adapters: dict[str, str], served: str) -> tuple[list[str], dict]:
    cmd = ["vllm", "serve", base_dir, "--host", args.host, "--port", str(args.port)]
    cmd += ["--served-model-name", served, "--tensor-parallel-size", str(args.tp)]
    if args.torch_dtype not in (None, "", "auto"):
        cmd += ["--dtype", args.torch_dtype]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.max_batch_size:
        cmd += ["--max-num-seqs", str(args.max_batch_size)]
    if args.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", f"{args.gpu_memory_utilization:g}"]
    if adapters:
        cmd += ["--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
        ranks = [r for p in adapters.values() if (r := _lora_rank(p))]
        if ranks:
            cmd += ["--max-lora-rank", str(max(ranks)), "--max-loras", str(len(adapters))]
    env = {}
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key  # not on the command line, where `ps` would show it
    return cmd, env


def sglang_command(args, base_dir: str, adapters: dict[str, str], served: str) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", base_dir]
    cmd += [
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--served-model-name",
        served,
        "--tp-size",
        str(args.tp),
    ]
    if args.torch_dtype not in (None, "", "auto"):
        cmd += ["--dtype", args.torch_dtype]
    if args.max_model_len:
        cmd += ["--context-length", str(args.max_model_len)]
    if args.max_batch_size:
        cmd += ["--max-running-requests", str(args.max_batch_size)]
    if args.gpu_memory_utilization:
        cmd += ["--mem-fraction-static", f"{args.gpu_memory_utilization:g}"]
    if args.stream_interval != 1:
        cmd += ["--stream-interval", str(args.stream_interval)]
    if adapters:
        cmd += ["--lora-paths", *(f"{n}={p}" for n, p in adapters.items())]
        cmd += ["--max-loras-per-batch", str(len(adapters))]
        ranks = [r for p in adapters.values() if (r := _lora_rank(p))]
        if ranks:
            cmd += ["--max-lora-rank", str(max(ranks))]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd, {}


def lmdeploy_command(args, model_dir: str, served: str) -> tuple[list[str], dict]:
    cmd = ["lmdeploy", "serve", "api_server", model_dir, "--server-name", args.host]
    cmd += ["--server-port", str(args.port), "--model-name", served, "--tp", str(args.tp)]
    if args.cache_max_entry_count is not None:
        cmd += ["--cache-max-entry-count", f"{args.cache_max_entry_count:g}"]
    if args.max_model_len:
        cmd += ["--session-len", str(args.max_model_len)]
    if args.max_batch_size:
        cmd += ["--max-batch-size", str(args.max_batch_size)]
    if args.api_key:
        cmd += ["--api-keys", args.api_key]
    return cmd, {}


def merged_model_dir(args, base: str, adapters: dict[str, str]) -> str:
    """LMDeploy serves one merged model: merge the (single) adapter into its base, once, with `mhsft export`.
    The merged folder defaults to `CKPT-merged` beside the checkpoint (ms-swift's layout) and is reused when it
    already holds this adapter merged in this dtype (the export records the adapter's hash)."""
    if not adapters:
        return base
    if len(adapters) > 1:
        raise UserError(
            "lmdeploy serves one model and cannot apply LoRA adapters: give one adapter (it is merged first), "
            "or use --infer_backend vllm / sglang / pt to serve several by name"
        )
    ((_, path),) = adapters.items()
    out = Path(args.merged_dir or f"{str(path).rstrip('/')}-merged")
    dtype = None if args.torch_dtype in (None, "", "auto") else DTYPES.get(args.torch_dtype.lower())
    if export_matches(out, Path(path), dtype, base):
        get_logger().info(f"lmdeploy cannot apply LoRA adapters: serving {out}, {path} merged before")
        return str(out)
    get_logger().info(f"lmdeploy cannot apply LoRA adapters: merging {path} into {base} first ({out})")
    cmd = [sys.executable, "-m", "mhsft", "export", "--model", base, "--adapters", str(path)]
    cmd += ["--output_dir", str(out), "--overwrite", "true", "--use_hf", str(args.use_hf).lower()]
    if dtype:
        cmd += ["--merge_dtype", dtype]
    env = dict(os.environ)
    if args.hub_token:  # through the environment: a command line is visible to every user in `ps`
        env["HF_TOKEN" if args.use_hf else "MODELSCOPE_API_TOKEN"] = args.hub_token
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise UserError(f"merging {path} for lmdeploy failed (mhsft export exited with {code}; see above)")
    return str(out)


def build_command(args, base: str) -> tuple[list[str], dict]:
    """The engine's command line and extra environment for `args` (a DeployArguments)."""
    adapters = parse_adapters(args.adapters)
    base_dir = resolve_model_dir(base, args.use_hf, args.hub_token)
    ids = model_ids(base, args.adapters, args.served_model_name)
    if args.infer_backend == "lmdeploy":
        served = args.served_model_name or list(ids)[-1]  # the merged model, else the base
        return lmdeploy_command(args, merged_model_dir(args, base_dir, adapters), served)
    # vLLM / SGLang serve the base under one name and each adapter under its own; an unnamed adapter takes
    # --served_model_name as ours does.
    base_id = next(m for m, a in ids.items() if a is None)
    lora = {m: adapters[a] for m, a in ids.items() if a is not None}
    if args.infer_backend == "vllm":
        return vllm_command(args, base_dir, lora, base_id)
    if args.infer_backend == "sglang":
        return sglang_command(args, base_dir, lora, base_id)
    raise UserError(f"unknown --infer_backend {args.infer_backend!r}: use pt, vllm, sglang or lmdeploy")


def _installed(backend: str) -> bool:
    if backend == "sglang":
        return importlib.util.find_spec("sglang") is not None
    return shutil.which(backend) is not None


def shown(cmd: list[str], secret: str | None) -> str:
    return " ".join(MASK if secret and a == secret else shlex.quote(a) for a in cmd)


def run_engine(args, base: str) -> int:
    """Start the engine's server in the foreground and return its exit code."""
    backend = args.infer_backend
    if backend not in ("vllm", "sglang", "lmdeploy"):
        raise UserError(f"unknown --infer_backend {backend!r}: use pt, vllm, sglang or lmdeploy")
    if not _installed(backend):
        raise UserError(f"--infer_backend {backend}: {backend} is not installed (pip install {backend})")
    cmd, extra = build_command(args, base)
    env = {**os.environ, **extra}
    ensure_loopback_no_proxy(env)
    get_logger().info(f"starting: {shown(cmd, args.api_key)}")
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
