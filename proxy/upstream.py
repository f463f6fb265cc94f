"""Upstreams: one pooled `ClientSession` per configured upstream, opened in the app's
lifecycle, the replicas of a replicated upstream with what this process knows of them
(requests in flight, health, free slots), and what Tollgate learns about an upstream
outside any request (llama-server's context size)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp.connector import Connection
from pydantic import SecretStr

from proxy.replicas import ReplicaState, choose
from proxy.settings import Settings, UpstreamSettings

log = logging.getLogger("tollgate.forward")


class ReplicaSink(Protocol):
    def replica_in_flight(self, upstream: str, replica: str, delta: int) -> None: ...

    def replica_up(self, upstream: str, replica: str, up: bool) -> None: ...


@dataclass(slots=True, eq=False)
class Replica(ReplicaState):
    api_base: str = ""
    root_url: str = ""
    api_key: SecretStr | None = None  # the replica's own, in place of the upstream's


class ReplicaSet:
    """The replicas of one upstream and this process's view of them. Every change goes
    through here, so the gauges follow the state."""

    __slots__ = ("upstream", "replicas", "by_name", "eject_for", "sink", "turn")

    def __init__(self, upstream: str, replicas: tuple[Replica, ...], eject_for: float, sink: ReplicaSink | None) -> None:
        self.upstream = upstream
        self.replicas = replicas
        self.by_name = {r.name: r for r in replicas}
        self.eject_for = eject_for
        self.sink = sink
        self.turn = 0
        if sink is not None:
            for r in replicas:
                sink.replica_up(upstream, r.name, r.up)

    def acquire(self, tried: list[Replica], now: float) -> Replica | None:
        """The least busy replica not in `tried`, counted in flight; None when none is left."""
        replica = choose(self.replicas, tried, now, self.turn)
        self.turn += 1
        if replica is None:
            return None
        replica.in_flight += 1
        if self.sink is not None:
            self.sink.replica_in_flight(self.upstream, replica.name, 1)
        return replica

    def release(self, name: str) -> None:
        replica = self.by_name[name]
        replica.in_flight -= 1
        if self.sink is not None:
            self.sink.replica_in_flight(self.upstream, name, -1)

    def connect_failed(self, replica: Replica, now: float) -> None:
        was_up = replica.up
        replica.ejected(now, self.eject_for)
        if was_up:
            log.warning("upstream %s: replica %s could not be reached; left out for %.0f s",
                        self.upstream, replica.name, self.eject_for)
            if self.sink is not None:
                self.sink.replica_up(self.upstream, replica.name, False)

    def verdict(self, replica: Replica, healthy: bool) -> None:
        """A health check's answer, or a request it served (healthy)."""
        if replica.up != healthy:
            log.warning("upstream %s: replica %s is %s", self.upstream, replica.name, "up" if healthy else "down")
            if self.sink is not None:
                self.sink.replica_up(self.upstream, replica.name, healthy)
        replica.checked(healthy)

    def slots(self, replica: Replica, free: int | None) -> None:
        replica.slots_free = free
        replica.in_flight_at_scrape = replica.in_flight


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
    # A replicated upstream's replicas; None for one base_url (the request path then never
    # looks further than this attribute).
    replicas: ReplicaSet | None = None
    # Set when a reload replaced this upstream: its background loops stop.
    retired: bool = False

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def stopped(self) -> bool:
        return self.retired or self.session.closed

    def roots(self) -> list[tuple[Replica | None, str]]:
        """Each server of this upstream and its root URL: the one base_url, or each replica."""
        if self.replicas is None:
            return [(None, self.settings.root_url)]
        return [(r, r.root_url) for r in self.replicas.replicas]

    def healthy_api_base(self) -> tuple[str, Replica | None]:
        """The API base for a request of Tollgate's own: an up replica's, if any."""
        if self.replicas is None:
            return self.api_base, None
        now = time.monotonic()
        replica = next((r for r in self.replicas.replicas if r.eligible(now)), self.replicas.replicas[0])
        return replica.api_base, replica

    def own_headers(self, replica: Replica | None = None) -> dict[str, str]:
        """What Tollgate sends on requests of its own (not a client's): the configured key
        (the replica's, where it has one) and headers, and an uncompressed answer."""
        out = {"Accept-Encoding": "identity"}
        key = replica.api_key if replica is not None and replica.api_key is not None else self.settings.api_key
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


def open_upstream(
    name: str, settings: UpstreamSettings, global_settings: Settings, sink: ReplicaSink | None = None
) -> Upstream:
    timeouts = settings.effective_timeouts(global_settings.timeouts)
    replicas = None
    if settings.replicas is not None:
        replicas = ReplicaSet(
            name,
            tuple(
                Replica(
                    name=r.label,
                    api_base=settings.api_base_of(r.base_url),
                    root_url=settings.root_url_of(r.base_url),
                    api_key=r.api_key,
                )
                for r in settings.replicas
            ),
            settings.health_check.eject_for,
            sink,
        )
    # max_connections is per server: each replica gets as many.
    servers = len(settings.addresses)
    connector = ReuseAwareConnector(
        limit=settings.max_connections * servers,
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
        # The session is shared by every client: a cookie the upstream sets for one (OpenAI's
        # Cloudflare cookies) must not ride on the others' requests. A client's own Cookie
        # header goes up as it sent it, and Set-Cookie comes back to it unchanged.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    return Upstream(
        name=name,
        settings=settings,
        session=session,
        api_base=settings.api_base,
        idle_timeout=timeouts.idle,
        replicas=replicas,
    )


class ContextSink(Protocol):
    def set_llamacpp_context(self, upstream: str, n_ctx: int) -> None: ...


async def read_llamacpp_context(upstream: Upstream, metrics: ContextSink, attempts: int = 30) -> None:
    """Read n_ctx from llama-server's /props (retrying while it loads) into the metrics.
    Replicas serve the same model: the first that answers speaks for all."""
    servers = upstream.roots()
    for attempt in range(attempts):
        replica, root = servers[attempt % len(servers)]
        try:
            async with upstream.session.get(
                root + "/props", headers=upstream.own_headers(replica), timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
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
