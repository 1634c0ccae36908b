"""Where a profiled training step's device time goes: top kernels, kernel time by category, GPU busy vs wall,
launches, host-device synchronizations. Used by `train_throughput.py --profile`.

On CUDA the "kernels" are the device events (kernels, memcpy, memset), each tied to the aten op that launched it
(through the profiler's correlation ids) so that GEMMs can be split by shape: a GEMM with a dimension <= 64 is a
LoRA (rank-r) GEMM, one with a vocabulary-sized dimension the LM head, the rest the base model's. On the CPU
(smoke tests) the "kernels" are the aten ops with their self CPU time, which sum without double counting.
"""

from __future__ import annotations

import collections
import gzip
import os
from pathlib import Path

SMALL_GEMM_DIM = 64  # LoRA ranks are 8..64; every base GEMM of a real model has all dims >= 128
CATEGORIES = (
    "gemm_big",  # base-model linears (forward, recompute, input gradients)
    "gemm_lm_head",  # a dimension equal to the vocabulary: the chunked loss's LM head
    "gemm_small_lora",  # a dimension <= 64: the rank-r LoRA matmuls and their gradients
    "gemm_unsized",  # a GEMM kernel whose op shapes were not recorded
    "attention",  # flash / efficient / varlen / flex / sdpa
    "dropout",  # bernoulli, fused dropout, its backward (masked scale)
    "index_mask",  # boolean masks, nonzero, index / index_put / gather / scatter, embedding
    "fused_triton",  # liger (swiglu, rope), torch.compile and other triton kernels
    "norm_reduce",  # rms / layer norm (liger's too), reductions (sum, mean, norm)
    "loss",  # log_softmax / cross-entropy / nll
    "copy_cast",  # copy_, to / _to_copy, clone, cat, memcpy
    "fill_memset",  # fill_, zero_, memset
    "elementwise",  # other elementwise arithmetic (add, mul, silu, ...)
    "optimizer",  # fused AdamW, foreach (grad-norm clipping, zero)
    "nccl",
    "other",
)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_scaled_mm", "aten::addmm_", "aten::_addmm_activation")  # fmt: skip
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
PHASES = ("mhsft::collate_h2d", "mhsft::forward", "mhsft::backward", "mhsft::optimizer")


def _has(text: str, *words: str) -> bool:
    return any(w in text for w in words)


def _gemm_kind(shapes, vocab: int | None) -> str:
    dims = [d for s in shapes or [] if isinstance(s, (list, tuple)) and len(s) >= 2 for d in s[-2:]]
    if not dims:
        return "gemm_unsized"
    if vocab and vocab in dims:
        return "gemm_lm_head"
    return "gemm_small_lora" if min(dims) <= SMALL_GEMM_DIM else "gemm_big"


def categorize(name: str, op: str = "", shapes=None, vocab: int | None = None) -> str:
    """Category of a kernel from its name and the aten op that launched it (with the op's input shapes)."""
    n, o = name.lower(), op.lower()
    both = n + " " + o
    if "nccl" in both:
        return "nccl"
    if n.startswith(
        "memcpy"
    ):  # device events of their own, whatever op issued them (a DtoD copy in addmm, ...)
        return "copy_cast"
    if n.startswith("memset"):
        return "fill_memset"
    if _has(both, "adam", "_foreach", "multi_tensor_apply", "clip_grad"):
        return "optimizer"
    if _has(both, "flash", "fmha", "attention", "varlen", "flex", "scaled_dot_product", "sdpa"):
        return "attention"
    if _has(both, "cross_entropy", "nll_loss", "log_softmax", "softmax"):
        return "loss"
    if o in GEMM_OPS or _has(n, "gemm", "nvjet", "xmma", "cublas", "cutlass", "splitk"):
        return _gemm_kind(shapes, vocab) if o in GEMM_OPS else "gemm_unsized"
    if _has(both, "bernoulli", "dropout", "masked_scale"):
        return "dropout"
    if _has(n, "rms_norm", "layer_norm", "layernorm", "rmsnorm") or _has(o, "norm"):
        return "norm_reduce"
    if _has(both, "triton", "liger", "swiglu", "rope"):
        return "fused_triton"
    if _has(both, "nonzero", "index", "masked_", "scatter", "gather", "embedding", "where"):
        return "index_mask"
    if (
        _has(n, "memcpy")
        or _has(o, "copy", "_to_copy", "aten::to", "clone", "contiguous", "aten::cat")
        or _has(n, "catarray", "copy")
    ):
        return "copy_cast"
    if _has(n, "memset", "fill") or _has(o, "fill_", "zero_", "aten::zeros", "aten::full", "aten::ones"):
        return "fill_memset"
    if _has(n, "reduce") or _has(
        o, "aten::sum", "aten::mean", "aten::amax", "aten::max", "aten::min", "aten::var"
    ):
        return "norm_reduce"
    if _has(n, "elementwise", "vectorized", "unrolled") or o.startswith("aten::"):
        return "elementwise"
    return "other"


def _dims(shapes) -> str:
    """[[24095, 3584], [3584, 8], [], []] -> "24095x3584,3584x8" (scalars dropped)."""
    return ",".join("x".join(str(d) for d in x) for x in shapes or [] if isinstance(x, (list, tuple)) and x)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _phase_of(t: float, phases: list[tuple[float, float, str]]) -> str:
    for s, e, name in phases:
        if s <= t <= e:
            return name.removeprefix("mhsft::")
    return "other"


def cpu_records(events) -> tuple[list[dict], list[tuple[float, float, str]], dict]:
    """The CPU (no GPU): every aten op with its self time (children excluded), so that they sum to the time spent
    in ops. Returns (records {name, op, shapes, start, dur, phase}, phase ranges, syncs (none on the CPU))."""
    from torch.autograd import DeviceType

    phases = [(e.time_range.start, e.time_range.end, e.name) for e in events
              if e.device_type == DeviceType.CPU and e.name in PHASES]  # fmt: skip
    records = []
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async or not e.name.startswith("aten::"):
            continue
        records.append({"name": e.name, "op": e.name, "shapes": e.input_shapes, "start": e.time_range.start,
                        "dur": e.self_cpu_time_total, "phase": _phase_of(e.time_range.start, phases)})  # fmt: skip
    return records, phases, {}


def _enclosing(ops_on_thread: list[dict], t: float, depth: int = 3) -> str:
    inside = [o for o in ops_on_thread if o["ts"] <= t <= o["ts"] + o.get("dur", 0)]
    return " < ".join(o["name"] for o in sorted(inside, key=lambda o: o.get("dur", 0))[:depth])


def trace_records(trace: dict) -> tuple[list[dict], list[tuple[float, float, str]], dict]:
    """A CUDA run, from the profiler's chrome trace (its links are the same across torch versions): each device
    event (kernel, memcpy, memset) is tied to the op that launched it by "External id" (the innermost op, whose
    "Input Dims" size GEMMs) and to its launch call by "correlation" (the launch time gives the phase). The
    synchronizing runtime calls are counted by the ops around them: {"innermost < parent < ...": [count, us]}."""
    ops: dict = {}
    threads: dict = collections.defaultdict(list)
    runtime: dict = {}
    phases, device_events, sync_calls = [], [], []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        cat, args = e.get("cat", ""), e.get("args") or {}
        if cat in ("cpu_op", "user_annotation"):
            if e["name"] in PHASES:
                phases.append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
                continue
            ops[args.get("External id")] = e
            threads[(e.get("pid"), e.get("tid"))].append(e)
        elif cat in ("cuda_runtime", "cuda_driver"):
            runtime[args.get("correlation")] = e
            if (
                e["name"] in SYNC_CALLS
            ):  # .item(), a blocking copy, nonzero, ... (cudaMemcpyAsync alone does not wait)
                sync_calls.append(e)
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            device_events.append(e)
    syncs: dict[str, list] = {}
    for i, e in enumerate(sync_calls):
        where = _enclosing(threads[(e.get("pid"), e.get("tid"))], e["ts"]) if i < 200 else ""
        slot = syncs.setdefault(where or e["name"], [0, 0.0])
        slot[0] += 1
        slot[1] += e.get("dur", 0)
    records = []
    for e in device_events:
        args = e.get("args") or {}
        op = ops.get(args.get("External id"))
        launch = runtime.get(args.get("correlation"))
        t_launch = launch["ts"] if launch else (op["ts"] if op else e["ts"])
        records.append({"name": e["name"], "op": op["name"] if op else "",
                        "shapes": (op.get("args") or {}).get("Input Dims") if op else None,
                        "start": e["ts"], "dur": e.get("dur", 0), "phase": _phase_of(t_launch, phases)})  # fmt: skip
    return records, phases, syncs


def summarize(records: list[dict], phases, syncs: dict, wall_s: float, vocab: int | None = None, top: int = 30,
              device: str = "cuda") -> dict:  # fmt: skip
    """The JSON summary: top kernels, time by category and phase, busy vs wall, launches, syncs."""
    by_name: dict[str, dict] = {}
    gemms: dict[tuple, list] = {}
    cats = dict.fromkeys(CATEGORIES, 0.0)
    cat_n = dict.fromkeys(CATEGORIES, 0)
    phase_us: dict[str, float] = collections.defaultdict(float)
    for r in records:
        cat = categorize(r["name"], r["op"], r["shapes"], vocab)
        cats[cat] += r["dur"]
        cat_n[cat] += 1
        phase_us[r["phase"]] += r["dur"]
        # one row per kernel and category (one GEMM kernel serves several shapes); op and shape: the most time
        k = by_name.setdefault((r["name"], cat), {"us": 0.0, "n": 0, "ops": collections.Counter(),
                                                  "shapes": collections.Counter()})  # fmt: skip
        k["us"] += r["dur"]
        k["n"] += 1
        k["ops"][r["op"]] += r["dur"]
        k["shapes"][_dims(r["shapes"])] += r["dur"]
        if cat.startswith("gemm"):
            g = gemms.setdefault((cat, r["op"], _dims(r["shapes"]), r["phase"]), [0, 0.0])
            g[0] += 1
            g[1] += r["dur"]
    kernel_us = sum(cats.values())
    if device == "cuda":
        busy_us = _union_us([(r["start"], r["start"] + r["dur"]) for r in records])
        span_us = (
            (max(r["start"] + r["dur"] for r in records) - min(r["start"] for r in records))
            if records
            else 0.0
        )
    else:
        busy_us, span_us = kernel_us, wall_s * 1e6
    tops = sorted(by_name.items(), key=lambda kv: -kv[1]["us"])[:top]
    n_mem = sum(1 for r in records if r["name"].startswith(("Memcpy", "Memset")))
    gaps = []
    if device == "cuda":
        seq = sorted(records, key=lambda r: r["start"])
        end, last = float("-inf"), ""
        for r in seq:  # idle time between the end of everything so far and the next kernel's start
            if end > float("-inf") and r["start"] > end:
                gaps.append((r["start"] - end, last, r["name"]))
            if r["start"] + r["dur"] > end:
                end, last = r["start"] + r["dur"], r["name"]
        gaps.sort(reverse=True)
    return {
        "device": device,
        "unit": "device kernels" if device == "cuda" else "aten ops, self CPU time (no GPU)",
        "step_wall_s": round(wall_s, 4),
        "kernel_time_s": round(kernel_us / 1e6, 4),
        "gpu_busy_s": round(busy_us / 1e6, 4),
        "gpu_span_s": round(span_us / 1e6, 4),
        "busy_share_of_wall": round(busy_us / 1e6 / wall_s, 3) if wall_s else None,
        "launches": len(records) - n_mem,
        "memcpy_memset": n_mem,
        "categories_s": {k: round(v / 1e6, 4) for k, v in cats.items()},
        "category_launches": cat_n,
        "phases_s": {k: round(v / 1e6, 4) for k, v in sorted(phase_us.items())},
        "phase_wall_s": {
            n.removeprefix("mhsft::"): round(sum(e - s for s, e, m in phases if m == n) / 1e6, 4)
            for n in PHASES
            if any(m == n for _, _, m in phases)
        },  # fmt: skip
        "idle_gaps": {
            "over_1ms": [
                sum(1 for g in gaps if g[0] >= 1000),
                round(sum(g[0] for g in gaps if g[0] >= 1000) / 1e6, 4),
            ],
            "100us_1ms": [
                sum(1 for g in gaps if 100 <= g[0] < 1000),
                round(sum(g[0] for g in gaps if 100 <= g[0] < 1000) / 1e6, 4),
            ],  # fmt: skip
            "10_100us": [
                sum(1 for g in gaps if 10 <= g[0] < 100),
                round(sum(g[0] for g in gaps if 10 <= g[0] < 100) / 1e6, 4),
            ],
            "largest": [[round(g[0] / 1e3, 2), g[1][:40], g[2][:40]] for g in gaps[:5]],
        },
        "syncs": {
            k: [v[0], round(v[1] / 1e3, 2)] for k, v in sorted(syncs.items(), key=lambda kv: -kv[1][1])[:12]
        },
        "top_kernels": [
            {
                "name": name_cat[0],
                "ms": round(k["us"] / 1e3, 2),
                "n": k["n"],
                "cat": name_cat[1],
                "op": k["ops"].most_common(1)[0][0],
                "shape": k["shapes"].most_common(1)[0][0],
            }
            for name_cat, k in tops
        ],  # fmt: skip
        "top_gemms": [
            {"cat": c, "op": op, "shape": dims, "phase": ph, "n": v[0], "ms": round(v[1] / 1e3, 2)}
            for (c, op, dims, ph), v in sorted(gemms.items(), key=lambda kv: -kv[1][1])[:15]
        ],
    }


def profile_step(step, device: str, wall_timer, vocab: int | None = None, top: int = 30,
                 trace_path: str | None = None) -> dict:  # fmt: skip
    """Run `step()` once under torch.profiler (CPU, plus CUDA on a GPU) and summarize it; `wall_timer(step)` returns
    the step's wall seconds (synchronized). Writes a gzipped chrome trace to `trace_path` + ".gz" when given."""
    import json
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        wall = wall_timer(step)
    path = trace_path or tempfile.mktemp(suffix=".json")
    if device == "cuda" or trace_path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(path)
    if device == "cuda":
        with open(path, encoding="utf-8") as f:
            records, phases, syncs = trace_records(json.load(f))
    else:
        records, phases, syncs = cpu_records(prof.events())
    out = summarize(records, phases, syncs, wall, vocab, top, device)
    out["torch"] = torch.__version__
    if trace_path:
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb", compresslevel=6) as g:
            g.write(f.read())
        out["trace"] = path + ".gz"
    if os.path.exists(path):
        os.remove(path)
    return out


def format_profile(p: dict, label: str = "") -> str:
    """A compact text report (the device run is read through a 12,000-character tail)."""
    lines = [f"--- profile {label}: {p['unit']}; one step, profiled: wall {p['step_wall_s']:.3f} s, kernels "
             f"{p['kernel_time_s']:.3f} s, busy {p['gpu_busy_s']:.3f} s ({p['busy_share_of_wall']:.0%} of wall), "
             f"span {p['gpu_span_s']:.3f} s; {p['launches']} launches + {p['memcpy_memset']} memcpy/memset"]  # fmt: skip
    tot = p["kernel_time_s"] or 1e-12
    lines.append(f"{'category':<16}{'s':>8}{'%':>6}{'launches':>9}")
    for k, v in sorted(p["categories_s"].items(), key=lambda kv: -kv[1]):
        if v or p["category_launches"][k]:
            lines.append(f"{k:<16}{v:>8.4f}{100 * v / tot:>6.1f}{p['category_launches'][k]:>9}")
    lines.append("phases (kernel s by launching phase / CPU wall s): " + ", ".join(
        f"{k} {v:.3f}/{p['phase_wall_s'].get(k, float('nan')):.3f}" for k, v in p["phases_s"].items()))  # fmt: skip
    g = p["idle_gaps"]
    if g["largest"]:
        lines.append(f"idle gaps: >=1ms {g['over_1ms'][0]} ({g['over_1ms'][1]:.3f} s), 0.1-1ms {g['100us_1ms'][0]} "
                     f"({g['100us_1ms'][1]:.3f} s), 10-100us {g['10_100us'][0]} ({g['10_100us'][1]:.3f} s); largest "
                     + "; ".join(f"{ms}ms after {a}" for ms, a, _ in g["largest"][:3]))  # fmt: skip
    if p["syncs"]:
        lines.append(
            "syncs (count, ms) by op: " + "; ".join(f"{k} x{n} {ms}" for k, (n, ms) in p["syncs"].items())
        )
    lines.append("GEMMs by shape (ms, n, category, op, shape, launching phase): " + "; ".join(
        f"{g['ms']:.1f} x{g['n']} {g['cat'].removeprefix('gemm_')} {g['op'].removeprefix('aten::')} {g['shape']} "
        f"{g['phase']}" for g in p["top_gemms"][:12]))  # fmt: skip
    lines.append(f"{'ms':>8}{'%':>5}{'n':>5} {'category':<16}{'op':<21}{'shape':<24}kernel")
    for k in p["top_kernels"]:
        lines.append(f"{k['ms']:>8.1f}{100 * k['ms'] / 1e3 / tot:>5.1f}{k['n']:>5} {k['cat']:<16}{k['op'][:20]:<21}"
                     f"{k['shape'][:23]:<24}{k['name'][:56]}")  # fmt: skip
    return "\n".join(lines)
