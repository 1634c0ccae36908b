"""Process-wide plumbing shared by every stage: UTF-8 output, `.env` loading, secret hygiene, one-line errors."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

# Argument names whose values are secrets: a whole word of the name (split at _ or -) is token / api_key /
# secret / password, so `--swanlab_token`, `--hub_token`, `--api_key` and `--judge_api_key` match and
# `--max_new_tokens` does not.
SECRET_ARG_PATTERN = re.compile(r"(^|[_-])(token|api[_-]?key|apikey|secret|password)($|[_-])", re.I)
SECRET_ENV_VARS = (
    "SWANLAB_API_KEY",
    "MODELSCOPE_API_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OPENAI_API_KEY",
)
MASK = "***"
_known_secrets: set[str] = set()


class UserError(Exception):
    """An error caused by the user's input or environment: printed as one line, exit code 2."""


def setup_console() -> None:
    """Make stdout/stderr UTF-8 whatever the locale (LANG=C must still print Chinese)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(encoding="utf-8", errors="replace")
    if hasattr(sys.stdin, "reconfigure"):
        with contextlib.suppress(ValueError, OSError):
            sys.stdin.reconfigure(encoding="utf-8", errors="replace")


def load_dotenv_file(path: str | os.PathLike = ".env") -> list[str]:
    """Load `.env` from the working directory without overriding the real environment.
    Returns the variable names loaded (never their values)."""
    p = Path(path)
    if not p.is_file():
        return []
    from dotenv import dotenv_values

    try:
        values = dotenv_values(p, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        # The reason only, never the file's text: it holds secrets.
        why = (
            f"not UTF-8 text (byte {e.start})"
            if isinstance(e, UnicodeDecodeError)
            else f"cannot read it ({e.strerror or e})"
        )
        raise UserError(f"{p}: {why}; fix or remove it") from None
    loaded = []
    for key, value in values.items():
        if value is None or key in os.environ:
            continue
        os.environ[key] = value
        loaded.append(key)
    register_env_secrets()
    return loaded


def register_secret(value: str | None) -> None:
    """Remember a secret value so that `scrub()` hides it wherever it turns up."""
    if value and len(value) >= 4 and value != MASK:
        _known_secrets.add(value)


def register_env_secrets() -> None:
    for name in SECRET_ENV_VARS:
        register_secret(os.environ.get(name))


def is_secret_name(name: str) -> bool:
    return bool(SECRET_ARG_PATTERN.search(name.lstrip("-")))


def scrub(text: str) -> str:
    """Replace every known secret value in `text` with ***."""
    for s in sorted(_known_secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact_args(d: dict) -> dict:
    """A copy of an arguments dict with every secret-named field's value replaced by ***."""
    out = {}
    for k, v in d.items():
        if is_secret_name(k) and v not in (None, "", False):
            register_secret(v if isinstance(v, str) else None)
            out[k] = MASK
        elif isinstance(v, dict):
            out[k] = redact_args(v)
        elif isinstance(v, str):
            out[k] = scrub(v)
        else:
            out[k] = v
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """A copy of a command line with the value of every secret flag replaced by ***
    (`--swanlab_token X` and `--swanlab_token=X` both)."""
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            register_secret(a)
            out.append(MASK)
            hide_next = False
            continue
        if a.startswith("--") and is_secret_name(a.split("=", 1)[0]):
            if "=" in a:
                name, val = a.split("=", 1)
                register_secret(val)
                out.append(f"{name}={MASK}")
            else:
                out.append(a)
                hide_next = True
            continue
        out.append(scrub(a))
    return out


class ScrubFilter(logging.Filter):
    """Logging filter that masks known secrets in every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (so redirection and test capture see our lines)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str = "mhsft") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers and name == "mhsft":
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("[mhsft] %(message)s"))
        h.addFilter(ScrubFilter())
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def cache_dir() -> Path:
    """mhsft's cache folder (MHSFT_CACHE, else XDG cache, else ~/.cache/mhsft)."""
    base = os.environ.get("MHSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mhsft"
    )
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def hub_reachable(use_hf: bool, timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connect within `timeout`. The clients retry for tens of seconds on
    a machine without network; we look first, then use their caches (local_files_only) or fail fast."""
    import socket
    from urllib.parse import urlparse

    if use_hf:
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    else:
        url = os.environ.get("MODELSCOPE_DOMAIN") or "https://www.modelscope.cn"
        if "://" not in url:
            url = "https://" + url
    u = urlparse(url)
    try:
        with socket.create_connection(
            (u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout
        ):
            return True
    except OSError:
        return False


def settings_hash(settings) -> str:
    """A short, stable hash of JSON-able settings: what decides whether earlier work can be reused (a pipeline
    stage, an evaluation's predictions). Key order does not matter; Chinese text hashes as itself."""
    text = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed heap memory back to the OS. glibc keeps blocks under its mmap threshold (32 MB at most) in
    per-thread arenas after they are freed, and worker threads allocate from different arenas, so without this
    freed memory stays resident: the small tensors of shard after shard in a merge (2-3 shards' worth instead of
    one on the 20 MB-shard benchmark), or the token lists of a 7.5 MB /tokenize on the server (+600 MB kept
    after three, 25 MB after this)."""
    if collect:
        gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
