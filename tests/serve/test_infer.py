"""`mhsft infer`: the interactive chat under LANG=C, batch files and stdin, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mhsft.cli import main


def _env() -> dict:
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}
    env.pop("PYTHONUTF8", None)
    return env


def test_interactive_chat_under_lang_c(adapter):
    """Commands and Chinese text through a pipe under LANG=C; --model comes from the checkpoint."""
    script = "你好，我最近压力很大\nmulti-line\n第一行\n第二行#\nsingle-line#\nreset-system\n你是一位心理咨询师\nclear\n谢谢\nexit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "mhsft", "infer", "--adapters", str(adapter), "--max_new_tokens", "6",
         "--stream", "true", "--max_model_len", "512"],
        input=script.encode("utf-8"), capture_output=True, env=_env(), timeout=120,
    )  # fmt: skip
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out.count(">>> ") == 3  # three questions answered, commands are not sent to the model
    assert "(multi-line input" in out and "(system prompt set" in out and "(conversation cleared)" in out
    assert "<<<[M] " in out


def test_batch_inference_file_and_stdin(adapter, tmp_path):
    data = tmp_path / "in.jsonl"
    rows = [
        {"id": 1, "messages": [{"role": "user", "content": "你好"}]},
        {"conversations": [{"from": "human", "value": "失眠怎么办"}, {"from": "gpt", "value": "参考回答"}]},
        {"query": "考试焦虑", "history": [["在吗", "在的"]], "system": "你是咨询师"},
        {"messages": [{"role": "assistant", "content": "只有回答"}]},
    ]
    data.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\nnot json\n", encoding="utf-8"
    )
    out = tmp_path / "out.jsonl"
    rc = main(["infer", "--adapters", str(adapter), "--infer_data", str(data), "--result_path", str(out),
               "--max_new_tokens", "5", "--max_batch_size", "2"])  # fmt: skip
    assert rc == 0
    res = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(res) == 3
    assert res[0]["id"] == "1" and res[0]["messages"][-1] == {
        "role": "assistant",
        "content": res[0]["response"],
    }
    assert res[1]["labels"] == "参考回答" and [m["role"] for m in res[1]["messages"]] == ["user", "assistant"]
    assert [m["role"] for m in res[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    # stdin in, JSONL out on stdout; greedy, so the same replies
    proc = subprocess.run(
        [sys.executable, "-m", "mhsft", "infer", "--adapters", str(adapter), "--infer_data", "-",
         "--max_new_tokens", "5"],
        input=data.read_bytes(), capture_output=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    again = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert [r["response"] for r in again] == [r["response"] for r in res]
    assert "not json" not in proc.stdout.decode() and "invalid JSON" in proc.stderr.decode()


def test_infer_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["infer", "--infer_backend", "vllm", "--model", "builtin:tiny"]) == 2
    assert main(["infer"]) == 2  # no model, no adapter
    assert main(["infer", "--model", "builtin:tiny", "--infer_data", str(tmp_path / "missing.jsonl")]) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written for a run that could not start
