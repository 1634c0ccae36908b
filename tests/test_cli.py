"""The `mhsft` dispatcher: stage list and help, one-line errors and exit codes, UTF-8 output whatever the
locale, and `.env` loading without leaking its values."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from helpers import run_cli
from mhsft import cli
from mhsft.data.schema import DataError, Source
from mhsft.utils import UserError

FAKE_KEY = "sk-fake-0123456789abcdef"


run = run_cli


def run_subprocess(args: list[str], cwd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    env.update({"LANG": "C", "LC_ALL": "C", **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-m", "mhsft", *args], cwd=cwd, env=env, capture_output=True, timeout=120
    )


def test_help_lists_every_stage(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for stage in cli.STAGES:
        assert f"\n  {stage} " in out
    assert run([], capsys)[1] == out


@pytest.mark.parametrize("stage", sorted(cli.STAGES))
def test_every_stage_has_help(stage, capsys):
    rc, out, err = run([stage, "--help"], capsys)
    assert rc == 0, err
    assert "usage" in out.lower()
    assert "Traceback" not in out + err


def test_unknown_stage_is_one_line_exit_2(capsys):
    rc, out, err = run(["trian"], capsys)
    assert rc == 2
    assert err.strip().count("\n") == 0 and "unknown stage 'trian'" in err and "sft" in err


def test_version(capsys):
    from mhsft import __version__

    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"mhsft {__version__}"


@pytest.fixture
def fake_stage(monkeypatch):
    """A stage `fake` whose main runs the function the test assigns to `fake_stage.behaviour`."""
    module = types.ModuleType("mhsft_test_fake_stage")
    module.behaviour = lambda argv: 0
    module.main = lambda argv: module.behaviour(argv)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.STAGES, "fake", (module.__name__, "a stage for tests"))
    return module


def _raise(exc):
    def f(argv):
        raise exc

    return f


@pytest.mark.parametrize(
    "exc, rc, text",
    [
        (UserError("no such thing"), 2, "error: no such thing"),
        (DataError(Source("a.jsonl", 3, line=4, id="x"), "empty text"), 2, "a.jsonl:4: record x: empty text"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (BrokenPipeError(), 141, ""),
    ],
)
def test_stage_errors_become_one_line_and_exit_code(fake_stage, capsys, exc, rc, text):
    fake_stage.behaviour = _raise(exc)
    got, out, err = run(["fake"], capsys)
    assert got == rc
    assert "Traceback" not in err
    assert text in err and len(err.strip().splitlines()) <= 1


def test_dotenv_is_loaded_and_never_printed(fake_stage, tmp_path, monkeypatch, capsys):
    for name in ("SWANLAB_API_KEY", "DATASET_ID"):
        monkeypatch.setenv(name, "x")  # records the original state, restored after the test
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_text(
        f'SWANLAB_API_KEY="{FAKE_KEY}"\nDATASET_ID=org/counsel\n', encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    seen = {}

    def behaviour(argv):
        seen.update(os.environ)
        from mhsft.utils import get_logger

        get_logger().info(f"using key {os.environ['SWANLAB_API_KEY']}")  # a careless log line
        raise UserError(f"bad token {FAKE_KEY}")

    fake_stage.behaviour = behaviour
    rc, out, err = run(["fake"], capsys)
    assert seen["SWANLAB_API_KEY"] == FAKE_KEY and seen["DATASET_ID"] == "org/counsel"
    assert rc == 2
    assert FAKE_KEY not in out + err and "***" in err


def test_dotenv_does_not_override_the_environment(fake_stage, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATASET_ID", "from-shell")
    (tmp_path / ".env").write_text("DATASET_ID=from-dotenv\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    fake_stage.behaviour = lambda argv: 0 if os.environ["DATASET_ID"] == "from-shell" else 1
    assert run(["fake"], capsys)[0] == 0


def test_unreadable_dotenv_is_one_line_without_its_text(fake_stage, tmp_path, monkeypatch, capsys):
    (tmp_path / ".env").write_bytes(f"HF_TOKEN={FAKE_KEY}\n".encode() + b"BAD=\xff\xfe\n")
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(["fake"], capsys)
    assert rc == 2
    assert ".env: not UTF-8 text" in err and len(err.strip().splitlines()) == 1
    assert FAKE_KEY not in out + err


def test_dotenv_secret_never_reaches_the_output_of_a_real_command(tmp_path):
    """End to end: the key from .env given as a dataset name is echoed by the error, masked."""
    (tmp_path / ".env").write_text(f"MODELSCOPE_API_TOKEN={FAKE_KEY}\n", encoding="utf-8")
    p = run_subprocess(["data", "inspect", f"./{FAKE_KEY}.jsonl"], cwd=tmp_path)
    assert p.returncode == 2
    text = (p.stdout + p.stderr).decode("utf-8")
    assert FAKE_KEY not in text and "***" in text and "Traceback" not in text


def test_help_under_c_locale(tmp_path):
    p = run_subprocess(["--help"], cwd=tmp_path)
    assert p.returncode == 0 and b"stages:" in p.stdout
    p = run_subprocess(["sfx"], cwd=tmp_path)
    assert p.returncode == 2 and b"Traceback" not in p.stderr
