"""The only module that talks to upstreams: build the request, send it, relay the answer.

Bytes go to the client as they arrive, one write per upstream chunk, unchanged; the
measurement tap gets a reference to the same bytes after the write (or before it, when the
stream must be rewritten to undo Tollgate's own usage injection).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.connector import Connection
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import UpstreamError, translate_upstream_exception
from proxy.exchange import Exchange
from proxy.measure import BodyKeeper, StreamTap, UsageStripper
from proxy.settings import Settings
from proxy.settings import Upstream as UpstreamSettings

log = logging.getLogger("tollgate.forward")

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# content-encoding: aiohttp decodes a compressed request body as it reads it, and the
# decoded bytes are what goes upstream (measured, and possibly rewritten), so the header
# that described the client's encoding would now lie to the upstream.
_NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect", "content-encoding"}
_NOT_RELAYED_DOWN = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}


@dataclass(slots=True)
class Upstream:
    """One configured upstream and its pooled session (created in the app's lifecycle)."""

    name: str
    settings: UpstreamSettings
    session: aiohttp.ClientSession
    api_base: str
    idle_timeout: float
    # llama-server's context size (n_ctx from /props), once read: how far a request with
    # no output cap can run.
    context_size: int | None = None

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def address(self) -> tuple[str, int | None]:
        """(host, port) the upstream is reached at: the spans' server.address/server.port."""
        return server_address(self.api_base)


def server_address(url: str) -> tuple[str, int | None]:
    """Host and port of an upstream URL, the port made explicit from the scheme's default
    (OTel semantic conventions: server.port is the port actually connected to)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.hostname or "", port


# How many times a request is sent again after a reused pooled connection turned out
# closed (each attempt discards one stale connection).
STALE_CONNECTION_RETRIES = 3


class _Attempt:
    """One send of a request: whether it went out on a pooled keep-alive connection."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


# The attempt in flight on this task: connect() runs inside session.request(), on the task
# that awaits it, so the connector can tell send() about the connection it handed out.
_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("tollgate_upstream_attempt", default=None)


class ReuseAwareConnector(aiohttp.TCPConnector):
    """A TCPConnector that tells the request in flight whether its connection was pooled.

    A connection handed out before is a reused keep-alive one. (A TraceConfig's
    on_connection_reuseconn says the same, but any TraceConfig makes aiohttp run its trace
    machinery on every request.)"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        while True:
            conn = await super().connect(req, traces, timeout)
            proto = conn.protocol
            if proto is None:
                return conn
            if proto not in self._handed_out:
                self._handed_out.add(proto)
                return conn
            # A pooled keep-alive connection. aiohttp re-arms a connection's read timer on
            # any bytes it receives, pooled or not, so stray bytes after a response (a
            # trailing CRLF some servers send) leave a timer running that belongs to no
            # request: if it fired while pooled, the connection holds a timeout error and
            # the next request on it would fail at once with a 504 for time it never spent.
            if proto.exception() is not None or proto.should_close:
                conn.close()  # went bad while pooled: try the next one, or a fresh one
                continue
            proto.read_timeout = None
            proto.start_timeout()  # with no read timeout: cancels the stray timer
            attempt = _ATTEMPT.get()
            if attempt is not None:
                attempt.reused = True
            return conn


def open_upstream(name: str, settings: UpstreamSettings, global_settings: Settings) -> Upstream:
    timeouts = settings.effective_timeouts(global_settings.timeouts)
    connector = ReuseAwareConnector(
        limit=settings.max_connections,
        limit_per_host=settings.max_connections,
        keepalive_timeout=30,
        enable_cleanup_closed=True,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        # first_byte bounds the wait for headers; idle replaces it once they arrive (relay()).
        timeout=aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeouts.connect, sock_read=timeouts.first_byte
        ),
        auto_decompress=True,
        skip_auto_headers=("User-Agent", "Content-Type"),
    )
    return Upstream(
        name=name,
        settings=settings,
        session=session,
        api_base=settings.api_base,
        idle_timeout=timeouts.idle,
    )


def upstream_headers(
    incoming: Mapping[str, str], upstream: Upstream, ex: Exchange | None, *, drop_client_auth: bool
) -> CIMultiDict[str]:
    """Headers sent upstream: the client's minus hop-by-hop, with credentials from config."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in _NOT_FORWARDED_UP or lname.startswith("x-tollgate-"):
            continue
        out.add(name, value)
    # The hop between proxy and upstream is uncompressed so the tap reads plain SSE.
    out["Accept-Encoding"] = "identity"
    key = upstream.settings.api_key
    azure = upstream.settings.kind == "azure"
    if key is not None and azure:
        # Azure OpenAI takes its key as `api-key`; a client's credentials never go with it.
        out.popall("Authorization", None)
        out["api-key"] = key.get_secret_value()
    elif key is not None:
        out["Authorization"] = f"Bearer {key.get_secret_value()}"
        out.popall("api-key", None)
    elif drop_client_auth:
        # A Tollgate virtual key, whichever header the client sent it in.
        out.popall("Authorization", None)
        out.popall("api-key", None)
    for name, value in upstream.settings.headers.items():
        out[name] = value
    if ex is not None:
        trace = ex.extra.get("trace_headers")
        if trace:
            for name, value in trace.items():
                out[name] = value
        # A client's sane x-request-id is the request id, so it goes up unchanged; without
        # one (or with one refused as hostile) the upstream sees Tollgate's.
        out["X-Request-Id"] = ex.request_id
    return out


def relayed_headers(upstream_headers_: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as the client gets them: unchanged but for
    hop-by-hop ones and those the relay recomputes. Its x-request-id (OpenAI's `req_...`,
    what the SDK shows as `response.request_id` and OpenAI support asks for) included."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream_headers_.items():
        lname = name.lower()
        if lname in _NOT_RELAYED_DOWN or lname.startswith("x-tollgate-"):
            continue
        out.add(name, value)
    return out


async def send(
    upstream: Upstream,
    method: str,
    path_qs: str,
    headers: CIMultiDict[str],
    body: bytes | None,
    ex: Exchange,
) -> aiohttp.ClientResponse:
    """Send the request and wait for response headers; errors come back translated."""
    url = upstream.api_base + path_qs
    ex.extra["upstream_address"] = upstream.address
    ex.t_upstream_sent_ns = time.perf_counter_ns()
    attempt = _Attempt()
    token = _ATTEMPT.set(attempt)
    try:
        for retry in range(STALE_CONNECTION_RETRIES + 1):
            attempt.reused = False
            try:
                resp = await upstream.session.request(
                    method, url, headers=headers, data=body, allow_redirects=False
                )
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection the upstream closed as we reused it: nothing
                # was answered, so the request goes again on another connection. aiohttp does
                # this only for idempotent methods; a POST met the same race. A fresh
                # connection that fails is never retried: the upstream may have acted on it.
                if not attempt.reused or retry == STALE_CONNECTION_RETRIES:
                    raise translate_upstream_exception(exc, upstream.name, _phase_of(exc)) from exc
                log.debug("upstream %s dropped a reused connection (%s); sending again", upstream.name, exc)
            except Exception as exc:  # noqa: BLE001 - translated in exactly one place
                raise translate_upstream_exception(exc, upstream.name, _phase_of(exc)) from exc
    finally:
        _ATTEMPT.reset(token)
    ex.t_headers_ns = time.perf_counter_ns()
    return resp


def _phase_of(exc: BaseException) -> str:
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return "connect"
    return "headers"


def _set_idle_timeout(resp: aiohttp.ClientResponse, idle: float) -> None:
    # aiohttp re-arms its read timer on every data_received; switching the value after the
    # headers gives a per-chunk idle timeout with no timer of our own per chunk.
    conn = resp.connection
    if conn is not None and conn.protocol is not None:
        conn.protocol.read_timeout = idle
        conn.protocol.start_timeout()  # re-arm now, not at the next data_received


async def relay(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    upstream: Upstream,
    ex: Exchange,
    on_first_token: Callable[[Exchange], None],
    complete: Callable[[], Awaitable[None]],
) -> web.StreamResponse:
    """Relay the upstream response to the client as it arrives; fill the Exchange on the way.

    `complete` runs once the whole response is known and before its last bytes reach the
    client (the final chunk of a chunked or SSE body, or the last piece of a Content-Length
    body), so a response the client sees complete has already been accounted and settled.

    Raises UpstreamError before the response has started; after, failures are reported to
    the client in-stream (SSE) or by closing the connection (plain bodies), and recorded.
    """
    ex.status = resp.status
    content_type = resp.headers.get("Content-Type", "")
    is_sse = content_type.startswith("text/event-stream")
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    out.headers.update(relayed_headers(resp.headers))
    # Tollgate's own id in its own header (it names the log line, span and spend row); the
    # x-request-id is the upstream's, or Tollgate's only if the upstream sent none.
    out.headers["X-Tollgate-Request-Id"] = ex.request_id
    out.headers.setdefault("X-Request-Id", ex.request_id)
    extra = ex.extra.get("response_headers")
    if extra:
        out.headers.update(extra)
    if is_sse:
        out.headers["X-Accel-Buffering"] = "no"
        out.headers.setdefault("Cache-Control", "no-cache")
    elif "Content-Length" in resp.headers and "Content-Encoding" not in resp.headers:
        out.content_length = int(resp.headers["Content-Length"])
    expected_length = out.content_length
    _set_idle_timeout(resp, upstream.idle_timeout)

    content = resp.content
    tap = StreamTap(ex, on_first_token) if is_sse else None
    stripper = UsageStripper() if (is_sse and ex.usage_injected) else None
    body = None if is_sse else BodyKeeper()
    started = False
    perf = time.perf_counter_ns

    async def completing() -> None:
        if body is not None:
            body.measure(ex)
        ex.outcome = "ok" if resp.status < 400 else "upstream_error"
        await complete()

    try:
        while True:
            try:
                chunk = await content.readany()
            except Exception as exc:  # noqa: BLE001 - translated in exactly one place
                raise translate_upstream_exception(exc, upstream.name, "body") from exc
            t_read = perf()
            if not chunk:
                break
            if ex.t_first_byte_ns is None:
                ex.t_first_byte_ns = t_read
            if stripper is not None:
                assert tap is not None
                chunk = tap.strip(chunk, t_read, stripper)
                if not chunk:
                    continue
            if not started:
                await out.prepare(request)
                started = True
            if body is not None:
                body.add(chunk)
                if expected_length is not None and body.size >= expected_length:
                    # The client will take this piece as the end of the body.
                    ex.overhead_ns += perf() - t_read
                    await completing()
                    t_read = perf()
            await out.write(chunk)
            t_written = perf()
            ex.overhead_ns += t_written - t_read
            ex.bytes_out += len(chunk)
            if tap is not None and stripper is None:
                tap.tap(chunk, t_read)
        if tap is not None:
            tail = tap.finish(perf())
            if stripper is not None and tail:
                rest = b"".join([stripper.rewrite(ev) for ev in tail])
                if rest:
                    if not started:
                        await out.prepare(request)
                        started = True
                    await out.write(rest)
        if not started:
            await out.prepare(request)
            started = True
        if ex.outcome is None:
            await completing()
        await out.write_eof()
    except UpstreamError as err:
        ex.error_type = err.kind
        ex.error_message = err.message
        ex.error_detail = err.detail
        if not started:
            raise
        ex.outcome = "proxy_error"
        if is_sse:
            try:
                await out.write(err.to_sse(ex.request_id))
                await out.write_eof()
            except (ConnectionError, RuntimeError):
                ex.outcome = "client_gone"
        else:
            # A plain body cut short must not look complete to the client.
            if request.transport is not None:
                request.transport.close()
    except asyncio.CancelledError:
        # The client left (aiohttp cancels the handler): drop the upstream connection now
        # so the upstream stops generating.
        ex.outcome = "client_gone"
        resp.close()
        raise
    except ConnectionError:
        ex.outcome = "client_gone"
        resp.close()
    finally:
        if ex.outcome in ("client_gone", "proxy_error"):
            resp.close()
        else:
            resp.release()
        if body is not None:
            body.measure(ex)
    return out


class ContextSink(Protocol):
    def set_llamacpp_context(self, upstream: str, n_ctx: int) -> None: ...


async def read_llamacpp_context(upstream: Upstream, metrics: ContextSink, attempts: int = 30) -> None:
    """Read n_ctx from llama-server's /props (retrying while it loads) into the metrics."""
    url = upstream.settings.root_url + "/props"
    headers = upstream_headers({}, upstream, None, drop_client_auth=True)
    for attempt in range(attempts):
        try:
            async with upstream.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    props = await resp.json(content_type=None)
                    settings = props.get("default_generation_settings") or {}
                    n_ctx = settings.get("n_ctx", props.get("n_ctx"))
                    if isinstance(n_ctx, int):
                        upstream.context_size = n_ctx
                        metrics.set_llamacpp_context(upstream.name, n_ctx)
                        return
                    log.warning("llama-server %s: no n_ctx in /props", upstream.name)
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("llama-server %s /props not readable yet: %s", upstream.name, exc)
        await asyncio.sleep(min(10.0, 0.5 * (attempt + 1)))
    log.warning("llama-server %s: gave up reading n_ctx from /props", upstream.name)
