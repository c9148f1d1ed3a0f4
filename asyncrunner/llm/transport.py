"""The HTTP transport under the LLM client: httpx's transport interface over aiohttp's pool.

The client speaks httpx (`httpx.Request` in, `httpx.Response` out, httpx's exception types),
so `httpx.MockTransport` still drops in for tests. Underneath, the wire is aiohttp's
connection pool and its C HTTP parser, chosen by measurement (issue #9; 256 requests in
flight, 100 ms simulator, 2 cores; share of the ideal rate, client CPU per 5,000 requests):
httpx's own pool ~3 % at ~60 s (470 connections opened for 1,000 requests); httpx sharded
into clients of 8 connections 76 % at 2.2 s; this transport 85-89 % at 0.73 s, the rate of
a bare aiohttp client (0.46 s) and of the httpx-aiohttp package (which maps a dropped
connection to ConnectTimeout, a timeout, and streams each body). httpcore's pool walks
every connection on every request, so its work grows with the square of the concurrency;
aiohttp's keeps idle connections per host.

What this transport does, and no more:
  * one request, its body sent whole, the response body read whole before returning (the
    client reads every answer anyway), connection back to the pool at once;
  * at most `max_connections` connections, kept alive `keepalive_expiry` s when idle;
  * a body larger than `max_response_bytes` is not read past the limit: `ResponseTooLarge`
    (client.py) is raised and the connection closed (a Content-Length above the limit is
    refused before reading; a chunked body is counted as it arrives);
  * httpx's per-phase timeouts from the request's "timeout" extension (connect, read, pool;
    aiohttp has no write timeout), and its "total" (client.http_timeouts) as aiohttp's
    bound on the whole exchange, body included, which also covers writes (`bounds_total`:
    HttpSession then sets no timer of its own);
  * every aiohttp or socket error mapped to the httpx exception that names the same failure,
    here at the edge, so the client's error categories keep working:

        aiohttp                                    httpx
        ConnectionTimeoutError (connect or pool)   ConnectTimeout
        ServerTimeoutError, TimeoutError           ReadTimeout
        ClientConnectorError (refused, DNS, TLS)   ConnectError
        ServerDisconnectedError                    RemoteProtocolError
        ClientPayloadError (body cut short)        RemoteProtocolError
        ClientResponseError (malformed response)   RemoteProtocolError
        ClientOSError, other connection errors     ReadError
        InvalidURL, NonHttpUrlClientError          UnsupportedProtocol

No redirects, cookies, proxies or environment settings (the client never used them). The
aiohttp session is created on the first request, inside the running event loop (asyncio;
anyio's default backend), and closed by `aclose()`.
"""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import httpx

from asyncrunner.llm.client import ResponseTooLarge

DEFAULT_KEEPALIVE_S = 5.0   # httpx's default keep-alive expiry, kept
_HTTP_VERSIONS = {aiohttp.HttpVersion10: b"HTTP/1.0", aiohttp.HttpVersion11: b"HTTP/1.1"}


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` over one `aiohttp.ClientSession` (HTTP/1.1)."""

    bounds_total = True     # the "total" timeout is kept here (see the module docstring)

    def __init__(self, *, max_connections: int, keepalive_expiry: float = DEFAULT_KEEPALIVE_S,
                 verify: ssl.SSLContext | bool = True,
                 max_response_bytes: int | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if max_response_bytes is not None and max_response_bytes < 1:
            raise ValueError("max_response_bytes must be >= 1 or None")
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self.keepalive_expiry = keepalive_expiry
        self._verify = verify
        self._ssl: ssl.SSLContext | bool | None = None     # made at the first https request
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the transport is closed")
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                         keepalive_timeout=self.keepalive_expiry)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            trust_env=False, timeout=aiohttp.ClientTimeout(total=None), raise_for_status=False,
            # Compression only when the request asks for it: httpx.Response decodes what it
            # is told the body holds, and aiohttp's own list could name codings it cannot.
            skip_auto_headers=("Accept-Encoding",))
        return self._session

    def _timeout(self, spec: dict[str, float | None] | None) -> aiohttp.ClientTimeout:
        """httpx's {connect, read, write, pool} and our "total" as aiohttp's: `connect` there
        covers waiting for a pooled connection plus connecting; `sock_connect` the TCP/TLS
        connect alone; `total` the whole exchange."""
        spec = spec or {}
        key = (spec.get("connect"), spec.get("read"), spec.get("pool"), spec.get("total"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, pool, total = key
            acquire = None if pool is None or connect is None else pool + connect
            timeout = aiohttp.ClientTimeout(total=total, connect=acquire,
                                            sock_connect=connect, sock_read=read)
            if len(self._timeouts) > 16:
                self._timeouts.clear()
            self._timeouts[key] = timeout
        return timeout

    def _ssl_for(self) -> ssl.SSLContext | bool:
        """For https: the same trust store as httpx (certifi) unless a context was given;
        verify=False: no checks. Loading certifi costs ~20 ms, so plain http never does."""
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context() if self._verify is True else self._verify
        return self._ssl

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        try:
            async with session.request(
                    request.method, str(request.url),
                    headers=request.headers.multi_items(), data=body or None,
                    allow_redirects=False,
                    timeout=self._timeout(request.extensions.get("timeout")),
                    ssl=self._ssl_for() if request.url.scheme == "https" else True,
            ) as response:
                content = await self._read(response, request)
                status, headers, reason = response.status, response.raw_headers, response.reason
                version = _HTTP_VERSIONS.get(response.version or aiohttp.HttpVersion11,
                                             b"HTTP/1.1")
        except (aiohttp.ClientError, OSError) as exc:   # TimeoutError is an OSError
            raise _to_httpx(exc, request) from exc
        return httpx.Response(
            status, headers=headers, content=content, request=request,
            extensions={"http_version": version,
                        "reason_phrase": reason.encode("latin-1", "replace") if reason else b""})

    async def _read(self, response: aiohttp.ClientResponse, request: httpx.Request) -> bytes:
        limit = self.max_response_bytes
        length = response.content_length
        if limit is None or (length is not None and length <= limit):
            return await response.read()
        if length is not None:
            response.close()        # do not read it, and do not pool the connection
            raise ResponseTooLarge(limit, request)
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > limit:
                response.close()
                raise ResponseTooLarge(limit, request)
        return bytes(body)

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _to_httpx(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception naming the same failure (see the module docstring)."""
    message = f"{type(exc).__name__}: {exc}"
    kind: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(exc, TimeoutError):          # ServerTimeoutError, SocketTimeoutError too
        kind = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError
                    | aiohttp.ClientResponseError):
        kind = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        kind = httpx.UnsupportedProtocol
    elif isinstance(exc, aiohttp.ClientConnectionError | OSError):
        kind = httpx.ReadError
    else:
        kind = httpx.RemoteProtocolError
    return kind(message, request=request)
