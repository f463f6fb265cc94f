"""The shared ledger: budget counters in Redis, changed only by atomic Lua scripts.

Several Tollgate instances pointing at one Redis share budgets. A script runs alone on the
server, so the multi-bucket check-then-reserve and the settle are atomic without locks.

Keys (P = "{prefix}", braces so a Redis Cluster puts every key in one slot; the scripts
derive per-request and per-bucket keys from ids, which Redis only allows with one slot):

    P:b:<bucket>   hash  spent, tokens, requests (settled); reserved, rtokens, rcount (live
                         reservations); meta (JSON: name, scope, window, limits)
    P:l:<bucket>   zset  request id -> lease end (ms): which reservations are live
    P:r:<bucket>   hash  request id -> "nanos:tokens" reserved on this bucket
    P:q:<request>  hash  bucket id -> 1: where a request holds reservations
    P:d:<request>  str   settled marker (idempotent settle), kept a week
    P:s:<request>  str   a settled request's spend row (JSON) until its instance wrote it
    P:pending:<id> zset  request id -> when settled: rows not yet acknowledged as written
                         to the spend log whose identity is <id>
    P:m:<request>  str   "nanos:tokens:json": what the request is settled at if its lease
                         runs out (IfInterrupted); gone once it is settled or released
    P:leases       zset  request id -> lease end: what `expire` sweeps
    P:idx          zset  bucket id -> window end (ms; +inf for total): the buckets of the
                         current windows, for budget reports; finished ones are swept out

Expired leases are dropped inside every script that reads a bucket, so the live sum never
counts a dead reservation even if nobody ran `expire`. Bucket keys of a period expire a
day after their window ends.

Two clocks meet here, and they are never compared with each other. Tollgate's clock (the
`now` every method takes) decides windows, lease ends and the `idx` scores, which only
Tollgate's own scripts compare against Tollgate's `now`. Redis's clock only runs key TTLs,
and those are always sent as durations (PEXPIRE, SET PX) worked out on Tollgate's clock,
never as instants (PEXPIREAT, PXAT): an instant would be judged by Redis's clock, so a
Tollgate host minutes off Redis's clock, or a test with a fixed clock, would have keys
expire early or live on. A TTL only bounds how long a key outlives its window (a day);
budget arithmetic never reads Redis's clock. Leases are compared across instances on their
own clocks: instances whose clocks differ by more than a lease would drop each other's
reservations, hence NTP and leases of minutes.

Money is integer nano-USD; Lua numbers are doubles, exact to
2^53 nano-USD (about $9M per bucket). Increments go to Redis as decimal strings, never
as Lua-formatted numbers (which would turn large values into "1e+15").

The spend log is local: every instance writes its own SQLite spend log (SpendLog), after
the Redis settle succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.spend.budgets import Bucket, BucketState, Charge, LimitKind, from_nanos, spend_nanos, to_nanos
from proxy.spend.ledger import redis_scripts as lua
from proxy.spend.ledger.base import (
    DuplicateReservation,
    GroupBy,
    IfInterrupted,
    LedgerError,
    ReserveResult,
    Settled,
    SpendRow,
)
from proxy.spend.ledger.spend_log import SpendLog
from proxy.spend.ledger.sqlite import budget_row
from proxy.spend.ledger.sqlite_db import epoch_ms

BUCKET_EXPIRY_MARGIN_MS = 24 * 3600 * 1000
SETTLED_RETENTION_MS = 7 * 24 * 3600 * 1000
MIN_TTL_MS = 60 * 1000
# A settled spend row not acknowledged for this long was left by a process of this spend
# log that died before writing it; the process now holding that spend log writes it (a
# row written after all is kept once, by its ledger id). The app passes its lease (the
# same "that process is gone" as for reservations); acknowledgements go out every sweep.
DEFAULT_PENDING_GRACE_S = 60.0
MIN_PENDING_GRACE_S = 10.0
EXPIRE_BATCH = 500
# Every script runs in well under a millisecond; these only bound a dead or hung server.
SOCKET_CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 5.0
_STATE_FIELDS = 6

def _state(values: Sequence[Any]) -> BucketState:
    spent, reserved, tokens, rtokens, requests, rcount = (int(v) for v in values[:_STATE_FIELDS])
    return BucketState(
        spent=from_nanos(spent), reserved=from_nanos(reserved), tokens=tokens,
        requests=requests, reserved_tokens=rtokens, reserved_requests=rcount,
    )


def _meta(b: Bucket) -> str:
    return json.dumps(
        {
            "name": b.name, "key": b.key, "user": b.user, "team": b.team, "action": b.rule.action,
            "start_ms": epoch_ms(b.start),
            "end_ms": epoch_ms(b.end) if b.end is not None else None,
            "limit_nanos": to_nanos(b.limit_usd) if b.limit_usd is not None else None,
            "limit_tokens": b.limit_tokens, "limit_requests": b.limit_requests,
        },
        separators=(",", ":"),
    )


def _expiry(b: Bucket, now_ms: int) -> list[str]:
    """[window end on Tollgate's clock, key TTL from now]; ['', ''] for a total budget."""
    if b.end is None:
        return ["", ""]
    end_ms = epoch_ms(b.end)
    expire_at = end_ms + BUCKET_EXPIRY_MARGIN_MS
    # A request admitted just before its window ended may settle after the margin has
    # passed; the bucket then still lives MIN_TTL_MS rather than vanishing mid-script.
    return [str(end_ms), str(max(expire_at - now_ms, MIN_TTL_MS))]


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


class RedisLedger:
    def __init__(
        self, client: aioredis.Redis, spend_log: SpendLog, key_prefix: str = "tollgate",
        pending_grace_seconds: float = DEFAULT_PENDING_GRACE_S,
    ) -> None:
        self.pending_grace_ms = int(max(pending_grace_seconds, MIN_PENDING_GRACE_S) * 1000)
        self.client = client
        self.spend_log = spend_log
        self.prefix = "{" + key_prefix + "}"
        self._reserve = client.register_script(lua.RESERVE)
        self._lease = client.register_script(lua.LEASE)
        self._settle = client.register_script(lua.SETTLE)
        self._release = client.register_script(lua.RELEASE)
        self._expire = client.register_script(lua.EXPIRE)
        self._renew = client.register_script(lua.RENEW)
        self._abandon = client.register_script(lua.ABANDON)
        self._ack = client.register_script(lua.ACK)
        self._claim = client.register_script(lua.CLAIM)
        # Settlements whose spend row this instance wrote locally: acknowledged to Redis in
        # one batch by the next sweep (expire), not one more round trip per request.
        self._written: list[str] = []
        # Spend rows this instance took over from instances that died before writing them.
        self.recovered = 0
        self._state_script = client.register_script(lua.STATE)
        self.interrupted = 0
        # Request ids this instance holds reservations for: a settle with no charges for
        # any other id needs no Redis round trip (requests no budget applies to).
        self._holding: set[str] = set()

    @classmethod
    async def open(
        cls, url: str, spend_log_path: str | Path, key_prefix: str = "tollgate",
        busy_timeout_seconds: float = 30.0, max_connections: int = 32,
        pending_grace_seconds: float = DEFAULT_PENDING_GRACE_S,
    ) -> RedisLedger:
        # A bounded pool that waits for a free connection: a burst of requests queues on
        # it (each script is sub-millisecond) instead of opening a connection per request.
        # Socket timeouts: a Redis that hangs (not refusing, just silent) must fail a request
        # in seconds, the same as one that is down, not hold it forever.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=busy_timeout_seconds, decode_responses=True,
            socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
        )
        client = aioredis.Redis.from_pool(pool)
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise LedgerError(f"cannot reach Redis at {url}: {exc}") from exc
        spend_log = await SpendLog.open(spend_log_path, busy_timeout_seconds)
        return cls(client, spend_log, key_prefix, pending_grace_seconds)

    async def _call(self, script: Any, args: list[Any]) -> Any:
        try:
            return await script(keys=[], args=[self.prefix, *args])
        except RedisError as exc:
            raise LedgerError(f"redis ledger: {exc}") from exc

    async def reserve(
        self, request_id: str, charges: Sequence[Charge], lease_seconds: float, now: datetime,
        if_interrupted: IfInterrupted | None = None,
    ) -> ReserveResult:
        ids = [c.bucket.id for c in charges]
        if len(set(ids)) != len(ids):
            raise ValueError("charges must name each bucket at most once")
        now_ms = epoch_ms(now)
        lease_until = now_ms + int(lease_seconds * 1000)
        request_key_ttl = int(lease_seconds * 1000) + BUCKET_EXPIRY_MARGIN_MS
        interrupted = "" if if_interrupted is None else (
            f"{spend_nanos(if_interrupted.row.cost)}:{if_interrupted.tokens}:{if_interrupted.to_json()}"
        )
        args: list[Any] = [request_id, now_ms, lease_until, request_key_ttl, interrupted, len(charges)]
        for c in charges:
            if c.amount < 0 or c.tokens < 0:
                raise ValueError("charges must not be negative")
            args += self._bucket_args(c, now_ms)
        ok, refused, reason, flat = await self._call(self._reserve, args)
        if int(ok) == -1:
            raise DuplicateReservation(f"request id {request_id!r} was already reserved")
        states = {
            bid: _state(flat[i * _STATE_FIELDS:(i + 1) * _STATE_FIELDS]) for i, bid in enumerate(ids)
        }
        if int(ok) == 1:
            if charges:
                self._holding.add(request_id)
            return ReserveResult(True, states)
        bucket = charges[int(refused) - 1].bucket
        why: LimitKind = reason
        return ReserveResult(False, states, bucket, states[bucket.id], why)

    async def lease(
        self, lease_id: str, charges: Sequence[Charge], lease_seconds: float, now: datetime,
        give_back: bool = False,
    ) -> ReserveResult:
        ids = [c.bucket.id for c in charges]
        if len(set(ids)) != len(ids):
            raise ValueError("charges must name each bucket at most once")
        now_ms = epoch_ms(now)
        args: list[Any] = [
            lease_id, now_ms, now_ms + int(lease_seconds * 1000),
            int(lease_seconds * 1000) + BUCKET_EXPIRY_MARGIN_MS, "1" if give_back else "0", len(charges),
        ]
        for c in charges:
            if c.amount < 0 or c.tokens < 0:
                raise ValueError("charges must not be negative")
            args += self._bucket_args(c, now_ms)
        ok, refused, reason, flat = await self._call(self._lease, args)
        states = {
            bid: _state(flat[i * _STATE_FIELDS:(i + 1) * _STATE_FIELDS]) for i, bid in enumerate(ids)
        }
        if int(ok) == 1:
            return ReserveResult(True, states)
        bucket = charges[int(refused) - 1].bucket
        why: LimitKind = reason
        return ReserveResult(False, states, bucket, states[bucket.id], why)

    @staticmethod
    def _bucket_args(c: Charge, now_ms: int) -> list[Any]:
        b = c.bucket
        return [
            b.id, str(to_nanos(c.amount)), str(c.tokens), "1" if b.blocking else "0",
            _opt(to_nanos(b.limit_usd) if b.limit_usd is not None else None),
            _opt(b.limit_tokens), _opt(b.limit_requests), *_expiry(b, now_ms), _meta(b),
        ]

    async def settle(
        self, request_id: str, actual: Sequence[Charge], spend_row: SpendRow | None, now: datetime,
        *, fresh: bool = False,
    ) -> list[Settled]:
        # `fresh` saves nothing here: the script's checks ride the one round trip anyway.
        holding = request_id in self._holding
        self._holding.discard(request_id)
        if not actual and not holding:
            if spend_row is not None:
                await self.spend_log.write(request_id, spend_row)
            return []
        ids = [c.bucket.id for c in actual]
        if len(set(ids)) != len(ids):
            raise ValueError("charges must name each bucket at most once")
        now_ms = epoch_ms(now)
        row_json = "" if spend_row is None else spend_row.to_json()
        args: list[Any] = [request_id, now_ms, SETTLED_RETENTION_MS, row_json, self.spend_log.identity, len(actual)]
        nanos = []
        for c in actual:
            n = spend_nanos(c.amount)
            nanos.append(n)
            args += [c.bucket.id, str(n), str(c.tokens), *_expiry(c.bucket, now_ms), _meta(c.bucket)]
        done, after = await self._call(self._settle, args)
        if int(done) == 0:
            return []
        if spend_row is not None:
            await self.spend_log.write(request_id, spend_row)
            self._written.append(request_id)
        return [
            Settled(bid, from_nanos(int(a) - n), from_nanos(int(a)))
            for bid, a, n in zip(ids, after, nanos, strict=True)
        ]

    async def release(self, request_id: str, now: datetime) -> bool:
        self._holding.discard(request_id)
        return int(await self._call(self._release, [request_id])) > 0

    async def abandon(self, request_id: str, now: datetime) -> bool:
        self._holding.discard(request_id)
        return int(await self._call(self._abandon, [request_id, epoch_ms(now), SETTLED_RETENTION_MS])) > 0

    async def renew(self, request_ids: Sequence[str], lease_seconds: float, now: datetime) -> int:
        lease_ms = int(lease_seconds * 1000)
        renewed = 0
        ids = list(request_ids)
        for i in range(0, len(ids), EXPIRE_BATCH):
            renewed += int(await self._call(
                self._renew, [epoch_ms(now) + lease_ms, lease_ms + BUCKET_EXPIRY_MARGIN_MS, *ids[i : i + EXPIRE_BATCH]]
            ))
        return renewed

    async def expire(self, now: datetime) -> int:
        """Also: acknowledge the spend rows written since the last sweep, and write into this
        instance's spend log any row another instance settled but never acknowledged."""
        while self._written:
            batch, self._written = self._written[:EXPIRE_BATCH], self._written[EXPIRE_BATCH:]
            try:
                await self._call(self._ack, [self.spend_log.identity, *batch])
            except LedgerError:
                self._written[:0] = batch
                raise
        orphans = await self._call(
            self._claim, [self.spend_log.identity, epoch_ms(now) - self.pending_grace_ms, EXPIRE_BATCH]
        )
        for rid, text in zip(orphans[0::2], orphans[1::2], strict=True):
            await self.spend_log.write(rid, SpendRow.from_json(text))
            self.recovered += 1
        total = 0
        # Bounded: each round removes up to a batch; a full batch means there may be more.
        for _ in range(1000):
            out = await self._call(self._expire, [epoch_ms(now), EXPIRE_BATCH, SETTLED_RETENTION_MS])
            n = int(out[0])
            for rid, text in zip(out[1::2], out[2::2], strict=True):
                await self.spend_log.write(rid, IfInterrupted.from_json(text).row)
                self.interrupted += 1
            total += n
            if n < EXPIRE_BATCH:
                break
        return total

    async def _states(self, ids: Sequence[str], now: datetime) -> list[tuple[BucketState, str]]:
        if not ids:
            return []
        flat = await self._call(self._state_script, [epoch_ms(now), len(ids), *ids])
        width = _STATE_FIELDS + 1
        return [
            (_state(flat[i * width:(i + 1) * width]), flat[i * width + _STATE_FIELDS])
            for i in range(len(ids))
        ]

    async def state(self, buckets: Sequence[Bucket], now: datetime) -> dict[str, BucketState]:
        ids = [b.id for b in buckets]
        return {bid: st for bid, (st, _) in zip(ids, await self._states(ids, now), strict=True)}

    async def budget_report(self, now: datetime) -> list[dict[str, Any]]:
        now_ms = epoch_ms(now)
        try:
            # decode_responses=True: members come back as str.
            ids = cast(list[str], await self.client.zrangebyscore(f"{self.prefix}:idx", now_ms, "+inf"))
        except RedisError as exc:
            raise LedgerError(f"redis ledger: {exc}") from exc
        rows = []
        for bid, (st, meta_text) in zip(ids, await self._states(ids, now), strict=True):
            if not meta_text:
                continue
            m = json.loads(meta_text)
            if m["start_ms"] > now_ms or (m["end_ms"] is not None and m["end_ms"] <= now_ms):
                continue
            rows.append(budget_row(
                bid, m["name"], m["key"], m["user"], m["action"], m["start_ms"], m["end_ms"],
                m["limit_nanos"], m["limit_tokens"], m["limit_requests"], st, team=m.get("team"),
            ))
        rows.sort(key=lambda r: (r["name"], r["bucket"]))
        return rows

    async def spend_report(self, start: datetime, end: datetime, group_by: Sequence[GroupBy]) -> list[dict[str, Any]]:
        return await self.spend_log.spend_report(start, end, group_by)

    async def close(self) -> None:
        try:
            await self.client.aclose()
        finally:
            await self.spend_log.close()
