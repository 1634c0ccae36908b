"""One writer per folder: a training run, an export's output, an experiment.

Two `mhsft sft --add_version false` runs into one --output_dir, or two `--resume_from_checkpoint auto` runs of the
same checkpoint, both exited 0 with their files interleaved in one folder (issue 19). Whoever writes a folder now
holds an OS lock on a file in (or beside) it, taken before anything else is written there; a second writer stops
with one line naming the first (pid, host, command, start). The lock is `flock` through the `filelock` package, so
the kernel drops it when its holder dies, even by SIGKILL: a killed run is resumed without clearing anything by
hand (a pid file would have to guess whether its pid is still ours). filelock keeps nothing about the holder, so
the holder describes itself in a JSON file beside the lock, written after the lock is taken and read only by a
process that failed to take it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mhsft.files import read_json, write_json
from mhsft.utils import UserError, redact_argv

LOCK_NAME = ".mhsft.lock"  # inside a folder the process writes into (a run, an experiment)


def lock_paths(lock_file: Path) -> tuple[Path, Path]:
    """(the lock file, the holder's description beside it)."""
    return lock_file, lock_file.with_name(lock_file.name + ".json")


def holder_info() -> dict:
    """This process, as a second writer's error names it: pid, host, the command (secrets masked), its start."""
    import psutil

    started = psutil.Process().create_time()
    argv = redact_argv(sys.argv)
    cmd = " ".join(["mhsft", *argv[1:]] if argv and argv[0].endswith(("mhsft", "__main__.py")) else argv)
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": cmd[:300],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }


def describe_holder(info_file: Path) -> str:
    """`pid 123 on host h, started ..., running: mhsft sft ...`, or what is known when the holder has not
    described itself yet (it took the lock an instant ago) or describes another folder."""
    try:
        info = read_json(info_file)
    except UserError:
        return "another process (it has not said which yet; try again in a moment)"
    if not isinstance(info, dict):
        return "another process"
    return (
        f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}, "
        f"running: {info.get('command')}"
    )


@contextlib.contextmanager
def hold(lock_file: Path, what: str) -> Iterator[None]:
    """Hold `lock_file` (created with its folder when missing) while the block writes `what`; a UserError naming
    the holder when another process has it. The caller takes it before it writes anything else there."""
    from filelock import FileLock, Timeout

    lock_file, info_file = lock_paths(Path(lock_file))
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{what} is being written by {describe_holder(info_file)}; wait for it to finish or stop it, "
            "then run again"
        ) from None
    try:
        write_json(info_file, holder_info())
        yield
    finally:
        with contextlib.suppress(OSError):
            info_file.unlink()
        lock.release()
