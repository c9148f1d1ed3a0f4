"""The simulator's HTTP/1.1 wire layer: bytes in, one request at a time out, responses back.

This module owns the sockets and nothing above them: parsing request heads and
Content-Length bodies, keep-alive and `Connection: close`, in-order handling of pipelined
requests, encoding responses, counting connections, and telling the application when a client
leaves before its answer. It knows nothing about chat completions; `server.py` does.

Why an `asyncio.Protocol` with hand parsing: the simulator is what benchmarks measure the
runner against, so its cost per request must be small next to the client's. A protocol
callback needs no task, no coroutine and no stream buffer per request: a request is parsed in
`data_received`, the application answers at once or from a single `loop.call_later` timer, and
the answer goes out in one `transport.write`. Measured on the 2-core development machine with
a bare aiohttp client in another process: requests/s, median (range) of interleaved runs on a
machine shared with other work, so server CPU per request is the steadier figure; at 0 ms the
client saturates its core first. The last three rows build answers on arrival (server.py):

    wire layer                 100 ms, 256 in flight   0 ms, 64 in flight     CPU/request
    asyncio streams (before)   2,330 (2,160-2,400)     8,200 (6,400-15,800)   57-64 us
    h11 on asyncio.Protocol    2,430 (2,280-2,470)     6,200 (2,500-8,200)    114-147 us
    this module                2,460 (1,970-2,470)     8,500 (4,800-12,900)   39-49 us
    this module on uvloop      2,350 (2,280-2,450)     8,000 (5,400-12,200)   41-46 us

(One request in flight: 5,600 req/s here against 3,400-4,100 for streams.) h11 is the
cleaner parser but costs more per request than everything else the simulator does, and buys
nothing here: the simulator must read only what HTTP clients actually send it (Content-Length
bodies; a chunked body gets 411). What it must control exactly is the wire, so that faults
(resets, hangs, closes without an answer) are precise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
# Unread pipelined bytes beyond this pause reading until the current request is answered.
_MAX_BUFFERED = MAX_HEAD_BYTES + MAX_BODY_BYTES
# 256 clients connecting at once must not overflow the accept queue (a dropped SYN costs the
# client a 1 s retransmission, which would show up as a benchmark stall).
_BACKLOG = 1024

REASONS: Mapping[int, str] = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One parsed request. `headers` has lower-case names; `path` has no query string."""

    method: str
    path: str
    version: str
    headers: Mapping[str, str]
    body: bytes
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What to send back; Content-Length, Connection and Server headers are added."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class ProtocolError(Exception):
    """The request cannot be read; answer with `status` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class App(Protocol):
    """What the wire layer calls. Both methods run on the event loop and must not block."""

    def handle(self, exchange: Exchange) -> None:
        """Take a request; answer now or later through `exchange`."""

    def reject(self, status: int, message: str) -> HttpResponse:
        """The answer to a request that could not be parsed (sent, then the socket closes)."""


def encode_response(response: HttpResponse, keep_alive: bool) -> bytes:
    """Status line, headers and body as one buffer, so one write sends the whole answer."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
    head = (f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
            f"Server: asyncrunner-mock\r\n{extra}\r\n")
    return head.encode("latin-1") + response.body


def parse_head(head: str) -> tuple[str, str, str, dict[str, str]]:
    """(method, path, version, headers) of a request head without its final blank line."""
    request_line, *header_lines = head.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProtocolError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    return method.upper(), target.split("?", 1)[0], version, headers


def body_length(headers: Mapping[str, str]) -> int:
    """The Content-Length the head announces, within MAX_BODY_BYTES."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ProtocolError(411, "chunked bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise ProtocolError(400, "invalid Content-Length") from None
    if length < 0:
        raise ProtocolError(400, "invalid Content-Length")
    if length > MAX_BODY_BYTES:
        raise ProtocolError(413, "request body too large")
    return length


def wants_keep_alive(version: str, headers: Mapping[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


class Exchange:
    """One request waiting for its answer. Exactly one of respond/reset/close takes effect;
    later calls, and calls after the client left, do nothing."""

    __slots__ = ("_connection", "_on_abandon", "request")

    def __init__(self, request: HttpRequest, connection: _Connection) -> None:
        self.request = request
        self._connection: _Connection | None = connection
        self._on_abandon: Callable[[], None] | None = None

    @property
    def open(self) -> bool:
        """True until answered, dropped, or abandoned by the client."""
        return self._connection is not None

    def on_abandon(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once if the client leaves (EOF, reset, server stop) first."""
        self._on_abandon = callback

    def respond(self, response: HttpResponse) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.answer(response, self.request.keep_alive)

    def reset(self) -> None:
        """Drop the connection without a byte of answer (the client sees a reset)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.drop(abort=True)

    def close(self) -> None:
        """Close the connection without an answer (the client sees the server hang up)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.drop(abort=False)

    def abandoned(self) -> None:
        """The wire layer's notice that the client is gone; runs the callback once."""
        self._connection = None
        callback, self._on_abandon = self._on_abandon, None
        if callback is not None:
            callback()


class _Connection(asyncio.Protocol):
    """One TCP connection: buffers bytes, hands over one request at a time, writes answers."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._exchange: Exchange | None = None   # the request being answered, if any
        self._head: tuple[str, str, str, dict[str, str], int, int] | None = None
        self._processing = False
        self._paused = False
        self._closing = False  # closed or aborted by us: read nothing more

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP server's transport is a Transport; uvloop's does not subclass it, so no check.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if self._exchange is None:
            self._process()
        elif len(self._buffer) > _MAX_BUFFERED and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True

    def eof_received(self) -> bool:
        # The client will send nothing more; a request still waiting is abandoned with the
        # connection (returning False closes the transport, then connection_lost runs).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.connection_closed(self)
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.abandoned()

    # -- used by Exchange and HttpServer -----------------------------------------------

    def answer(self, response: HttpResponse, keep_alive: bool) -> None:
        self._exchange = None
        transport = self._transport
        if transport is None or self._closing:
            return
        transport.write(encode_response(response, keep_alive))
        if not keep_alive:
            self._close(transport)
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buffer and not self._processing:
            self._process()

    def drop(self, *, abort: bool) -> None:
        self._exchange = None
        transport = self._transport
        if transport is None or self._closing:
            return
        if abort:
            self._closing = True
            self._buffer.clear()
            transport.abort()
        else:
            self._close(transport)

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    # -- parsing -----------------------------------------------------------------------

    def _process(self) -> None:
        """Hand over buffered requests, one at a time, until one is left waiting."""
        self._processing = True
        try:
            while self._exchange is None and not self._closing:
                try:
                    request = self._next_request()
                except ProtocolError as exc:
                    self._reject(exc)
                    return
                if request is None:
                    return
                self._exchange = Exchange(request, self)
                self._handle(self._exchange)
        finally:
            self._processing = False

    def _handle(self, exchange: Exchange) -> None:
        try:
            self._server.app.handle(exchange)
        except Exception:  # a bug in the app must not kill the server; no body is logged
            log.exception("mock-server request handler failed")
            self.abort()

    def _next_request(self) -> HttpRequest | None:
        """The next complete request in the buffer, or None until more bytes arrive."""
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ProtocolError(431, "request head too large")
                return None
            method, path, version, headers = parse_head(buffer[:end].decode("latin-1"))
            start = end + 4
            self._head = (method, path, version, headers, start, start + body_length(headers))
        method, path, version, headers, start, stop = self._head
        if len(buffer) < stop:
            return None
        body = bytes(buffer[start:stop])
        del buffer[:stop]
        self._head = None
        return HttpRequest(method, path, version, headers, body,
                           wants_keep_alive(version, headers))

    def _reject(self, exc: ProtocolError) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        transport.write(encode_response(self._server.app.reject(exc.status, str(exc)), False))
        self._close(transport)

    def _close(self, transport: asyncio.Transport) -> None:
        # close() flushes what is buffered, then closes; reading stops at once.
        self._closing = True
        self._buffer.clear()
        transport.close()


class HttpServer:
    """A listening socket on 127.0.0.1 whose connections feed `app`, with connection counts."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._all_closed: asyncio.Event | None = None  # set by the last close during stop()
        self.connections_opened = 0
        self.peak_connections = 0

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def reset_peak(self) -> None:
        self.peak_connections = len(self._connections)

    async def start(self, host: str, port: int) -> int:
        """Listen; return the port (the one the OS picked when `port` is 0)."""
        if self._server is not None:
            raise RuntimeError("HttpServer already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=_BACKLOG)
        port_: int = self._server.sockets[0].getsockname()[1]
        return port_

    async def stop(self, grace_s: float) -> None:
        """Stop listening, then drop every connection (waiting requests are abandoned)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._connections:
            # Aborted transports report connection_lost on a later loop iteration.
            self._all_closed = asyncio.Event()
            for connection in list(self._connections):
                connection.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace_s)
            self._all_closed = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), grace_s)

    def connection_opened(self, connection: _Connection) -> None:
        self._connections.add(connection)
        self.connections_opened += 1
        self.peak_connections = max(self.peak_connections, len(self._connections))

    def connection_closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()
