"""Experiment tracking for training: `logging.jsonl` always, plus TensorBoard and/or SwanLab (`--report_to`).

Call `check_tracking(args)` before loading the model (it fails fast on a cloud run without a key) and
`login_swanlab(args)` on the main process (a wrong key or no network fails in seconds), then
`Tracker(run_dir, args, config)` on the main process only, `.log(metrics, step)` as training goes, `.finish()`.

Secrets: the SwanLab key is never written anywhere. The config is redacted, and SwanLab's own run metadata
(the command line, which 0.10 reads from /proc/self/cmdline rather than sys.argv, and the git remote URL,
which may hold credentials) is redacted while `swanlab.init` collects it; see `_swanlab_redaction`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mhsft.utils import ScrubFilter, UserError, get_logger, redact_args, redact_argv, register_secret, scrub

BACKENDS = ("swanlab", "tensorboard", "jsonl")
SWANLAB_MODES = ("cloud", "local", "offline", "disabled")
# SwanLab calls cloud mode "online"; accept both spellings.
_SWANLAB_MODE_NAMES = {"cloud": "online", "local": "local", "offline": "offline", "disabled": "disabled"}


@dataclass
class TrackingArguments:
    # Default follows ms-swift (tensorboard). logging.jsonl is written whatever --report_to says, because it
    # is the run's own record that later stages (report, resume) read; `jsonl` is accepted for clarity.
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": "Where metrics go besides logging.jsonl (always written): swanlab, tensorboard, jsonl, "
            "all (swanlab + tensorboard) or none. Several allowed: --report_to swanlab tensorboard."
        },
    )
    swanlab_token: str | None = field(
        default=None,
        metadata={
            "help": "SwanLab API key (else SWANLAB_API_KEY from the environment or .env, else `swanlab login`)."
        },
    )
    swanlab_project: str = field(default="mhsft", metadata={"help": "SwanLab project name."})
    swanlab_workspace: str | None = field(
        default=None, metadata={"help": "SwanLab workspace (organisation); default: your own."}
    )
    swanlab_mode: str | None = field(
        default=None,
        metadata={
            "help": "cloud | local | offline | disabled (default: SWANLAB_MODE if set, else cloud). offline "
            "keeps the run under <output>/swanlog for `swanlab sync` later."
        },
    )
    swanlab_exp_name: str | None = field(
        default=None, metadata={"help": "SwanLab experiment name (default: the run directory's name)."}
    )


def report_backends(report_to: list[str] | str | None) -> list[str]:
    """`--report_to` as a list of backend names (`all` expanded, commas split, `jsonl` kept); UserError if bad."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    if "none" in names:
        if len(names) > 1:
            raise UserError(
                f"--report_to none cannot be combined with {', '.join(n for n in names if n != 'none')}"
            )
        return []
    out: list[str] = []
    for n in names:
        expanded = ["swanlab", "tensorboard"] if n == "all" else [n]
        for e in expanded:
            if e not in BACKENDS:
                raise UserError(
                    f"--report_to {n}: not supported; choose from {', '.join(BACKENDS)}, all, none"
                )
            if e not in out:
                out.append(e)
    return out


def swanlab_mode(args) -> str:
    """The effective --swanlab_mode (cloud|local|offline|disabled): the flag, else SWANLAB_MODE, else cloud."""
    raw = args.swanlab_mode or os.environ.get("SWANLAB_MODE") or "cloud"
    mode = "cloud" if raw.strip().lower() == "online" else raw.strip().lower()
    if mode not in SWANLAB_MODES:
        raise UserError(f"--swanlab_mode {raw}: choose one of {', '.join(SWANLAB_MODES)}")
    return mode


def _stored_swanlab_key() -> str | None:
    """The key SwanLab itself would use: SWANLAB_API_KEY, ./.env, swanlab.yaml, or `swanlab login`'s
    .netrc (./.swanlab/.netrc, then ~/.swanlab/.netrc or $SWANLAB_ROOT). Asking swanlab.Settings keeps us in
    step with however a given SwanLab version looks these up."""
    try:
        import swanlab

        with _swanlab_redaction():
            key = swanlab.Settings().api_key
    except Exception:  # a broken swanlab config file must not stop a run that may not even need a key
        return None
    return key or None


def resolve_swanlab_key(args) -> str | None:
    """--swanlab_token, else SWANLAB_API_KEY, else SwanLab's stored login. Registered as a secret for scrub()."""
    key = args.swanlab_token or os.environ.get("SWANLAB_API_KEY") or _stored_swanlab_key()
    register_secret(key)
    return key or None


def check_tracking(args) -> list[str]:
    """Validate the tracking flags before any model loading or file writing. Returns notice lines to print;
    raises UserError for a cloud SwanLab run with no key (with how to fix it) or for bad flag values."""
    backends = report_backends(args.report_to)
    mode = swanlab_mode(args)
    notices: list[str] = []
    if "swanlab" in backends:
        if importlib.util.find_spec("swanlab") is None:
            raise UserError("--report_to swanlab needs the swanlab package: pip install swanlab")
        if mode == "disabled":
            notices.append(
                "--report_to includes swanlab but --swanlab_mode is disabled: SwanLab records nothing"
            )
        elif mode == "cloud" and not resolve_swanlab_key(args):
            raise UserError(
                "--swanlab_mode cloud needs a SwanLab API key and none was found: set SWANLAB_API_KEY (in the "
                "environment or .env), pass --swanlab_token, or run `swanlab login` once; or use "
                "--swanlab_mode offline (sync later with `swanlab sync`) or --swanlab_mode local"
            )
    elif args.swanlab_token or os.environ.get("SWANLAB_API_KEY"):
        register_secret(args.swanlab_token or os.environ.get("SWANLAB_API_KEY"))
        notices.append(
            "SWANLAB_API_KEY is set but --report_to does not include swanlab: nothing is sent to SwanLab"
        )
    if "tensorboard" in backends and importlib.util.find_spec("tensorboard") is None:
        notices.append(
            "tensorboard is not installed: no TensorBoard logs are written (pip install tensorboard)"
        )
    return notices


def _strip_url_credentials(url: str | None) -> str | None:
    """https://user:token@host/repo -> https://host/repo (git remotes often carry a token)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    return scrub(url)


@contextlib.contextmanager
def _swanlab_redaction():
    """Around every SwanLab call that collects metadata or loads credentials:
    - show it a redacted command line and a credential-free git remote. swanlab.init collects them
      synchronously; 0.10 reads the command from /proc/self/cmdline, so replacing sys.argv alone is not
      enough and its probe functions are wrapped too;
    - mute SWANLAB_DEBUG output, which prints the API key it loads from `swanlab login`'s .netrc to the
      terminal and debug.log before we could know the key to mask it.
    Yields True when the probes could be wrapped, else False so that the caller turns them off instead
    (a SwanLab whose layout differs from 0.10's)."""
    saved_argv = sys.argv
    sys.argv = redact_argv(sys.argv)
    restore: list[tuple[object, str, object]] = []
    try:
        from swanlab.sdk.internal.pkg import helper
        from swanlab.sdk.internal.probe_python.environment import git, runtime

        get_command, get_remote_url = runtime.get_command, git.get_remote_url
        restore = [(runtime, "get_command", get_command), (git, "get_remote_url", get_remote_url)]
        restore.append((helper, "DEBUG", helper.DEBUG))
        runtime.get_command = lambda: scrub(" ".join(redact_argv(get_command().split(" "))))
        git.get_remote_url = lambda: _strip_url_credentials(get_remote_url())
        helper.DEBUG = False
    except (ImportError, AttributeError):
        pass
    try:
        yield bool(restore)
    finally:
        sys.argv = saved_argv
        for module, name, value in restore:
            setattr(module, name, value)


def _install_swanlab_log_filter() -> None:
    """SwanLab's diagnostic log (SWANLAB_DEBUG=true) prints the credentials it loads; mask them."""
    logger = logging.getLogger("swanlab.internal")
    if not any(isinstance(f, ScrubFilter) for f in logger.filters):
        logger.addFilter(ScrubFilter())


def _json_safe(value):
    """Values as logging.jsonl stores them: strict JSON (nan/inf as strings), tensors and numpy as numbers."""
    value = _as_number(value) if not isinstance(value, (str, bool, type(None))) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float, bool, type(None))):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return scrub(str(value))


def _as_number(value):
    """int/float for numbers, 0-d tensors and numpy scalars; the value unchanged otherwise."""
    if isinstance(value, (int, float)):  # bool included: it is an int
        return value
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            v = item()
        except (TypeError, ValueError, RuntimeError):
            return value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return value


def _numeric(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = _as_number(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


_logged_in: list[
    str
] = []  # the key swanlab.login accepted in this process (login_swanlab), so Tracker skips it


def login_swanlab(args) -> None:
    """For a cloud SwanLab run, log in now, before minutes of loading data and model: a wrong key or no network
    fails in seconds, with nothing written. Call it on the main process only."""
    if "swanlab" not in report_backends(args.report_to) or swanlab_mode(args) != "cloud":
        return
    key = resolve_swanlab_key(args)
    if not key:
        check_tracking(args)  # raises the UserError that says how to fix it
    import swanlab

    _install_swanlab_log_filter()
    try:
        with _swanlab_redaction():
            swanlab.login(api_key=key, save=False)  # save=False: never write the key to ~/.swanlab/.netrc
    except Exception as e:
        raise UserError(_start_failed("cloud", e)) from None
    _logged_in[:] = [key]


def _start_failed(mode: str, e: Exception) -> str:
    return (
        f"SwanLab could not start a {mode} run ({scrub(f'{type(e).__name__}: {e}').rstrip('.')}); check the key "
        "and the network, or use --swanlab_mode offline and `swanlab sync` later"
    )


class Tracker:
    """Writes metrics to run_dir/logging.jsonl and the backends in args.report_to. Create it on the main
    process only. A backend that fails mid-training is warned about once and dropped; training goes on."""

    def __init__(self, run_dir: str | os.PathLike, args, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.backends = report_backends(args.report_to)
        self._log = get_logger()
        self._swanlab = None
        self._tb = None
        self._jsonl = None
        self._failed: set[str] = set()
        mode = swanlab_mode(args)
        # SwanLab first: a cloud run that cannot start should fail before anything is written.
        if "swanlab" in self.backends and mode != "disabled":
            self._swanlab = self._start_swanlab(args, mode, config or {})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.backends and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "runs"))
        # Kept open for the whole run (closed in finish); append so a resumed run continues the file.
        self._jsonl = open(self.run_dir / "logging.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def _start_swanlab(self, args, mode: str, config: dict):
        import swanlab

        key = resolve_swanlab_key(args)
        if mode == "cloud" and not key:
            check_tracking(args)  # raises the UserError that says how to fix it
        _install_swanlab_log_filter()
        clean_config = _json_safe(redact_args(dict(config)))
        try:
            with _swanlab_redaction() as wrapped:
                if mode == "cloud" and _logged_in != [key]:
                    # save=False: never write the key to ~/.swanlab/.netrc on the user's behalf.
                    swanlab.login(api_key=key, save=False)
                # interactive=False: never prompt (a prompt would hang a batch job with no TTY).
                settings: dict = {"interactive": False}
                if not wrapped:
                    settings["probe"] = {"runtime": False, "git": False}
                return swanlab.init(
                    project=args.swanlab_project,
                    workspace=args.swanlab_workspace,
                    name=args.swanlab_exp_name or self.run_dir.name,
                    mode=_SWANLAB_MODE_NAMES[mode],
                    log_dir=str(self.run_dir / "swanlog"),
                    config=clean_config,
                    settings=swanlab.Settings(**settings),
                    reinit=True,
                )
        except UserError:
            raise
        except Exception as e:
            raise UserError(_start_failed(mode, e)) from None

    def _guard(self, backend: str, fn, *a, **kw) -> None:
        if backend in self._failed:
            return
        try:
            fn(*a, **kw)
        except Exception as e:
            self._failed.add(backend)
            self._log.warning(
                f"{backend} logging failed ({type(e).__name__}: {e}); training continues without it"
            )

    def log(self, metrics: dict, step: int) -> None:
        """Record one set of metrics at a global step. Non-numeric values go to logging.jsonl only."""
        if self._jsonl is not None:
            line = json.dumps({"step": step, **_json_safe(metrics)}, ensure_ascii=False)
            self._guard("logging.jsonl", self._write_jsonl, line)
        numbers = _numeric(metrics)
        if not numbers:
            return
        if self._tb is not None:
            self._guard("tensorboard", self._write_tb, numbers, step)
        if self._swanlab is not None:
            self._guard("swanlab", self._swanlab.log, numbers, step=step)

    def _write_jsonl(self, line: str) -> None:
        self._jsonl.write(line + "\n")
        self._jsonl.flush()

    def _write_tb(self, numbers: dict[str, float], step: int) -> None:
        for k, v in numbers.items():
            self._tb.add_scalar(k, v, step)

    def finish(self, error: str | None = None) -> None:
        """Close every backend; `error` marks the SwanLab run as crashed with that reason. Safe to call twice."""
        if self._swanlab is not None:
            run, self._swanlab = self._swanlab, None
            state = "crashed" if error else "success"
            self._guard("swanlab", run.finish, state=state, error=scrub(error) if error else None)
        if self._tb is not None:
            tb, self._tb = self._tb, None
            self._guard("tensorboard", tb.close)
        if self._jsonl is not None:
            f, self._jsonl = self._jsonl, None
            self._guard("logging.jsonl", f.close)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(error=f"{exc_type.__name__}: {exc}" if exc_type else None)
