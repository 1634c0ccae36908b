"""mhsft/serve/backends.py: `mhsft deploy --infer_backend vllm | sglang | lmdeploy`, up to the boundary: the command
lines built (vLLM, SGLang and LMDeploy cannot be installed on these machines) and LMDeploy's merge-first rule, run
for real through `mhsft export` on the tiny model."""

from __future__ import annotations

import pytest

from mhsft.args import parse_args
from mhsft.cli import main
from mhsft.serve import backends
from mhsft.serve.deploy import DeployArguments
from mhsft.utils import UserError


def _deploy_args(*argv):
    a = parse_args(DeployArguments, list(argv), "mhsft deploy")
    a.max_model_len = a.max_model_len or a.session_len
    return a


@pytest.fixture(scope="module")
def ckpt(adapter):
    return adapter


def test_vllm_and_sglang_command_lines(ckpt, tiny_model_dir):
    a = _deploy_args("--adapters", f"mh={ckpt}", "--infer_backend", "vllm", "--served_model_name", "qwen",
                     "--tp", "2", "--api_key", "sk-secret", "--max_model_len", "4096")  # fmt: skip
    cmd, env = backends.build_command(a, "builtin:tiny")
    assert cmd[:3] == ["vllm", "serve", str(tiny_model_dir)]
    assert cmd[cmd.index("--served-model-name") + 1] == "qwen"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-lora" in cmd and cmd[cmd.index("--lora-modules") + 1] == f"mh={ckpt}"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and cmd[cmd.index("--max-model-len") + 1] == "4096"
    assert "sk-secret" not in cmd and env["VLLM_API_KEY"] == "sk-secret"
    # an unnamed adapter takes --served_model_name, as with the pt backend
    a = _deploy_args("--adapters", str(ckpt), "--infer_backend", "sglang", "--served_model_name", "mh-sft-7b",
                     "--session_len", "2048")  # fmt: skip
    cmd, _ = backends.build_command(a, "builtin:tiny")
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and cmd[cmd.index("--model-path") + 1] == str(
        tiny_model_dir
    )
    assert cmd[cmd.index("--lora-paths") + 1] == f"mh-sft-7b={ckpt}"
    assert (
        cmd[cmd.index("--served-model-name") + 1] == "tiny"
        and cmd[cmd.index("--context-length") + 1] == "2048"
    )
    assert cmd[cmd.index("--tp-size") + 1] == "1" and "--stream-interval" not in cmd
    a = _deploy_args("--adapters", str(ckpt), "--infer_backend", "sglang", "--stream_interval", "8")
    cmd, _ = backends.build_command(a, "builtin:tiny")
    assert cmd[cmd.index("--stream-interval") + 1] == "8"


def test_lmdeploy_merges_first(ckpt, tmp_path):
    """LMDeploy cannot apply LoRA: the adapter is merged through the export stage (for real, on the tiny model),
    the merged folder is served, and a second start reuses it."""

    out = tmp_path / "merged"
    a = _deploy_args("--adapters", str(ckpt), "--infer_backend", "lmdeploy", "--served_model_name", "mh-sft-7b",
                     "--tp", "1", "--cache-max-entry-count", "0", "--session-len", "4096", "--merged_dir", str(out))  # fmt: skip
    cmd, _ = backends.build_command(a, "builtin:tiny")
    assert cmd[:4] == ["lmdeploy", "serve", "api_server", str(out)]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (
        cmd[cmd.index("--model-name") + 1] == "mh-sft-7b"
        and cmd[cmd.index("--cache-max-entry-count") + 1] == "0"
    )
    assert cmd[cmd.index("--session-len") + 1] == "4096" and cmd[cmd.index("--tp") + 1] == "1"
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert backends.build_command(a, "builtin:tiny")[0] == cmd
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # reused, not merged again
    two = _deploy_args("--adapters", f"x={ckpt}", f"y={ckpt}", "--infer_backend", "lmdeploy")
    with pytest.raises(UserError, match="one adapter"):
        backends.build_command(two, "builtin:tiny")


def test_missing_engine_is_a_one_line_error(ckpt, monkeypatch):

    monkeypatch.setattr(backends, "_installed", lambda backend: False)
    assert main(["deploy", "--adapters", str(ckpt), "--infer_backend", "vllm"]) == 2
    assert main(["deploy", "--model", "builtin:tiny", "--infer_backend", "tgi"]) == 2
