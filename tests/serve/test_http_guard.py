"""mhsft/serve/http_guard.py: a real uvicorn server (in this process, on a free loopback port) with the guarded
protocol and RequestGuard around a small app: slow or oversized headers and slow bodies are cut with their 4xx
within the configured time, connection and request caps answer 429 with Retry-After, an exception in an
endpoint is a 500 in OpenAI's shape with one log line (no traceback), a client that leaves mid-body is not
logged as an error, and normal keep-alive traffic is untouched."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import socket
import threading
import time

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mhsft.client import free_port
from mhsft.serve.http_guard import HttpLimits, RequestGuard, guarded_protocol
from mhsft.utils import get_logger

LIMITS = HttpLimits(timeout_headers=1.0, timeout_body=1.0, max_header_bytes=4096, max_connections=4,
                    max_concurrent_requests=2)  # fmt: skip
RELEASE = threading.Event()


async def ok(request):
    return JSONResponse({"ok": True})


async def echo(request: Request):
    body = b"".join([chunk async for chunk in request.stream()])
    return JSONResponse({"bytes": len(body)})


async def hold(request: Request):
    while not RELEASE.is_set():
        await asyncio.sleep(0.02)
    return JSONResponse({"held": True})


async def boom(request):
    raise RuntimeError("boom")


async def stream_boom(request):
    async def gen():
        yield b"data: 1\n\n"
        raise RuntimeError("boom mid-stream")

    return StreamingResponse(gen(), media_type="text/event-stream")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if record.exc_info:
            text += "\nTraceback"
        self.lines.append(f"{record.name}: {text}")


@pytest.fixture(scope="module")
def server():
    import uvicorn

    routes = [Route("/ok", ok), Route("/echo", echo, methods=["POST"]), Route("/hold", hold, methods=["POST"]),
              Route("/boom", boom, methods=["POST"]), Route("/stream-boom", stream_boom)]  # fmt: skip
    # as in deploy.build_app: inside Starlette's ServerErrorMiddleware, outside its exception handlers
    guard = Middleware(RequestGuard, max_concurrent_requests=LIMITS.max_concurrent_requests)
    app = Starlette(routes=routes, middleware=[guard])
    records = _Records()
    get_logger()  # mhsft's own handler and level first
    for name in ("mhsft", "uvicorn.error", "uvicorn"):
        logging.getLogger(name).addHandler(records)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=guarded_protocol(LIMITS), log_level="info",
                            timeout_keep_alive=5, lifespan="off")  # fmt: skip
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield {"port": port, "log": records.lines}
    srv.should_exit = True
    thread.join(timeout=10)
    for name in ("mhsft", "uvicorn.error", "uvicorn"):
        logging.getLogger(name).removeHandler(records)


def _request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def _trickle(port, data: bytes) -> tuple[float, bytes]:
    """Send `data` a byte at a time on a new connection; (seconds until the server answered or closed, what it
    sent)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    return _trickle_on(s, data)


def _eventually(check, seconds: float = 10.0):
    """check()'s first truthy answer, asked every 50 ms for up to `seconds`: the server's threads register
    connections and write log lines at their own pace, which a fixed sleep only guesses on a loaded CI machine."""
    deadline = time.monotonic() + seconds
    while not (got := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_slow_headers_are_cut_with_408_within_the_timeout(server):
    took, got = _trickle(server["port"], b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
    assert took < LIMITS.timeout_headers + 1.0
    status, err = _status_and_error(got)
    assert status == 408 and err["code"] == "request_timeout" and "headers" in err["message"]
    # a connection that sends nothing at all is cut too
    s = socket.create_connection(("127.0.0.1", server["port"]))
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(65536).startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < LIMITS.timeout_headers + 1.0
    s.close()
    assert any("request headers did not arrive" in line for line in server["log"])


def test_slow_body_is_cut_with_408(server):
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", server["port"]))
    s.settimeout(10)
    s.sendall(head)
    took, got = _trickle_on(s, b"x" * 200)
    assert took < LIMITS.timeout_body + 1.0
    assert _status_and_error(got)[0] == 408


def _trickle_on(s, data: bytes) -> tuple[float, bytes]:
    """Send `data` a byte every 0.1 s on an open socket, then read until the server closes; closes the socket."""
    t0 = time.monotonic()
    try:
        for b in data:
            s.sendall(bytes([b]))
            time.sleep(0.1)
    except OSError:
        pass
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except OSError:
        pass
    s.close()
    return time.monotonic() - t0, got


def test_oversized_headers_get_431(server):
    s = socket.create_connection(("127.0.0.1", server["port"]))
    s.settimeout(10)
    with contextlib.suppress(OSError):  # the server may close before it all went out
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64 * 1024)
    got = s.recv(65536)
    s.close()
    status, err = _status_and_error(got)
    assert status == 431 and err["code"] == "request_headers_too_large"


def test_keep_alive_and_large_bodies_are_untouched(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    for _ in range(3):  # one connection, several requests, idle gaps shorter than the keep-alive
        conn.request("POST", "/echo", body=b"x" * 300_000)
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"bytes": 300_000}
        time.sleep(0.5)
    conn.close()


def test_connections_past_the_cap_get_429(server):
    idle = [socket.create_connection(("127.0.0.1", server["port"])) for _ in range(LIMITS.max_connections)]
    try:  # once the server has accepted the idle ones, the next connection is refused
        status, headers, body = _eventually(
            lambda: (r := _request(server["port"], "GET", "/ok"))[0] == 429 and r
        )
        assert status == 429 and headers.get("retry-after") == "1"
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for s in idle:
            s.close()
    assert _eventually(lambda: _request(server["port"], "GET", "/ok")[0] == 200)


def test_requests_past_the_cap_get_429_and_gets_still_pass(server):
    RELEASE.clear()
    results = []
    held = [threading.Thread(target=lambda: results.append(_request(server["port"], "POST", "/hold", b"{}")))
            for _ in range(LIMITS.max_concurrent_requests)]  # fmt: skip
    for t in held:
        t.start()
    try:  # once both held requests are in, the next one is refused
        got = _eventually(lambda: (r := _request(server["port"], "POST", "/echo", b"{}"))[0] == 429 and r)
        assert got, "no 429 within 10 s of holding max_concurrent_requests requests"
        status, headers, body = got
        assert status == 429 and headers.get("retry-after") == "1"
        assert json.loads(body)["error"]["code"] == "server_busy"
        assert _request(server["port"], "GET", "/ok")[0] == 200
    finally:
        RELEASE.set()
        for t in held:
            t.join(timeout=10)
    assert [r[0] for r in results] == [200, 200]
    assert _request(server["port"], "POST", "/echo", b"{}")[0] == 200


def test_an_unexpected_exception_is_one_line_and_a_500_in_openai_shape(server):
    n = len(server["log"])
    status, _, body = _request(server["port"], "POST", "/boom", b"{}")
    err = json.loads(body)["error"]
    assert status == 500 and err["type"] == "server_error" and err["code"] == "internal_error"
    rid = err["message"].split("request id ")[1].rstrip(")")
    new = server["log"][n:]
    assert [line for line in new if rid in line] == [
        f"mhsft: internal error {rid} on POST /boom: RuntimeError: boom"
    ]
    # an exception after the response started: the response is ended, still one line
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    conn.request("GET", "/stream-boom")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"data: 1\n\n"
    conn.close()
    assert _eventually(lambda: sum("internal error" in line for line in server["log"][n:]) >= 2)
    time.sleep(0.1)  # nothing more comes
    assert sum("internal error" in line for line in server["log"][n:]) == 2
    assert not any("Traceback" in line or "Exception in ASGI" in line for line in server["log"])


def test_a_client_that_leaves_mid_body_is_not_an_error(server):
    n = len(server["log"])
    s = socket.create_connection(("127.0.0.1", server["port"]))
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    time.sleep(0.2)
    s.close()
    time.sleep(0.3)
    assert server["log"][n:] == []
    assert _request(server["port"], "GET", "/ok")[0] == 200
