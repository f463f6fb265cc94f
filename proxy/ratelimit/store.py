"""Where limit counters live: in the ledger's own storage, so every worker (one SQLite
file) and every instance (one Redis) shares them exactly.

One `acquire` checks every limit that applies to a request and, only if all fit, charges
them all: one `BEGIN IMMEDIATE` transaction on the ledger's SQLite file, or one Lua script
on the ledger's Redis. Nothing else can interleave, so concurrent requests across workers
and instances can never both take the last unit.

- requests and tokens per minute: a GCRA debt per counter (proxy.ratelimit.gcra):
  SQLite table `rate_limits`, Redis hash `P:rl:r:<counter>` (d, at), which expires once
  drained.
- requests in flight: one row (zset member) per request holding a slot, with a lease end;
  SQLite table `in_flight`, Redis zset `P:rl:f:<counter>` (grant -> lease end). A slot is
  given back when its request finishes; a process that dies holding slots stops renewing
  their leases, and they count no more once the leases end.

Time: the SQLite store decides at the `now` it is given (the ledger's clock: workers on
one host share it). The Redis store reads Redis's own clock (`TIME`) inside each script,
so instances on different hosts agree on one clock; no instant from a Tollgate host is
ever compared with it, and every TTL is a duration.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.ratelimit.gcra import SCALE, corrected, drained, fits, reset_ms
from proxy.ratelimit.rules import LimitKind
from proxy.spend.ledger import Ledger, LedgerError
from proxy.spend.ledger.sqlite_db import SqliteDb


@dataclass(frozen=True, slots=True)
class Want:
    """What a request asks of one counter: `cost` units (requests: 1, tokens: the
    estimate, in flight: one slot) against `limit`."""

    id: str
    kind: LimitKind
    limit: int
    cost: int


@dataclass(frozen=True, slots=True)
class Acquired:
    """`levels[i]` is counter i's level: a GCRA debt (per-minute kinds) or the slots in
    use (in flight); after the charge when admitted, as checked when refused. `refused`
    is the index of the first counter that did not fit. `now_ms` is the store's clock."""

    ok: bool
    now_ms: int
    levels: list[int]
    refused: int | None = None


class LimitStore(Protocol):
    async def acquire(self, grant_id: str, wants: Sequence[Want], lease_ms: int, now_ms: int) -> Acquired: ...

    async def finish(
        self, grant_id: str, slots: Sequence[str], corrections: Sequence[tuple[str, int, int]], now_ms: int
    ) -> None:
        """Give back the grant's slots; correct token counters by (counter, limit, delta)."""
        ...

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int, now_ms: int) -> None:
        """Extend the leases of (counter, grant) slots still held."""
        ...

    async def sweep(self, now_ms: int) -> None:
        """Forget drained counters and slots whose lease ended."""
        ...


async def open_store(ledger: Ledger) -> LimitStore:
    """The store on the ledger's own storage."""
    from proxy.spend.ledger.sqlite import SqliteLedger

    if isinstance(ledger, SqliteLedger):
        store = SqliteLimits(ledger.db)
        await ledger.db.run(lambda conn: conn.executescript(SCHEMA))
        return store
    from proxy.spend.ledger.redis import RedisLedger

    if isinstance(ledger, RedisLedger):
        return RedisLimits(ledger.client, ledger.prefix)
    raise LedgerError(f"rate limits need the SQLite or Redis ledger, not {type(ledger).__name__}")


# ---------------------------------------------------------------------------------------
# SQLite

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_limits (
    id TEXT PRIMARY KEY,              -- rule|kind|scope
    debt INTEGER NOT NULL,            -- GCRA debt at at_ms (units x 60000)
    at_ms INTEGER NOT NULL,
    empty_at_ms INTEGER NOT NULL      -- when the debt has drained: the row can go
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_limits_empty ON rate_limits(empty_at_ms);
CREATE TABLE IF NOT EXISTS in_flight (
    limit_id TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    lease_until_ms INTEGER NOT NULL,
    PRIMARY KEY (limit_id, grant_id)
) WITHOUT ROWID;
"""


def _debt(conn: sqlite3.Connection, counter: str, limit: int, now_ms: int) -> int:
    row = conn.execute("SELECT debt, at_ms FROM rate_limits WHERE id = ?", (counter,)).fetchone()
    return 0 if row is None else drained(row[0], row[1], now_ms, limit)


def _set_debt(conn: sqlite3.Connection, counter: str, debt: int, limit: int, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO rate_limits (id, debt, at_ms, empty_at_ms) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
        "SET debt = excluded.debt, at_ms = excluded.at_ms, empty_at_ms = excluded.empty_at_ms",
        (counter, debt, now_ms, now_ms + reset_ms(debt, limit)),
    )


def _in_use(conn: sqlite3.Connection, counter: str, now_ms: int) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM in_flight WHERE limit_id = ? AND lease_until_ms > ?", (counter, now_ms)
    ).fetchone()
    return int(row[0])


class SqliteLimits:
    def __init__(self, db: SqliteDb) -> None:
        self.db = db

    async def acquire(self, grant_id: str, wants: Sequence[Want], lease_ms: int, now_ms: int) -> Acquired:
        def body(conn: sqlite3.Connection) -> Acquired:
            levels: list[int] = []
            refused: int | None = None
            for i, w in enumerate(wants):
                if w.kind == "in_flight":
                    level = _in_use(conn, w.id, now_ms)
                    ok = level + w.cost <= w.limit
                else:
                    level = _debt(conn, w.id, w.limit, now_ms)
                    ok = fits(level, w.cost, w.limit)
                levels.append(level)
                if refused is None and not ok:
                    refused = i
            if refused is not None:
                return Acquired(False, now_ms, levels, refused)
            for i, w in enumerate(wants):
                if w.kind == "in_flight":
                    conn.execute("DELETE FROM in_flight WHERE limit_id = ? AND lease_until_ms <= ?", (w.id, now_ms))
                    conn.execute(
                        "INSERT INTO in_flight (limit_id, grant_id, lease_until_ms) VALUES (?, ?, ?)",
                        (w.id, grant_id, now_ms + lease_ms),
                    )
                    levels[i] += 1
                else:
                    levels[i] += w.cost * SCALE
                    _set_debt(conn, w.id, levels[i], w.limit, now_ms)
            return Acquired(True, now_ms, levels)

        return await self.db.transact(body)

    async def finish(
        self, grant_id: str, slots: Sequence[str], corrections: Sequence[tuple[str, int, int]], now_ms: int
    ) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "DELETE FROM in_flight WHERE limit_id = ? AND grant_id = ?", [(s, grant_id) for s in slots]
            )
            for counter, limit, delta in corrections:
                _set_debt(conn, counter, corrected(_debt(conn, counter, limit, now_ms), delta), limit, now_ms)

        await self.db.transact(body)

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int, now_ms: int) -> None:
        until = now_ms + lease_ms

        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE in_flight SET lease_until_ms = ? WHERE limit_id = ? AND grant_id = ?",
                [(until, s, g) for s, g in slots],
            )

        await self.db.transact(body)

    async def sweep(self, now_ms: int) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM rate_limits WHERE empty_at_ms <= ?", (now_ms,))
            conn.execute("DELETE FROM in_flight WHERE lease_until_ms <= ?", (now_ms,))

        await self.db.transact(body)


# ---------------------------------------------------------------------------------------
# Redis

_COMMON = r"""
local P = ARGV[1]
local S = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function rkey(id) return P .. ':rl:r:' .. id end
local function fkey(id) return P .. ':rl:f:' .. id end
-- Integers as exact decimal text (Lua's own formatting turns 1e15 into "1e+15").
local function int(x) return string.format('%.0f', x) end
-- The GCRA debt now (proxy.ratelimit.gcra.drained); a missing hash has drained.
local function debt_of(id, limit)
  local v = redis.call('HMGET', rkey(id), 'd', 'at')
  if not v[1] then return 0 end
  local d, el = tonumber(v[1]), now - tonumber(v[2])
  if el < 0 then el = 0 end
  local dec = el * limit
  if dec >= d then return 0 end
  return d - dec
end
local function set_debt(id, d, limit)
  if d <= 0 then
    redis.call('DEL', rkey(id))
    return
  end
  redis.call('HSET', rkey(id), 'd', int(d), 'at', int(now))
  -- Gone a second after it has drained: nothing is lost, a missing hash owes nothing.
  redis.call('PEXPIRE', rkey(id), int(math.ceil(d / limit) + 1000))
end
"""

# ARGV: P, grant, lease_ms, n, then n x (id, kind, limit, cost). Returns
# {refused index or 0, now_ms, levels}.
_ACQUIRE = _COMMON + r"""
local grant, lease, n = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local levels, refused = {}, 0
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local id, kind, limit, cost = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local ok
  if kind == 'in_flight' then
    redis.call('ZREMRANGEBYSCORE', fkey(id), '-inf', int(now))
    levels[i] = redis.call('ZCARD', fkey(id))
    ok = levels[i] + cost <= limit
  else
    levels[i] = debt_of(id, limit)
    ok = levels[i] + cost * S <= limit * S
  end
  if refused == 0 and not ok then refused = i end
end
if refused == 0 then
  for i = 1, n do
    local b = 4 + (i - 1) * 4
    local id, kind, limit, cost = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    if kind == 'in_flight' then
      redis.call('ZADD', fkey(id), int(now + lease), grant)
      -- The set outlives its longest lease; renewals extend it.
      redis.call('PEXPIRE', fkey(id), int(lease + S))
      levels[i] = levels[i] + cost
    else
      levels[i] = levels[i] + cost * S
      set_debt(id, levels[i], limit)
    end
  end
end
local out = {}
for i = 1, n do out[i] = int(levels[i]) end
return {refused, int(now), out}
"""

# ARGV: P, grant, nslots, slot ids..., then (id, limit, delta) triples.
_FINISH = _COMMON + r"""
local grant, nslots = ARGV[2], tonumber(ARGV[3])
for i = 1, nslots do redis.call('ZREM', fkey(ARGV[3 + i]), grant) end
local b = 4 + nslots
while b + 2 <= #ARGV do
  local id, limit, delta = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local d = debt_of(id, limit) + delta * S
  if d < 0 then d = 0 end
  set_debt(id, d, limit)
  b = b + 3
end
return 1
"""

# ARGV: P, lease_ms, then (id, grant) pairs: only slots still held are extended.
_RENEW = _COMMON + r"""
local lease = tonumber(ARGV[2])
local b = 3
while b + 1 <= #ARGV do
  redis.call('ZADD', fkey(ARGV[b]), 'XX', int(now + lease), ARGV[b + 1])
  redis.call('PEXPIRE', fkey(ARGV[b]), int(lease + S))
  b = b + 2
end
return 1
"""


class RedisLimits:
    def __init__(self, client: Any, prefix: str) -> None:
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._finish = client.register_script(_FINISH)
        self._renew = client.register_script(_RENEW)

    async def _call(self, script: Any, args: list[Any]) -> Any:
        # Imported here: the redis package (and the OpenTelemetry metrics SDK it pulls in)
        # costs every process ~8 MB, and only a Redis store ever needs it.
        from redis.exceptions import RedisError

        try:
            return await script(keys=[], args=[self.prefix, *args])
        except RedisError as exc:
            raise LedgerError(f"redis rate limits: {exc}") from exc

    async def acquire(self, grant_id: str, wants: Sequence[Want], lease_ms: int, now_ms: int) -> Acquired:
        args: list[Any] = [grant_id, lease_ms, len(wants)]
        for w in wants:
            args += [w.id, w.kind, w.limit, w.cost]
        refused, now, levels = await self._call(self._acquire, args)
        index = int(refused)
        return Acquired(index == 0, int(now), [int(v) for v in levels], index - 1 if index else None)

    async def finish(
        self, grant_id: str, slots: Sequence[str], corrections: Sequence[tuple[str, int, int]], now_ms: int
    ) -> None:
        args: list[Any] = [grant_id, len(slots), *slots]
        for counter, limit, delta in corrections:
            args += [counter, limit, delta]
        await self._call(self._finish, args)

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int, now_ms: int) -> None:
        args: list[Any] = [lease_ms]
        for counter, grant in slots:
            args += [counter, grant]
        await self._call(self._renew, args)

    async def sweep(self, now_ms: int) -> None:
        """Nothing to do: drained counters expire, and slot sets with their last lease."""
