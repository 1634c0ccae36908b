"""Writing files and folders so that they appear complete or not at all, and reading the JSON ones back.

Every stage writes something a later stage (or a rerun after a kill) trusts: args.json, checkpoints, merged
models, predictions, reports. A plain `open(path, "w")` leaves a half-written file when the process dies in the
middle; so each file goes to a temporary name beside it, is flushed to disk (fsync) and renamed over the target,
which POSIX makes atomic. Folders (checkpoints, exports) are built in a hidden temporary folder and renamed into
place the same way by `publish_dir`, whose completion marker the caller writes last.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from mhsft.utils import UserError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """`with atomic_open(p) as f: f.write(...)`: `p` holds everything written, or (on an exception or a kill)
    whatever it held before. The temporary file is hidden beside `p` (same file system, so the rename is atomic)
    and opened with the usual permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding=encoding, newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """JSON (UTF-8, Chinese kept readable, indented), written atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, default=str)


def read_json(path: Path):
    """A JSON file's content, or a one-line UserError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None


def read_yaml(path: Path):
    """A YAML file's content (yaml.safe_load), or a one-line UserError naming the file and, for a syntax error,
    the line."""
    import yaml  # deferred: only the experiment file and a report's gate are YAML

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read it ({e})") from None


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root` flushed to disk, before the rename that publishes them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def new_temp_dir(out: Path, prefix: str | None = None) -> Path:
    """A hidden temporary folder beside `out` (`.NAME.tmp-XXXX`), readable like a normal one, to build `out` in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; model and run folders are often shared
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` onto `out` once its files are on disk. An existing `out` is first moved
    aside (to a hidden `.NAME.old-*` folder, then deleted), so at every moment `out` is either the old folder or
    the new one, never a mix and never missing."""
    fsync_tree(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
