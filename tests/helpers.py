"""What several test modules share: the repository's root, running the CLI in-process, reading a SwanLab run, and a
scripted OpenAI-compatible server (a judge or an endpoint whose answers a test decides)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from mhsft import cli

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "examples" / "data" / "demo_sharegpt.jsonl")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `mhsft ARGV` in-process: (exit code, stdout, stderr). A traceback is a failure."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        rc = e.code if isinstance(e.code, int) else 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def swanlab_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Metrics as SwanLab stored them: the run-*.swanlab file is a LevelDB-style log of protobuf Records;
    SwanLab's own reader (the one `swanlab sync` uses) decodes it."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (path,) = run_dir.glob("swanlog/run-*/run-*.swanlab")
    reader = DataStoreReader()
    reader.open(path)
    out: dict[str, dict[int, float]] = {}
    try:
        for data in reader:
            rec = Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "scalar":
                out.setdefault(rec.scalar.key, {})[rec.scalar.step] = rec.scalar.value.number
    finally:
        reader.close()
    return out


class StubServer:
    """A scripted OpenAI-compatible chat server on loopback: `reply(body)` gives the text, or an int status for
    an error."""

    def __init__(self, reply, model="stub"):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI()
        self.calls = 0

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "test"}]}

        @app.post("/v1/chat/completions")
        def chat(body: dict):
            self.calls += 1
            text = reply(body)
            if isinstance(text, int):
                err = {"message": "scripted failure", "type": "invalid_request_error", "code": None}
                return JSONResponse({"error": err}, status_code=text)
            msg = {"role": "assistant", "content": text}
            return {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        from mhsft.client import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_sft(tmp_path: Path, *extra: str, dataset: str = DEMO, monkeypatch=None) -> Path:
    """Run `mhsft sft` in-process on the tiny model; returns the run directory."""
    out = tmp_path / "out"
    argv = [
        "sft", "--model", "builtin:tiny", "--train_type", "lora", "--dataset", dataset,
        "--output_dir", str(out), "--report_to", "none", "--max_length", "256", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--gradient_checkpointing", "false", *extra,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    runs = sorted(p for p in out.iterdir() if p.name.startswith("v"))
    return runs[-1]


def read_log(run: Path) -> list[dict]:
    lines = (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if "loss" in json.loads(x)]
