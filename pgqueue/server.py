"""The API's HTTP server: uvicorn (httptools) with the limits a production server has.

uvicorn itself bounds neither the size of a request's head nor the time it takes to
arrive: a client could hold a connection open with half a header line forever, or grow
the process by sending megabytes of headers. Here, per connection:

* the request line and headers must fit in `http_max_header_bytes`: past that the
  answer is 431 and the connection is closed (at most that much plus one read is kept);
* they must arrive within `http_header_timeout_s` of the connection opening (or of the
  first byte of a later request on a kept-alive connection): else 408 and closed; a
  connection that sent nothing is closed silently;
* a body must arrive within `http_body_timeout_s` of its headers (BodyDeadline, an ASGI
  middleware, so the app answers that 408 in its own JSON);
* an idle kept-alive connection is closed after `http_keep_alive_s`;
* with `http_max_connections` open connections (or requests in progress), further
  requests are answered 503 at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pgqueue.config import Settings
from pgqueue.errors import RequestTimeoutError

log = logging.getLogger("pgqueue.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

# What a request line and its headers cost beyond their bytes (": ", CRLF, spaces).
_HEAD_OVERHEAD = 16


class BodyDeadline:
    """ASGI middleware: a request's body must have arrived `timeout_s` after its headers;
    a read past that raises RequestTimeoutError, which the app answers 408 (with
    `Connection: close`: the rest of the body is not waited for). Once the body is in,
    reads (a wait for the client to disconnect) are not bounded."""

    def __init__(self, app: Asgi, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        complete = False

        async def bounded() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, bounded, send)


def _answer(status: int, code: str, message: str, *, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    body = json.dumps(
        {"error": "overloaded", "message": "the server has too many connections; retry later"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _HeadTooLarge(Exception):
    pass


def protocol_class(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the head limits of `settings`."""
    max_head = settings.http_max_header_bytes
    head_timeout_s = settings.http_header_timeout_s
    max_connections = settings.http_max_connections

    class LimitedProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Checked here instead (on_headers_complete), to answer in JSON.
            self.limit_concurrency = None
            self._reading_head = True
            self._head_bytes = 0
            self._head_too_large = False
            self._head_timer: asyncio.TimerHandle | None = None

        # -- the head's time ---------------------------------------------------------

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A pipelined request's head is late while an earlier one is answered:
                # close once that answer is out.
                self.cycle.keep_alive = False
                return
            if self._head_bytes:
                log.debug("request head from %s not complete in time", self.client)
                self._refuse(
                    408,
                    "request_timeout",
                    f"the request headers did not arrive within {head_timeout_s:g} s",
                )
            else:
                self.transport.close()

        def _refuse(self, status: int, code: str, message: str) -> None:
            self._disarm_head_timer()
            self.transport.write(_answer(status, code, message))
            self.transport.close()

        # -- protocol and parser callbacks -------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._reading_head:
                self._head_bytes += len(data)
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self._head_too_large:
                    self._refuse(
                        431,
                        "headers_too_large",
                        f"the request line and headers must fit in {max_head} bytes",
                    )
                    return
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            if self._reading_head and self._head_bytes > max_head:
                # Still no end of the head in sight: refuse before reading more.
                self._refuse(
                    431,
                    "headers_too_large",
                    f"the request line and headers must fit in {max_head} bytes",
                )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._reading_head = True
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._reading_head = False
            self._disarm_head_timer()
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size + _HEAD_OVERHEAD > max_head:
                self._head_too_large = True
                raise _HeadTooLarge
            app = self.app
            if len(self.connections) > max_connections or len(self.tasks) >= max_connections:
                log.warning("over %d connections: a request is answered 503", max_connections)
                self.app = _overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def on_message_complete(self) -> None:
            super().on_message_complete()
            # What arrives next is the head of the next request.
            self._reading_head = True
            self._head_bytes = 0

    return LimitedProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The limits of `settings` as uvicorn.Config arguments."""
    return {
        "http": protocol_class(settings),
        "ws": "none",
        "timeout_keep_alive": settings.http_keep_alive_s,
    }


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's pick), for a server bound right after
    (the demo's API, the tests' and benchmarks' servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
