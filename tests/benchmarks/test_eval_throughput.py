"""benchmarks/eval_throughput.py on the CPU (tiny model, a few questions): every stack runs, the JSON has the keys
the issue asks for, and in-process and deploy generated the same number of tokens."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_eval_throughput_smoke_on_cpu(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "eval_throughput.py"), "--model_dir", "builtin:tiny",
           "--device", "cpu", "--streams", "4", "--gen_tokens", "8", "--prompt_tokens", "32",
           "--data", str(REPO / "examples" / "data" / "demo_mcq.jsonl"), "--workdir", str(tmp_path),
           "--stacks", "local,deploy,mcq", "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    for key in (
        "card",
        "local_tokens_per_s",
        "deploy_tokens_per_s",
        "local_vs_deploy",
        "mcq_questions",
        "mcq_wall_s",
    ):
        assert key in r, key
    assert r["card"] == "cpu" and r["mcq_questions"] == 20 and r["mcq"]["by_method"] == {"loglikelihood": 14,
                                                                                        "generation": 6}  # fmt: skip
    assert (
        r["local"]["generated_tokens"] == r["deploy"]["generated_tokens"] == 16 * 8
    )  # 4 x streams conversations
    assert "in-process / deploy at 4 streams" in p.stdout
