"""mhsft/folder_lock.py: one writer per folder, the second told who holds it; the OS drops the lock when its
holder is SIGKILLed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO
from mhsft.folder_lock import LOCK_NAME, hold, lock_paths
from mhsft.utils import UserError

HOLDER = """
import sys, time
from mhsft.folder_lock import hold
with hold(sys.argv[1], "the folder"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_holder_in_the_same_process_is_refused(tmp_path):
    lock = tmp_path / "run" / LOCK_NAME
    with hold(lock, "the run folder X"):
        with pytest.raises(UserError) as e, hold(lock, "the run folder X"):
            pass
        msg = str(e.value)
        assert msg.startswith("the run folder X is being written by pid ") and "\n" not in msg
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started 20" in msg and "running: " in msg
    with hold(lock, "the run folder X"):  # released at the end of the block
        pass
    assert not lock_paths(lock)[1].exists()  # the holder's description goes with it


def test_lock_of_a_sigkilled_process_is_free_at_once(tmp_path):
    lock = tmp_path / LOCK_NAME
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with (
            pytest.raises(UserError, match=f"being written by pid {child.pid} on host .*running: "),
            hold(lock, "the folder"),
        ):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    t0 = time.monotonic()
    with hold(lock, "the folder"):  # no stale pid file to clear: the kernel released the flock
        assert time.monotonic() - t0 < 1
