"""The LoRA path of one adapted linear on the GPU: PEFT-style dropout + rank-r matmuls (as mhsft ran it before
`mhsft.train.fused_lora`) against the fused Triton kernels, forward and backward, for Qwen2.5-7B's input widths and
the trainer's token counts; the fused kernels over a few tile sizes. Prints a table, writes JSON.

    python benchmarks/lora_kernels.py --out lora_kernels.json

What is timed, per (tokens M, input width K), rank 8, dropout 0.05, bf16:
- unfused: forward `native_dropout` (x -> copy + mask) and `xd @ A^T`; backward `dh^T @ xd`, `dh @ A`, the
  dropout's backward and the add of that input gradient into the base's (what autograd does when it sums them);
- fused: `dropout_matmul` and `dropout_matmul_backward` (the add happens inside, in place).
The base matmuls are the same in both and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mhsft.train import fused_lora  # noqa: E402

# (rows, columns, warps[, pipeline stages]); the first is the trainer's default
TILES = [(64, 128, 4), (64, 64, 4), (128, 64, 4), (32, 128, 4), (64, 128, 8), (128, 128, 8), (64, 128, 4, 2),
         (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 4), (32, 256, 4, 4), (128, 256, 8, 3), (64, 64, 4, 5)]  # fmt: skip


def cuda_time(fn, iters: int = 20) -> float:
    """Median milliseconds of `fn` over `iters` runs, by CUDA events (after 3 warm-up runs)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(m: int, k: int, r: int, p: float) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    a = torch.randn(r, k, device=dev, dtype=dt) / k**0.5
    dh = torch.randn(m, r, device=dev, dtype=dt)
    dx = torch.randn(m, k, device=dev, dtype=dt)
    held = {}

    def unfused_fwd():
        held["xd"], held["mask"] = torch.native_dropout(x, p, True)
        return held["xd"] @ a.t()

    def unfused_bwd():
        _ = dh.t() @ held["xd"]
        dxl = torch.ops.aten.native_dropout_backward(dh @ a, held["mask"], 1 / (1 - p))
        dx.add_(dxl)

    unfused_fwd()
    row = {"M": m, "K": k, "unfused_fwd_ms": cuda_time(unfused_fwd), "unfused_bwd_ms": cuda_time(unfused_bwd)}
    fwd_t = {t: cuda_time(lambda t=t: fused_lora.dropout_matmul(x, a, p, 7, tile=t)) for t in TILES}
    bwd_t = {t: cuda_time(lambda t=t: fused_lora.dropout_matmul_backward(x, dh, a, dx, p, 7, tile=t))
             for t in TILES}  # fmt: skip
    bf, bb = min(fwd_t, key=fwd_t.get), min(bwd_t, key=bwd_t.get)
    row.update(fused_fwd_ms=fwd_t[bf], fused_bwd_ms=bwd_t[bb], best_fwd_tile=bf, best_bwd_tile=bb,
               fwd_ms_by_tile={str(t): v for t, v in fwd_t.items()},
               bwd_ms_by_tile={str(t): v for t, v in bwd_t.items()})  # fmt: skip
    # bytes the fused kernels must move: x once forward; x, dx read and dx written backward
    gbs_f = m * k * 2 / (fwd_t[bf] * 1e-3) / 1e9
    gbs_b = m * k * 6 / (bwd_t[bb] * 1e-3) / 1e9
    row.update(fused_fwd_gbs=round(gbs_f), fused_bwd_gbs=round(gbs_b))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="6144,12288,24576")
    ap.add_argument("--widths", default="3584,18944")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--out", default="lora_kernels.json")
    args = ap.parse_args()
    r, p = args.rank, args.p
    rows = []
    print(f"{torch.cuda.get_device_name()}; rank {r}, dropout {p}, bf16; milliseconds (median of 20)")
    print(
        f"{'M':>6}{'K':>7}{'unfused fwd':>13}{'bwd':>8}{'fused fwd':>11}{'bwd':>8}  best tiles (fwd / bwd)  GB/s"
    )
    for m in map(int, args.tokens.split(",")):
        for k in map(int, args.widths.split(",")):
            row = measure(m, k, r, p)
            rows.append(row)
            bf, bb, gbs_f, gbs_b = (
                row[n] for n in ("best_fwd_tile", "best_bwd_tile", "fused_fwd_gbs", "fused_bwd_gbs")
            )
            print(
                f"{m:>6}{k:>7}{row['unfused_fwd_ms']:>13.3f}{row['unfused_bwd_ms']:>8.3f}{row['fused_fwd_ms']:>11.3f}"
                f"{row['fused_bwd_ms']:>8.3f}  {bf} / {bb}  {gbs_f:.0f} / {gbs_b:.0f}",
                flush=True,
            )
    # per 7B layer: six linears read a [M, 3584] input (q, k, v, o, gate, up), down_proj a [M, 18944] one
    for m in sorted({row["M"] for row in rows}):
        by_k = {row["K"]: row for row in rows if row["M"] == m}
        if {3584, 18944} <= by_k.keys():
            layer = {
                kind: 6 * (by_k[3584][f"{kind}_fwd_ms"] + by_k[3584][f"{kind}_bwd_ms"])
                + by_k[18944][f"{kind}_fwd_ms"]
                + by_k[18944][f"{kind}_bwd_ms"]
                for kind in ("unfused", "fused")
            }
            print(
                f"per 7B layer at {m} tokens: unfused {layer['unfused']:.2f} ms, fused {layer['fused']:.2f} ms; "
                f"x 28 layers: {28 * (layer['unfused'] - layer['fused']):.0f} ms saved per micro-batch"
            )
    out = {"device": torch.cuda.get_device_name(), "rank": r, "p": p, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
