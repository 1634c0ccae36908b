"""Registers, spills and shared memory of the fused LoRA kernels per tile, compiled for Hopper (sm_90) on a machine
without a GPU: Triton compiles to a cubin with its own ptxas, and cuobjdump reads the resource usage. Prints a table;
writes JSON.

    python benchmarks/kernel_registers.py --tiles "32,128,4;16,128,4" --groups 1,2,3 --out kernel_registers.json

Why: the GPU is lent in short calls, and a tile sweep on it (benchmarks/lora_kernels.py) costs minutes. A tile whose
kernel spills (255 registers and a stack) runs latency-bound at 1-2 programs per SM: on an H100 the 3-member backward
took 2.98 ms at (64, 128, 4), which spills 2 KB, against 0.70 ms at (32, 128, 4) (benchmarks/NOTES.md, session 8).
This ranks nothing by speed; it tells which tiles are worth the GPU's time.

The kernels are compiled as the trainer launches them: bf16 data, rank block 16, pointers and K specialized as
multiples of 16 (Triton does that for the real arguments), M left unspecialized (`do_not_specialize`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIGNATURES = {
    "fwd": {"x_ptr": "*bf16", "a_ptr": "*bf16", "part_ptr": "*bf16", "mask_ptr": "*u8", "M": "i32", "K": "i32", "r": "i32",
            "k_per_split": "i32", "s0": "i32", "s1": "i32", "s2": "i32", "threshold": "i32", "scale": "fp32"},
    "bwd": {"x_ptr": "*bf16", "dh_ptr": "*bf16", "a_ptr": "*bf16", "dx_ptr": "*bf16", "part_ptr": "*fp32",
            "mask_ptr": "*u8", "M": "i32", "K": "i32", "r": "i32", "m_per_split": "i32", "s0": "i32", "s1": "i32", "s2": "i32",
            "threshold": "i32", "scale": "fp32"},
}  # fmt: skip
MULTIPLES_OF_16 = (
    "x_ptr",
    "dh_ptr",
    "a_ptr",
    "dx_ptr",
    "part_ptr",
    "mask_ptr",
    "K",
    "m_per_split",
    "k_per_split",
)


def usage(kind: str, members: int, tile: tuple, rounds: int = 10, stored: bool = False) -> dict:
    """{registers, stack, shared} of one kernel at one tile, compiled for sm_90; `stored`: the forward storing its
    masks as bits and the backward reading them (`fused_lora.store_masks`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mhsft.train import fused_lora

    bm, bk, warps, *stages = tile
    consts = {"G": members, "BM": bm, "BK": bk, "R": 16, "ROUNDS": rounds}
    if kind == "bwd":
        consts.update(HAS_DX=True, LOAD=stored)
    else:
        consts["STORE"] = stored
    signature = {**SIGNATURES[kind], **{name: "constexpr" for name in consts}}
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in MULTIPLES_OF_16 if n in names}
    fn = fused_lora._fwd if kind == "fwd" else fused_lora._bwd
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, **({"num_stages": stages[0]} if stages else {})}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 128), options=options)
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run(
            [str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out[-300:]}")
    return {"registers": int(found.group(1)), "stack": int(found.group(2)), "shared": kernel.metadata.shared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", default="64,128,4;32,128,4;32,256,4,4;16,128,4;16,256,4;16,64,4;64,64,4")
    ap.add_argument("--groups", default="1,2,3")
    ap.add_argument("--kinds", default="fwd,bwd")
    ap.add_argument(
        "--stored_masks", action="store_true", help="the kernels that store / read the masks as bits"
    )
    ap.add_argument("--out", default="kernel_registers.json")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is what runs
    os.environ.pop("TRITON_INTERPRET", None)  # compile, even when called from the tests (which interpret)
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";")]
    rows = []
    print(f"{'kernel':<8}{'members':>8}  {'tile':<18}{'registers':>10}{'stack B':>9}{'shared B':>10}")
    for kind in args.kinds.split(","):
        for g in map(int, args.groups.split(",")):
            for tile in tiles:
                row = {
                    "kernel": kind,
                    "members": g,
                    "tile": tile,
                    **usage(kind, g, tile, stored=args.stored_masks),
                }
                rows.append(row)
                spill = "  spills" if row["stack"] else ""
                usage_text = f"{row['registers']:>10}{row['stack']:>9}{row['shared']:>10}{spill}"
                print(f"{kind:<8}{g:>8}  {str(tile):<18}{usage_text}", flush=True)
    Path(args.out).write_text(json.dumps({"target": "sm_90", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
