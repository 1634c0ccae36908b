"""HTTP clients for mhsft's own servers (deploy, and the engines it starts) that never send loopback traffic
through a proxy: a corporate HTTP(S)_PROXY would otherwise receive, and usually refuse, requests meant for
127.0.0.1. Used by `mhsft eval`, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse, urlsplit

from mhsft.utils import UserError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def ensure_loopback_no_proxy(env: dict | None = None) -> None:
    """Add the loopback hosts to NO_PROXY / no_proxy (in `env`, default os.environ) so that every HTTP library
    that reads the environment (requests, httpx, aiohttp with trust_env, curl) reaches local servers directly."""
    env = os.environ if env is None else env
    for name in ("NO_PROXY", "no_proxy"):
        have = [h.strip() for h in env.get(name, "").split(",") if h.strip()]
        add = [h for h in LOOPBACK_HOSTS if h not in have]
        if add:
            env[name] = ",".join(have + add)


def is_loopback(url: str) -> bool:
    host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def normalize_api_url(url: str) -> str:
    """`http://h:8000`, `http://h:8000/v1`, `.../v1/chat/completions` -> the base URL the OpenAI client wants."""
    u = url.strip().rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if u.endswith(tail):
            u = u[: -len(tail)]
    p = urlparse(u)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise UserError(f"API URL {url!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
    return u if p.path not in ("", "/") else u + "/v1"


def unreachable(api_url: str, timeout: float = 5.0) -> str | None:
    """Why the OpenAI-compatible server at `api_url` cannot be reached now (no connection, no answer in `timeout`
    seconds), or None when it answers at all: any HTTP status, even 401 or 404, means a server is there. No key
    is sent."""
    try:
        get_json(normalize_api_url(api_url) + "/models", None, timeout)
    except OSError as e:  # URLError and socket timeouts are OSErrors; HTTP errors are answers (get_json)
        return str(getattr(e, "reason", None) or e)
    return None


def openai_client(
    base_url: str,
    api_key: str | None = None,
    timeout: float = 600.0,
    max_retries: int = 2,
    async_client: bool = False,
):
    """An `openai.OpenAI` (or AsyncOpenAI) client for `base_url` (e.g. http://127.0.0.1:8000/v1). For a loopback
    address its HTTP client ignores proxy settings from the environment. The key defaults to OPENAI_API_KEY,
    else a placeholder (our server without --api_key accepts any)."""
    import openai

    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    kwargs: dict = {"base_url": base_url, "api_key": key, "timeout": timeout, "max_retries": max_retries}
    if is_loopback(base_url):
        http_cls = openai.DefaultAsyncHttpxClient if async_client else openai.DefaultHttpxClient
        kwargs["http_client"] = http_cls(trust_env=False, timeout=timeout)
    return openai.AsyncOpenAI(**kwargs) if async_client else openai.OpenAI(**kwargs)


def _opener(url: str):
    handlers = [urllib.request.ProxyHandler({})] if is_loopback(url) else []
    return urllib.request.build_opener(*handlers)


def get_json(url: str, api_key: str | None = None, timeout: float = 10.0) -> tuple[int, dict | None]:
    """GET a JSON endpoint without proxies for loopback: (status, body or None)."""
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with _opener(url).open(req, timeout=timeout) as r:
            body = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def wait_for_server(base_url: str, timeout: float = 300.0, proc=None, interval: float = 0.25) -> None:
    """Wait until `base_url` (the server root or its /v1) answers GET /health with 200. Raises TimeoutError, or
    RuntimeError when `proc` (the server's Popen) exits first."""
    root = base_url.rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if get_json(f"{root}/health", timeout=2.0)[0] == 200:
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{root}/health did not answer within {timeout:.0f}s")


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free on loopback, else any free loopback port."""
    import socket

    for port in dict.fromkeys((preferred, 0)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free loopback port")


def stop_process(proc, timeout: float = 30.0) -> None:
    """Terminate a child (a server), killing it when it does not exit within `timeout`."""
    import subprocess

    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class DeployProcess:
    """`python -m mhsft deploy ARGV --port PORT` in a child process, as a context manager that yields once the
    server answers /health and always stops it. `.url` is the server root, `.v1` its OpenAI base URL."""

    def __init__(self, argv: list[str], log_path, port: int = 0, env: dict | None = None, timeout: float = 300.0,
                 cwd=None, **popen_kwargs):  # fmt: skip
        self.argv, self.log_path, self.env, self.timeout = argv, log_path, env, timeout
        self.cwd, self.popen_kwargs = cwd, popen_kwargs
        self.port = free_port(port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.v1 = self.url + "/v1"
        self.proc = None

    def __enter__(self) -> DeployProcess:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "mhsft", "deploy", *self.argv, "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                         **self.popen_kwargs)  # fmt: skip
        try:
            wait_for_server(self.url, timeout=self.timeout, proc=self.proc)
        except BaseException:
            stop_process(self.proc)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)
