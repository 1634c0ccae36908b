"""Tracking: flag checks, logging.jsonl, TensorBoard, SwanLab offline runs read back from disk, no leaked secrets."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, swanlab_scalars
from mhsft.train.tracking import Tracker, TrackingArguments, check_tracking, report_backends, swanlab_mode
from mhsft.utils import UserError

FLAG_KEY = "flagkey-7Qx93vLm2"
ENV_KEY = "envkey-Zr81PdWq4"
NETRC_KEY = "netrckey-Hh52KcTe9"
GIT_TOKEN = "gitpat-Ux47MbNa1"


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No SwanLab key anywhere: no env var, no .env, an empty SwanLab home, no network hooks."""
    for name in ("SWANLAB_API_KEY", "SWANLAB_MODE", "SWANLAB_WEBHOOK", "SWANLAB_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "swanlab_root"
    root.mkdir()
    monkeypatch.setenv("SWANLAB_ROOT", str(root))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def _write_netrc(root: Path, key: str) -> None:
    # The layout `swanlab login` writes: machine = API host, login = web host, password = key.
    (root / ".netrc").write_text(
        f"machine https://api.swanlab.cn\n  login https://swanlab.cn\n  password {key}\n"
    )
    (root / ".netrc").chmod(0o600)


def _tb_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "runs"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _files_containing(root: Path, secrets: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.relative_to(root)}: {s}" for s in secrets if s.encode() in data]
    return hits


# ---------------------------------------------------------------- flags


def test_report_backends():
    assert report_backends(["all"]) == ["swanlab", "tensorboard"]
    assert report_backends(["swanlab,tensorboard", "jsonl"]) == ["swanlab", "tensorboard", "jsonl"]
    assert report_backends("swanlab") == ["swanlab"]
    assert report_backends(["none"]) == []
    with pytest.raises(UserError, match="wandb"):
        report_backends(["wandb"])
    with pytest.raises(UserError, match="none cannot be combined"):
        report_backends(["none", "swanlab"])


def test_swanlab_mode(monkeypatch):
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    assert swanlab_mode(TrackingArguments()) == "cloud"
    assert swanlab_mode(TrackingArguments(swanlab_mode="online")) == "cloud"
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    assert swanlab_mode(TrackingArguments()) == "offline"
    assert swanlab_mode(TrackingArguments(swanlab_mode="local")) == "local"
    with pytest.raises(UserError, match="choose one of"):
        swanlab_mode(TrackingArguments(swanlab_mode="cluod"))


def test_cloud_without_key_fails_before_writing(clean_env, tmp_path):
    args = TrackingArguments(report_to=["swanlab"], swanlab_mode="cloud")
    with pytest.raises(UserError) as e:
        check_tracking(args)
    msg = str(e.value)
    assert "SWANLAB_API_KEY" in msg and "swanlab login" in msg and "--swanlab_mode offline" in msg
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="SWANLAB_API_KEY"):
        Tracker(run_dir, args, {"lr": 1e-4})
    assert not run_dir.exists()


def test_a_cloud_login_that_fails_ends_the_run_before_data_model_or_run_folder(clean_env, tmp_path, monkeypatch,
                                                                               capsys):  # fmt: skip
    """`mhsft sft --report_to swanlab` in cloud mode logs in first: a refused key (or no network) is one line in
    seconds, with the key masked, before the dataset and the model load and before a run folder exists."""
    import swanlab

    from helpers import DEMO, run_cli

    tried = []

    def refused(api_key=None, save=None, **kw):
        tried.append((api_key, save))
        raise RuntimeError(f"key {api_key} rejected by the server")

    monkeypatch.setattr(swanlab, "login", refused)
    out_dir = tmp_path / "out"
    rc, _, err = run_cli(["sft", "--model", "builtin:tiny", "--dataset", DEMO, "--output_dir", str(out_dir),
                          "--report_to", "swanlab", "--swanlab_mode", "cloud", "--swanlab_token", FLAG_KEY,
                          "--max_steps", "1"], capsys)  # fmt: skip
    assert rc == 2 and tried == [(FLAG_KEY, False)]
    assert "SwanLab could not start a cloud run (RuntimeError: key *** rejected by the server)" in err
    assert FLAG_KEY not in err and "train dataset" not in err and not out_dir.exists()


def test_the_tracker_does_not_log_in_twice(clean_env, tmp_path, monkeypatch):
    import swanlab

    from mhsft.train import tracking

    logins = []
    monkeypatch.setattr(swanlab, "login", lambda api_key=None, save=None, **kw: logins.append(api_key))
    monkeypatch.setattr(swanlab, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("offline test")))
    monkeypatch.setattr(tracking, "_logged_in", [])
    args = TrackingArguments(report_to=["swanlab"], swanlab_mode="cloud", swanlab_token=FLAG_KEY)
    tracking.login_swanlab(args)
    tracking.login_swanlab(
        TrackingArguments(report_to=["swanlab"], swanlab_mode="offline")
    )  # no login offline
    assert logins == [FLAG_KEY]
    with pytest.raises(UserError, match="offline test"):  # init is reached without a second login
        Tracker(tmp_path / "run", args, {})
    assert logins == [FLAG_KEY]


@pytest.mark.parametrize("source", ["flag", "env", "dotenv", "swanlab_login"])
def test_cloud_key_sources(clean_env, monkeypatch, source):
    args = TrackingArguments(report_to=["swanlab"], swanlab_mode="cloud")
    if source == "flag":
        args.swanlab_token = FLAG_KEY
    elif source == "env":
        monkeypatch.setenv("SWANLAB_API_KEY", ENV_KEY)
    elif source == "dotenv":
        Path(".env").write_text(f"SWANLAB_API_KEY={ENV_KEY}\n")
    else:
        _write_netrc(clean_env, NETRC_KEY)
    assert check_tracking(args) == []


def test_notice_when_key_set_but_swanlab_not_reported(clean_env, monkeypatch):
    monkeypatch.setenv("SWANLAB_API_KEY", ENV_KEY)
    notices = check_tracking(TrackingArguments(report_to=["tensorboard"]))
    assert len(notices) == 1 and "nothing is sent to SwanLab" in notices[0]
    assert ENV_KEY not in notices[0]
    assert check_tracking(TrackingArguments(report_to=["swanlab"], swanlab_mode="offline")) == []
    disabled = check_tracking(TrackingArguments(report_to=["swanlab"], swanlab_mode="disabled"))
    assert len(disabled) == 1 and "records nothing" in disabled[0]


# ---------------------------------------------------------------- jsonl + tensorboard, in process


def test_jsonl_and_tensorboard(tmp_path):
    import torch

    run_dir = tmp_path / "run"
    with Tracker(run_dir, TrackingArguments(report_to=["tensorboard"]), {}) as t:
        t.log({"loss": torch.tensor(2.5), "lr": 1e-4, "note": "warmup", "grad_norm": float("nan")}, step=1)
        t.log({"loss": 1.25, "eval/acc": 0.5}, step=2)
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "loss": 2.5, "lr": 1e-4, "note": "warmup", "grad_norm": "nan"},
        {"step": 2, "loss": 1.25, "eval/acc": 0.5},
    ]
    tb = _tb_scalars(run_dir)
    assert set(tb) == {"loss", "lr", "grad_norm", "eval/acc"}  # the string metric is not a TensorBoard scalar
    assert tb["loss"] == {1: 2.5, 2: 1.25}
    assert tb["eval/acc"] == {2: 0.5}


def test_report_to_none_writes_only_jsonl(tmp_path):
    t = Tracker(tmp_path, TrackingArguments(report_to=["none"]), {})
    t.log({"loss": 1.0}, step=0)
    t.finish()
    t.finish()  # twice is harmless
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logging.jsonl"]


def test_backend_failure_warns_once_and_training_goes_on(tmp_path):
    class Broken:
        def add_scalar(self, *a, **kw):
            raise OSError("disk full")

        def close(self):
            pass

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mhsft")
    logger.addHandler(handler)
    try:
        t = Tracker(tmp_path, TrackingArguments(report_to=["tensorboard"]), {})
        t._tb.close()
        t._tb = Broken()
        for step in range(3):
            t.log({"loss": 1.0 / (step + 1)}, step=step)
        t.finish()
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboard" in warnings[0] and "disk full" in warnings[0]
    assert len((tmp_path / "logging.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------- SwanLab offline, in a real process

# Runs as its own process so that /proc/self/cmdline (what SwanLab 0.10 records as the command) really
# holds the key, exactly as a user's `mhsft sft --swanlab_token KEY` would.
SCRIPT = textwrap.dedent(
    """
    import sys
    from mhsft.args import parse_args
    from mhsft.train.tracking import Tracker, TrackingArguments, check_tracking
    from mhsft.utils import get_logger, register_env_secrets

    register_env_secrets()
    args = parse_args(TrackingArguments, sys.argv[1:], prog="t")
    for line in check_tracking(args):
        print(line)
    config = {"lr": 2e-4, "swanlab_token": args.swanlab_token, "output_dir": "out"}
    with Tracker(sys.argv[0].rsplit("/", 1)[0] + "/run", args, config) as t:
        get_logger().info(f"starting with token {args.swanlab_token}")
        for step in range(1, 4):
            t.log({"train/loss": 1.0 / step, "learning_rate": 1e-4 * step, "stage": "train"}, step=step)
    print("ok")
    """
)


def _run_script(tmp_path: Path, argv: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    script = tmp_path / "track.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    env.update(SWANLAB_ROOT=str(tmp_path / "swanlab_root"), PYTHONPATH=str(REPO / "src"))
    env.update(env_extra)
    (tmp_path / "swanlab_root").mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(script), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_swanlab_offline_metrics_and_no_secrets(tmp_path):
    if shutil.which("git"):
        # A remote URL carrying a token: SwanLab records the git remote in its metadata.
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        subprocess.run(
            [
                "git",
                "-C",
                str(tmp_path),
                "remote",
                "add",
                "origin",
                f"https://me:{GIT_TOKEN}@example.com/r.git",
            ],
            check=True,
        )
    argv = ["--report_to", "swanlab", "tensorboard", "--swanlab_mode", "offline"]
    argv += ["--swanlab_project", "mh-sft", "--swanlab_exp_name", "t1", "--swanlab_token", FLAG_KEY]
    proc = _run_script(tmp_path, argv, {"SWANLAB_API_KEY": ENV_KEY})
    run_dir = tmp_path / "run"

    swan = swanlab_scalars(run_dir)
    assert swan["train/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert swan["learning_rate"] == pytest.approx({1: 1e-4, 2: 2e-4, 3: 3e-4})
    assert "stage" not in swan
    assert _tb_scalars(run_dir)["train/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert len((run_dir / "logging.jsonl").read_text().splitlines()) == 3

    # The redaction really ran (the secrets are masked, not merely absent).
    (meta,) = run_dir.glob("swanlog/run-*/files/swanlab-metadata.json")
    meta = json.loads(meta.read_text())
    assert "--swanlab_token ***" in meta["runtime"]["command"]
    if shutil.which("git"):
        assert meta["git"]["remote_url"] == "https://example.com/r"
    (config,) = run_dir.glob("swanlog/run-*/files/config.yaml")
    assert "***" in config.read_text() and "lr" in config.read_text()

    secrets = [FLAG_KEY, ENV_KEY, GIT_TOKEN]
    assert _files_containing(run_dir, secrets) == []
    assert not any(s in proc.stdout + proc.stderr for s in secrets)


def test_swanlab_debug_does_not_print_stored_login(tmp_path):
    """SWANLAB_DEBUG makes SwanLab print the key it loads from `swanlab login`'s .netrc."""
    (tmp_path / "swanlab_root").mkdir()
    _write_netrc(tmp_path / "swanlab_root", NETRC_KEY)
    argv = ["--report_to", "swanlab", "--swanlab_mode", "offline", f"--swanlab_token={FLAG_KEY}"]
    proc = _run_script(tmp_path, argv, {"SWANLAB_DEBUG": "true"})
    assert "ok" in proc.stdout
    assert swanlab_scalars(tmp_path / "run")["train/loss"][2] == pytest.approx(0.5)
    assert _files_containing(tmp_path / "run", [FLAG_KEY, NETRC_KEY]) == []
    assert not any(s in proc.stdout + proc.stderr for s in [FLAG_KEY, NETRC_KEY])
