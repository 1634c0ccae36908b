"""benchmarks/kernel_registers.py on the CPU: the fused LoRA kernels compile for sm_90 with the arguments the trainer
launches them with (the tool breaks if the kernels' signatures change), and the resource usage reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

triton = pytest.importorskip("triton", reason="the fused LoRA kernels need Triton")
if not (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump").exists():
    pytest.skip("this Triton build ships no cuobjdump", allow_module_level=True)


def test_register_table_for_a_group_and_a_single_kernel(tmp_path):
    out = tmp_path / "regs.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "kernel_registers.py"), "--tiles", "16,64,4;64,128,4",
           "--groups", "1,3", "--kinds", "bwd", "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["members"], tuple(r["tile"])) for r in rows] == [(1, (16, 64, 4)), (1, (64, 128, 4)),
                                                               (3, (16, 64, 4)), (3, (64, 128, 4))]  # fmt: skip
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0 and r["shared"] > 0
    # the three-member backward at the old default tile spills; a 16-row tile does not (the reason for the tool)
    by = {(r["members"], tuple(r["tile"])): r for r in rows}
    assert by[(3, (64, 128, 4))]["stack"] > 0 and by[(3, (16, 64, 4))]["stack"] == 0
    assert "spills" in p.stdout
