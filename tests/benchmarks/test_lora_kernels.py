"""benchmarks/lora_kernels.py's choice of tiles and `--adopt`'s rewrite of fused_lora.py, on made-up timings (the
timings themselves need a GPU)."""

from __future__ import annotations

import ast
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import lora_kernels  # noqa: E402

from mhsft.train import fused_lora  # noqa: E402


def _row(m, ms_fwd: dict, ms_bwd: dict, **key) -> dict:
    return {"M": m, **key, "fwd_ms_by_tile": {str(t): v for t, v in ms_fwd.items()},
            "bwd_ms_by_tile": {str(t): v for t, v in ms_bwd.items()}}  # fmt: skip


def test_fastest_tile_per_group_size_summed_over_widths_at_the_most_tokens():
    a, b = (32, 128, 4), (16, 64, 4, 2)
    rows = [
        _row(24576, {a: 1.0, b: 2.0}, {a: 1.0, b: 0.5}, K=3584),
        _row(24576, {a: 1.0, b: 0.5}, {a: 3.0, b: 3.0}, K=18944),  # fwd: a 2.0 vs b 2.5 summed
        _row(6144, {a: 9.0, b: 0.1}, {a: 9.0, b: 0.1}, K=3584),  # fewer tokens: not counted
    ]
    groups = [_row(24576, {a: 0.3, b: 0.2}, {a: 0.7, b: 0.9}, G=3)]
    fwd, bwd = lora_kernels.best_tiles(rows, groups)
    assert fwd == {1: a, 3: b} and bwd == {1: b, 3: a}


def test_adopt_rewrites_only_the_two_tile_lines():
    source = (REPO / "src" / "mhsft" / "train" / "fused_lora.py").read_text()
    fwd = {1: (16, 64, 4), 2: (64, 64, 4), 3: (16, 128, 4)}
    bwd = {1: (16, 128, 4, 3), 2: (16, 64, 4), 3: (16, 128, 4)}
    new = lora_kernels.with_tiles(source, fwd, bwd)
    changed = [(o, n) for o, n in zip(source.splitlines(), new.splitlines()) if o != n]
    assert [n for _, n in changed] == [f"FWD_TILES = {fwd}", f"BWD_TILES = {bwd}"]
    assert len(new.splitlines()) == len(source.splitlines())
    values = {t.targets[0].id: ast.literal_eval(t.value) for t in ast.parse(new).body
              if isinstance(t, ast.Assign) and getattr(t.targets[0], "id", "").endswith("_TILES")}  # fmt: skip
    assert values == {"FWD_TILES": fwd, "BWD_TILES": bwd}
    assert set(fused_lora.FWD_TILES) == set(fwd)  # every group size the trainer runs has a tile


def test_fewer_rounds_are_kept_only_when_measurably_faster():
    rows = [
        {"M": 24576, "rounds": 10, "layer_ms": 10.0},
        {"M": 24576, "rounds": 7, "layer_ms": 9.8},  # 2%: within the noise
        {"M": 6144, "rounds": 7, "layer_ms": 1.0},  # fewer tokens: not counted
    ]
    assert lora_kernels.fastest_rounds(rows, current=10) == 10
    rows[1]["layer_ms"] = 8.5
    assert lora_kernels.fastest_rounds(rows, current=10) == 7
    assert lora_kernels.fastest_rounds(rows, current=7) == 7


def test_adopt_rewrites_only_the_rounds_line():
    source = (REPO / "src" / "mhsft" / "train" / "fused_lora.py").read_text()
    new = lora_kernels.with_rounds(source, 7)
    changed = [n for o, n in zip(source.splitlines(), new.splitlines()) if o != n]
    assert changed == (["PHILOX_ROUNDS = 7"] if fused_lora.PHILOX_ROUNDS != 7 else [])
    assert len(new.splitlines()) == len(source.splitlines())
