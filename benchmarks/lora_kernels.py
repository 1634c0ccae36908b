"""The LoRA path of one adapted linear on the GPU: PEFT-style dropout + rank-r matmuls (as mhsft ran it before
`mhsft.train.fused_lora`) against the fused Triton kernels, forward and backward, for Qwen2.5-7B's input widths and
the trainer's token counts; the fused kernels over a few tile sizes. Prints a table, writes JSON.

    python benchmarks/lora_kernels.py --out lora_kernels.json

What is timed, per (tokens M, input width K), rank 8, dropout 0.05, bf16:
- unfused: forward `native_dropout` (x -> copy + mask) and `xd @ A^T`; backward `dh^T @ xd`, `dh @ A`, the
  dropout's backward and the add of that input gradient into the base's (what autograd does when it sums them);
- fused: `dropout_matmul` and `dropout_matmul_backward` (the add happens inside, in place).
The base matmuls are the same in both and left out.

--adopt writes the fastest tiles (by group size, summed over the widths at the largest token count) into
mhsft/train/fused_lora.py's FWD_TILES / BWD_TILES: how the trainer's defaults are chosen on a new card. With
--rounds 10,7 it also writes PHILOX_ROUNDS when fewer rounds make a 7B layer's kernels at least 3% faster (7 is
the floor: Philox4x32-7 is the fewest rounds that pass TestU01's BigCrush, Salmon et al. 2011). --stored_masks times
(and --adopt chooses) the tiles with the masks stored as bits, the kernels the trainer runs once
`fused_lora.store_masks` is on; `--rounds` reports both ways at the default tiles.

--groups 2,3 also times the group kernels (gate/up: 2 members, q/k/v: 3 reading one [M, 3584] input) against
their members' kernels one at a time, over the same tiles (`dropout_matmul_group` and its backward).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mhsft.train import fused_lora  # noqa: E402

# (rows, columns, warps[, pipeline stages]); the first is the trainer's default
TILES = [(64, 128, 4), (32, 128, 4), (32, 256, 4, 4), (16, 128, 4), (16, 256, 4), (16, 64, 4), (64, 64, 4),
         (16, 128, 8), (32, 128, 8), (16, 256, 8), (32, 64, 4)]  # fmt: skip
MIN_ROUNDS = 7


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


def measure(m: int, k: int, r: int, p: float, stored: bool = False) -> dict:
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
    masks = fused_lora.mask_buffer(x, 1) if stored else None
    fwd_t = {
        t: cuda_time(lambda t=t: fused_lora.dropout_matmul_group(x, a[None], p, (7,), t, masks))
        for t in TILES
    }
    bwd_t = {t: cuda_time(lambda t=t: fused_lora.dropout_matmul_backward_group(x, dh[None], a[None], dx, p, (7,), t,
                                                                                masks))
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


def measure_group(m: int, k: int, r: int, p: float, g: int, stored: bool = False) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    a = torch.randn(g, r, k, device=dev, dtype=dt) / k**0.5
    dh = torch.randn(g, m, r, device=dev, dtype=dt)
    dx = torch.randn(m, k, device=dev, dtype=dt)
    seeds = tuple(range(7, 7 + g))
    single_f = cuda_time(lambda: [fused_lora.dropout_matmul(x, a[j], p, seeds[j]) for j in range(g)])
    single_b = cuda_time(
        lambda: [fused_lora.dropout_matmul_backward(x, dh[j], a[j], dx, p, seeds[j]) for j in range(g)]
    )
    masks = fused_lora.mask_buffer(x, g) if stored else None
    fwd_t = {
        t: cuda_time(lambda t=t: fused_lora.dropout_matmul_group(x, a, p, seeds, t, masks)) for t in TILES
    }
    bwd_t = {t: cuda_time(lambda t=t: fused_lora.dropout_matmul_backward_group(x, dh, a, dx, p, seeds, t, masks))
             for t in TILES}  # fmt: skip
    bf, bb = min(fwd_t, key=fwd_t.get), min(bwd_t, key=bwd_t.get)
    return {"M": m, "K": k, "G": g, "singles_fwd_ms": single_f, "singles_bwd_ms": single_b,
            "group_fwd_ms": fwd_t[bf], "group_bwd_ms": bwd_t[bb], "best_fwd_tile": bf, "best_bwd_tile": bb,
            "fwd_ms_by_tile": {str(t): v for t, v in fwd_t.items()},
            "bwd_ms_by_tile": {str(t): v for t, v in bwd_t.items()}}  # fmt: skip


def measure_rounds(m: int, r: int, p: float, rounds: int) -> dict:
    """The trainer's default tiles with `rounds` Philox rounds: per-layer kernel time of a 7B layer (q/k/v and
    gate/up as groups, o and down alone)."""
    fused_lora.PHILOX_ROUNDS = rounds
    dev, dt = torch.device("cuda"), torch.bfloat16
    times, stored = {}, {}
    for g, k in ((3, 3584), (2, 3584), (1, 3584), (1, 18944)):
        x, dx = torch.randn(m, k, device=dev, dtype=dt), torch.randn(m, k, device=dev, dtype=dt)
        a = torch.randn(g, r, k, device=dev, dtype=dt) / k**0.5
        dh = torch.randn(g, m, r, device=dev, dtype=dt)
        seeds = tuple(range(7, 7 + g))
        masks = fused_lora.mask_buffer(x, g)
        fwd = functools.partial(fused_lora.dropout_matmul_group, x, a, p, seeds)
        bwd = functools.partial(fused_lora.dropout_matmul_backward_group, x, dh, a, dx, p, seeds)
        times[f"G{g}_K{k}_fwd_ms"], times[f"G{g}_K{k}_bwd_ms"] = cuda_time(fwd), cuda_time(bwd)
        # the masks stored as bits by the forward and read by the backward (`store_masks`)
        stored[f"G{g}_K{k}_fwd_ms"] = cuda_time(functools.partial(fwd, masks=masks))
        stored[f"G{g}_K{k}_bwd_ms"] = cuda_time(functools.partial(bwd, masks=masks))
    layer = sum(times.values())  # q/k/v, gate/up, o (the single at K = 3584) and down
    return {"M": m, "rounds": rounds, **times, "layer_ms": layer, "stored_masks": stored,
            "layer_stored_ms": sum(stored.values())}  # fmt: skip


def best_tiles(rows: list[dict], groups: list[dict]) -> tuple[dict, dict]:
    """{group size: fastest tile} forward and backward, at the largest token count measured."""
    m = max(row["M"] for row in rows + groups)
    by_g = {1: [row for row in rows if row["M"] == m]}
    for row in groups:
        if row["M"] == m:
            by_g.setdefault(row["G"], []).append(row)
    picked = ({}, {})
    for g, measured in sorted(by_g.items()):
        for kind, out in zip(("fwd", "bwd"), picked):
            total = {
                t: sum(row[f"{kind}_ms_by_tile"][t] for row in measured)
                for t in measured[0][f"{kind}_ms_by_tile"]
            }
            out[g] = ast.literal_eval(min(total, key=total.get))  # the key is str(tuple)
    return picked


def with_tiles(source: str, fwd: dict, bwd: dict) -> str:
    """fused_lora.py's source with its FWD_TILES / BWD_TILES lines set to these tiles."""
    for name, tiles in (("FWD_TILES", fwd), ("BWD_TILES", bwd)):
        start = source.index(f"\n{name} = {{") + 1
        end = source.index("\n", start)
        source = source[:start] + f"{name} = {dict(sorted(tiles.items()))}" + source[end:]
    return source


def fastest_rounds(by_rounds: list[dict], current: int, margin: float = 0.03) -> int:
    """The Philox rounds to keep: the fastest measured, when its 7B layer is `margin` faster than `current`'s (a
    smaller difference is within the card's noise, and more rounds are the safer mask)."""
    m = max(row["M"] for row in by_rounds)
    layer = {row["rounds"]: row["layer_ms"] for row in by_rounds if row["M"] == m}
    best = min(layer, key=layer.get)
    if current in layer and layer[best] > (1 - margin) * layer[current]:
        return current
    return best


def with_rounds(source: str, rounds: int) -> str:
    """fused_lora.py's source with PHILOX_ROUNDS set."""
    start = source.index("\nPHILOX_ROUNDS = ") + 1
    end = source.index("\n", start)
    return source[:start] + f"PHILOX_ROUNDS = {rounds}" + source[end:]


def adopt(fwd: dict, bwd: dict) -> None:
    path = Path(fused_lora.__file__)
    path.write_text(with_tiles(path.read_text(), fwd, bwd))
    fused_lora.FWD_TILES.update(fwd)  # and in this process (the rounds' timings use the defaults)
    fused_lora.BWD_TILES.update(bwd)
    fused_lora._fitted.clear()
    print(f"adopted in {path}: FWD_TILES = {fwd}, BWD_TILES = {bwd}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="6144,12288,24576")
    ap.add_argument("--widths", default="3584,18944")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument(
        "--groups", default="", help="e.g. 2,3: group kernels against their members one at a time"
    )
    ap.add_argument(
        "--rounds", default="", help="e.g. 10,7: a 7B layer's kernels at the default tiles per Philox rounds"
    )
    ap.add_argument("--tiles", default="", help="only these tiles, e.g. '32,128,4;16,64,4' (default: TILES)")
    ap.add_argument(
        "--adopt",
        action="store_true",
        help="write the fastest tiles (and, with --rounds, rounds 3%% faster than the current) into fused_lora.py",
    )
    ap.add_argument(
        "--stored_masks",
        action="store_true",
        help="time the tiles with the masks stored as bits (store_masks)",
    )
    ap.add_argument("--out", default="lora_kernels.json")
    args = ap.parse_args()
    if any(int(v) < MIN_ROUNDS for v in args.rounds.split(",") if v):
        ap.error(f"--rounds: at least {MIN_ROUNDS} (fewer Philox4x32 rounds fail TestU01's BigCrush)")
    r, p = args.rank, args.p
    if args.tiles:
        TILES[:] = [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";")]
    rows = []
    print(f"{torch.cuda.get_device_name()}; rank {r}, dropout {p}, bf16; milliseconds (median of 20)")
    print(
        f"{'M':>6}{'K':>7}{'unfused fwd':>13}{'bwd':>8}{'fused fwd':>11}{'bwd':>8}  best tiles (fwd / bwd)  GB/s"
    )
    for m in map(int, args.tokens.split(",")):
        for k in [int(v) for v in args.widths.split(",") if v]:
            row = measure(m, k, r, p, args.stored_masks)
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
    groups = []
    for m in map(int, args.tokens.split(",")):
        for g in [int(v) for v in args.groups.split(",") if v]:
            row = measure_group(m, 3584, r, p, g, args.stored_masks)
            groups.append(row)
            print(
                f"group of {g} at [{m}, 3584]: one at a time {row['singles_fwd_ms']:.3f} / {row['singles_bwd_ms']:.3f} "
                f"ms, grouped {row['group_fwd_ms']:.3f} / {row['group_bwd_ms']:.3f} ms (fwd / bwd); best tiles "
                f"{row['best_fwd_tile']} / {row['best_bwd_tile']}",
                flush=True,
            )
    adopted = None
    if args.adopt and rows:
        adopted = best_tiles(rows, groups)
        adopt({**fused_lora.FWD_TILES, **adopted[0]}, {**fused_lora.BWD_TILES, **adopted[1]})
    by_rounds, current = [], fused_lora.PHILOX_ROUNDS
    for m in map(int, args.tokens.split(",")):
        for n in [int(v) for v in args.rounds.split(",") if v]:
            row = measure_rounds(m, r, p, n)
            by_rounds.append(row)
            print(
                f"Philox {n} rounds, {m} tokens, default tiles: a 7B layer's LoRA kernels {row['layer_ms']:.3f} ms"
                f" ({row['layer_stored_ms']:.3f} with the masks stored as bits)"
            )
    kept = fused_lora.PHILOX_ROUNDS = fastest_rounds(by_rounds, current) if by_rounds else current
    if args.adopt and kept != current:
        path = Path(fused_lora.__file__)
        path.write_text(with_rounds(path.read_text(), kept))
        print(f"adopted in {path}: PHILOX_ROUNDS = {kept}")
    out = {"device": torch.cuda.get_device_name(), "rank": r, "p": p, "rows": rows, "groups": groups,
           "rounds": by_rounds, "adopted": adopted, "philox_rounds": kept}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
