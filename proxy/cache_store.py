"""Where the response cache keeps its entries: an SQLite file of its own (one host), or Redis
(shared by every instance). Both expire entries after the TTL and hold at most max_entries
and max_bytes, evicting the least recently used first. Both count what they do in the
Prometheus registry; neither ever fails a request: a store that cannot be reached reads as
a miss and a write that fails is dropped (counted as tollgate_response_cache_errors_total).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from proxy.config_sections import ResponseCacheSettings
from proxy.response_cache import Entry

log = logging.getLogger("tollgate.cache")


@dataclass(frozen=True, slots=True)
class Found:
    entry: Entry
    ttl_seconds: float  # remaining freshness


class Backend(Protocol):
    async def get(self, key: str) -> tuple[bytes, float] | None: ...

    async def put(self, key: str, blob: bytes) -> tuple[int, int]:
        """Store; returns (evicted for size, expired entries removed)."""
        ...

    async def close(self) -> None: ...


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "upstream", "endpoint")
        self.hits = Counter(
            "tollgate_response_cache_hits_total", "Requests answered from the response cache.", labels, registry=registry
        )
        self.misses = Counter(
            "tollgate_response_cache_misses_total",
            "Cacheable requests looked up and not found (forwarded upstream).",
            labels,
            registry=registry,
        )
        self.stores = Counter(
            "tollgate_response_cache_stores_total", "Responses written to the response cache.", labels, registry=registry
        )
        self.evictions = Counter(
            "tollgate_response_cache_evictions_total",
            "Entries removed: reason is size (max_entries or max_bytes, least recently used first) "
            "or expired (past the TTL, found and removed).",
            ("reason",),
            registry=registry,
        )
        self.saved = Counter(
            "tollgate_response_cache_saved_usd_total",
            "What the requests answered from the cache would have cost upstream, in USD.",
            ("model", "upstream", "key"),
            registry=registry,
        )
        self.errors = Counter(
            "tollgate_response_cache_errors_total",
            "Lookups and writes the cache backend failed (a failed lookup is served as a miss).",
            ("op",),
            registry=registry,
        )


class ResponseCache:
    """The response cache of one process, over its backend."""

    def __init__(self, settings: ResponseCacheSettings, registry: CollectorRegistry, backend: Backend | None = None) -> None:
        self.settings = settings
        self.metrics = CacheMetrics(registry)
        self.backend: Backend = backend if backend is not None else _backend(settings)
        self.writes: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> Found | None:
        try:
            got = await self.backend.get(key)
        except Exception as exc:  # noqa: BLE001 - a cache that is down is a miss
            self.metrics.errors.labels("get").inc()
            log.warning("response cache lookup failed: %s", exc)
            return None
        if got is None:
            return None
        entry = Entry.decode(got[0])
        return None if entry is None else Found(entry, got[1])

    def put(self, key: str, entry: Entry, labels: tuple[str, str, str]) -> None:
        """Write in the background: the client already has its answer."""
        task = asyncio.get_running_loop().create_task(self._put(key, entry, labels))
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)

    async def _put(self, key: str, entry: Entry, labels: tuple[str, str, str]) -> None:
        try:
            evicted, expired = await self.backend.put(key, entry.encode())
        except Exception as exc:  # noqa: BLE001 - an entry not written is a later miss
            self.metrics.errors.labels("put").inc()
            log.warning("response cache write failed: %s", exc)
            return
        self.metrics.stores.labels(*labels).inc()
        if evicted:
            self.metrics.evictions.labels("size").inc(evicted)
        if expired:
            self.metrics.evictions.labels("expired").inc(expired)

    def count_saved(self, model: str, upstream: str, key: str, saved: Decimal) -> None:
        self.metrics.saved.labels(model, upstream, key).inc(float(saved))

    async def close(self) -> None:
        if self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
        await self.backend.close()


def _backend(settings: ResponseCacheSettings) -> Backend:
    if settings.backend == "redis":
        assert settings.redis_url is not None  # the settings require it
        return RedisBackend(settings)
    return SqliteBackend(settings)


# --------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    blob BLOB NOT NULL,
    size INTEGER NOT NULL,
    expires_at REAL NOT NULL,   -- unix seconds: this host's clock, read at write time
    used_at REAL NOT NULL       -- last write or hit: the LRU order
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_used ON entries(used_at);
"""


class SqliteBackend:
    """One connection on one thread of its own (the file may be shared by the workers of
    one host: WAL, and a busy timeout)."""

    def __init__(self, settings: ResponseCacheSettings) -> None:
        self.settings = settings
        self.path = Path(settings.path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-cache")
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A lookup waits for another worker's write at most this long: a request is
            # never held longer by its cache than a slow miss would cost.
            conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _get(self, key: str) -> tuple[bytes, float] | None:
        conn = self._connection()
        now = time.time()
        row = conn.execute("SELECT blob, expires_at FROM entries WHERE key = ? AND expires_at > ?", (key, now)).fetchone()
        if row is None:
            return None
        try:
            conn.execute("UPDATE entries SET used_at = ? WHERE key = ?", (now, key))
        except sqlite3.OperationalError as exc:  # busy: the LRU order is a little stale, no more
            log.debug("response cache: last use of an entry not recorded: %s", exc)
        return bytes(row[0]), float(row[1]) - now

    def _put(self, key: str, blob: bytes) -> tuple[int, int]:
        conn = self._connection()
        s = self.settings
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT OR REPLACE INTO entries (key, blob, size, expires_at, used_at) VALUES (?, ?, ?, ?, ?)",
                (key, blob, len(blob), now + s.ttl_seconds, now),
            )
            expired = conn.execute("DELETE FROM entries WHERE expires_at <= ?", (now,)).rowcount
            # Most recently used first; everything past the first max_entries, or past
            # max_bytes in running total, goes.
            evicted = conn.execute(
                "DELETE FROM entries WHERE key IN (SELECT key FROM ("
                " SELECT key, ROW_NUMBER() OVER w AS n, SUM(size) OVER w AS running FROM entries"
                " WINDOW w AS (ORDER BY used_at DESC, key)"
                ") WHERE n > ? OR running > ?)",
                (s.max_entries, s.max_bytes),
            ).rowcount
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return evicted, expired

    async def get(self, key: str) -> tuple[bytes, float] | None:
        result: tuple[bytes, float] | None = await self._run(self._get, key)
        return result

    async def put(self, key: str, blob: bytes) -> tuple[int, int]:
        result: tuple[int, int] = await self._run(self._put, key, blob)
        return result

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(_close)
        self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------- Redis

# KEYS: entry, index (zset: key -> last use, Redis's own clock), sizes (hash), total bytes.
# ARGV: key suffix, ttl ms. Returns the entry and its remaining ms, or nil.
_GET = """
local blob = redis.call('GET', KEYS[1])
if not blob then
  local size = redis.call('HGET', KEYS[3], ARGV[1])
  if size then
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('DECRBY', KEYS[4], size)
  end
  return nil
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
return {blob, redis.call('PTTL', KEYS[1])}
"""

# KEYS: entry, index, sizes, total; ARGV: key suffix, blob, ttl ms, max entries, max bytes,
# entry key prefix. Returns {evicted for size, expired found}.
_PUT = """
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then redis.call('DECRBY', KEYS[4], old) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], string.len(ARGV[2]))
local total = redis.call('INCRBY', KEYS[4], string.len(ARGV[2]))
local evicted, expired = 0, 0
local max_entries, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
while redis.call('ZCARD', KEYS[2]) > max_entries or total > max_bytes do
  local popped = redis.call('ZPOPMIN', KEYS[2])
  local member = popped[1]
  if not member then break end
  local size = tonumber(redis.call('HGET', KEYS[3], member) or '0')
  redis.call('HDEL', KEYS[3], member)
  total = redis.call('DECRBY', KEYS[4], size)
  if redis.call('DEL', ARGV[6] .. member) == 1 then evicted = evicted + 1 else expired = expired + 1 end
end
return {evicted, expired}
"""


class RedisBackend:
    """Entries under `<prefix>:rc:e:<key>` with a relative expiry (PX), an LRU index and the
    sizes beside them; both scripts run atomically, so instances sharing the cache agree on
    its bounds."""

    def __init__(self, settings: ResponseCacheSettings) -> None:
        import redis.asyncio as aioredis

        self.settings = settings
        assert settings.redis_url is not None
        self.client: Any = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, max_connections=32
        )
        base = f"{settings.key_prefix}:rc:"
        self.entry_prefix = base + "e:"
        self.meta = (base + "index", base + "sizes", base + "total")
        self._get_script = self.client.register_script(_GET)
        self._put_script = self.client.register_script(_PUT)

    async def get(self, key: str) -> tuple[bytes, float] | None:
        got = await self._get_script(keys=[self.entry_prefix + key, *self.meta], args=[key])
        if got is None:
            return None
        blob, pttl = got
        return bytes(blob), max(0, int(pttl)) / 1000.0

    async def put(self, key: str, blob: bytes) -> tuple[int, int]:
        s = self.settings
        evicted, expired = await self._put_script(
            keys=[self.entry_prefix + key, *self.meta],
            args=[key, blob, int(s.ttl_seconds * 1000), s.max_entries, s.max_bytes, self.entry_prefix],
        )
        return int(evicted), int(expired)

    async def close(self) -> None:
        await self.client.aclose()
