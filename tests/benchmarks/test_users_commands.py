"""benchmarks/users_commands.py on the CPU (the tiny config): the users' command through the CLI beside HF + PEFT
on the CLI's own first micro-batches, with the JSON layout the GPU runs commit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from helpers import DEMO, REPO

# the QLoRA stacks where bitsandbytes is installed (the test extra has it): a random-weight folder loaded in 4 bits
STACKS = "hf_peft,mhsft_cli,mhsft_cli+concat+gqanative" + (
    ",mhsft_cli_qlora,hf_peft_bnb" if importlib.util.find_spec("bitsandbytes") else ""
)


def test_users_commands_on_cpu_tiny(tmp_path):
    out = tmp_path / "uc.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "users_commands.py"), "--device", "cpu", "--models", "tiny",
           "--steps", "2", "--stacks", STACKS, "--data", DEMO + "#16", "--workdir", str(tmp_path),
           "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["card"] == "cpu"
    for stack in STACKS.split(","):
        assert r["tiny"][stack]["tokens_per_s"] > 0 and "error" not in r["tiny"][stack]
    cli = r["tiny"]["mhsft_cli"]
    assert len(cli["losses"]) == 2 and cli["plan"].startswith("plan: 2 x 256 x 2 accumulation")
    assert "hf_peft" in p.stdout and "mhsft_cli" in p.stdout  # the table
    # a stack's switches are set in the CLI's own process (they change nothing on the CPU: no fused path there)
    log = (tmp_path / "tiny-mhsft_cli+concat+gqanative.log").read_text(encoding="utf-8")
    assert "[users_commands] switched on: concat+gqanative" in log


def test_every_switch_sets_what_it_names():
    """Each `+switch` statement runs in a fresh interpreter (a misspelt module or attribute would only show on the
    GPU machine, as a failed stack) and sets the attribute it names."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import users_commands
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for name, statement in users_commands.SWITCHES.items():
        check = (
            statement
            + "; import mhsft.train.plan as p, mhsft.train.concat_update as c, mhsft.packed_attention as a"
            "; print(p.RECOMPUTE_MLP, c.enabled, a._gqa_native[0])"
        )
        r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
        assert r.returncode == 0, (name, r.stderr[-800:])
        mlp, concat, native = r.stdout.split()
        assert (mlp == "False") == (name == "nomlp"), name
        assert (concat == "True") == (name == "concat"), name
        assert (native == "False") == (name == "expandkv"), name
