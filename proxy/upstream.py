"""Upstreams: one pooled `ClientSession` per configured upstream, opened in the app's
lifecycle, and what Tollgate learns about an upstream outside any request (llama-server's
context size)."""

from __future__ import annotations

import asyncio
import logging
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp.connector import Connection

from proxy.settings import Settings, UpstreamSettings

log = logging.getLogger("tollgate.forward")


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

    def own_headers(self) -> dict[str, str]:
        """What Tollgate sends on requests of its own (not a client's): the configured key
        and headers, and an uncompressed answer."""
        out = {"Accept-Encoding": "identity"}
        key = self.settings.api_key
        if key is not None and self.settings.kind == "azure":
            out["api-key"] = key.get_secret_value()  # Azure OpenAI's way
        elif key is not None:
            out["Authorization"] = f"Bearer {key.get_secret_value()}"
        out.update(self.settings.headers)
        return out


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


class ContextSink(Protocol):
    def set_llamacpp_context(self, upstream: str, n_ctx: int) -> None: ...


async def read_llamacpp_context(upstream: Upstream, metrics: ContextSink, attempts: int = 30) -> None:
    """Read n_ctx from llama-server's /props (retrying while it loads) into the metrics."""
    url = upstream.settings.root_url + "/props"
    headers = upstream.own_headers()
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
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.debug("llama-server %s /props not readable yet: %s", upstream.name, exc)
        await asyncio.sleep(min(10.0, 0.5 * (attempt + 1)))
    log.warning("llama-server %s: gave up reading n_ctx from /props", upstream.name)
