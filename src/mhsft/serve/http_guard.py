"""What stands between the network and `mhsft deploy`'s endpoints: time and size limits on reading a request,
caps on connections and on requests in flight (429 with Retry-After past them), and the last line of defence
for an exception no endpoint expected (a 500 in OpenAI's error shape and one log line with a request id,
never a traceback per request).

Why not uvicorn's own settings: uvicorn has no timeout on receiving a request (its `timeout_keep_alive` only
runs between requests and is reset by every byte received; encode/uvicorn#157 leaves `--timeout-request-start`
open), and httptools puts no bound on a header's size, so a client that sends its headers a byte at a time, or
one endless header, holds a connection (and its memory) for as long as it likes. ASGI middleware cannot see a
request before its headers are complete, so the receive limits live in a subclass of uvicorn's httptools
protocol, passed to uvicorn as its `http` protocol class (an extension point uvicorn documents). uvicorn's
`limit_concurrency` answers a plain-text 503; clients of an OpenAI-compatible server expect 429 + Retry-After
for "busy, retry", in OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from mhsft.serve.openai_protocol import ApiError
from mhsft.utils import get_logger, scrub

RETRY_AFTER_S = 1


@dataclass
class HttpLimits:
    timeout_headers: (
        float  # seconds from connection (or from a kept-alive request's first byte) to full headers
    )
    timeout_body: float  # seconds from the headers to the whole body
    max_header_bytes: int  # request line + headers
    max_connections: (
        int  # open connections; a request on one past this is answered 429 and its connection closed
    )
    max_concurrent_requests: int  # POST requests being handled at once; past this 429


def error_json(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(ApiError(status, message, code=code).body(), ensure_ascii=False).encode("utf-8")


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on the headers and on the body, a bound on the headers'
    size, and a cap on open connections."""

    limits: HttpLimits  # set by `guarded_protocol`

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = None
        self._header_bytes = 0
        self._awaiting_headers = True
        self._arm(self.limits.timeout_headers, "request headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_headers and not self.transport.is_closing():  # all of it was request line + headers
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                kb = self.limits.max_header_bytes // 1024
                self._refuse(431, f"request headers larger than {kb} KB", "request_headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        if self._timer is None:  # a kept-alive connection's next request: its headers get the same time
            self._header_bytes = 0
            self._arm(self.limits.timeout_headers, "request headers")

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._arm(self.limits.timeout_body, "request body")
        if len(self.connections) <= self.limits.max_connections:
            super().on_headers_complete()
            return
        app, self.app = self.app, _too_many_connections  # this request only: answered 429, connection closed
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, seconds, what)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, seconds: float, what: str) -> None:
        self._timer = None
        get_logger().info(f"closed a connection: its {what} did not arrive within {seconds:g}s")
        self._refuse(408, f"the {what} did not arrive within {seconds:g}s", "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer `status` when no response has started on this connection, then close it."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self._awaiting_headers or self.cycle is None or not self.cycle.response_started:
            body = error_json(status, message, code)
            head = [STATUS_LINE[status], b"content-type: application/json\r\n", b"connection: close\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"]  # fmt: skip
            self.transport.write(b"".join(head) + body)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's pending receive() sees a disconnect
            self.cycle.message_event.set()
        self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type:
    """The protocol class to give uvicorn (`http=`) for these limits."""
    return type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"limits": limits})


async def _too_many_connections(scope, receive, send) -> None:
    await _send_error(send, 429, "too many open connections; retry later", "too_many_connections",
                      [(b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")])  # fmt: skip


async def _send_error(send, status: int, message: str, code: str | None, headers=()) -> None:
    body = error_json(status, message, code)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestGuard:
    """ASGI middleware: a cap on POST requests in flight (429 + Retry-After past it; GETs such as /health and
    /v1/models are cheap and never refused), and any exception an endpoint let through as a 500 in OpenAI's
    shape with one log line and a request id (the same id in the reply), or, once a response has started, the
    response ended there. A client that left mid-request is not an error and is not logged."""

    def __init__(self, app, max_concurrent_requests: int):
        self.app = app
        self.limit = max_concurrent_requests
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = scope["method"] == "POST"
        if counted and self.in_flight >= self.limit:
            await _send_error(send, 429, f"{self.in_flight} requests in flight; retry later", "server_busy",
                              [(b"retry-after", str(RETRY_AFTER_S).encode())])  # fmt: skip
            return
        self.in_flight += counted
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            pass
        except Exception as e:
            rid = f"req-{secrets.token_hex(6)}"
            get_logger().error(
                f"internal error {rid} on {scope['method']} {scope['path']}: {type(e).__name__}: "
                f"{scrub(str(e))[:300]}"
            )
            await _end(send, rid)
        finally:
            self.in_flight -= counted


async def _end(send, rid: str) -> None:
    """The reply to a request whose endpoint raised: a 500, or, when the response had already started (the
    server refuses a second start), the end of that response. (Not tracked per message: a wrapper around `send`
    would cost every streamed chunk a call.)"""
    try:
        await _send_error(send, 500, f"internal error (request id {rid})", "internal_error")
    except RuntimeError:
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:  # the connection is gone: nothing left to answer
        return
