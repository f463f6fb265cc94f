"""The embedded ledger: one SQLite file in WAL mode, safe for several processes on a host.

Every reserve, settle, release and expire is one `BEGIN IMMEDIATE` transaction: it takes
the database's write lock before reading, so check-then-record cannot interleave with
another task, thread or worker process (they wait on `busy_timeout`). WAL lets readers
(reports) run while a writer holds the lock, and `synchronous=NORMAL` makes a commit
durable against a killed process (only an OS crash or power loss can drop the last
commits), at a fraction of the cost of an fsync per request.

sqlite3 calls block (on the disk, and on the lock when another process holds it), so each
ledger owns one connection on one dedicated thread and the event loop can await it. The short
write transactions of the request path (reserve, settle, release) first try a second
connection on the event loop itself with a zero busy timeout: when the write lock is free,
which is nearly always, a transaction is a few dozen microseconds of page-cache writes, far
less than handing it to a thread and back. When the lock is taken (another worker process,
or this process's thread), SQLite says SQLITE_BUSY at once and the transaction goes to the
thread, which waits on `busy_timeout` without blocking the loop. The loop connection never
checkpoints (that fsyncs): the thread checkpoints the WAL every few hundred loop commits.

Money is integer nano-USD (see proxy.spend.budgets.to_nanos); times are integer epoch
milliseconds (leases, windows) or ISO-8601 UTC text (the spend log, for people and CSV).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.spend.budgets import (
    Bucket,
    BucketState,
    Charge,
    LimitKind,
    exceeds,
    from_nanos,
    spend_nanos,
    to_nanos,
)
from proxy.spend.ledger.base import (
    DuplicateReservation,
    GroupBy,
    IfInterrupted,
    ReserveResult,
    Settled,
    SpendRow,
)
from proxy.spend.ledger.spend_log import insert_spend_row, query_spend
from proxy.spend.ledger.sqlite_db import (
    LEDGER_SCHEMA,
    RENEW_BATCH,
    SETTLED_RETENTION_MS,
    SPEND_LOG_SCHEMA,
    SqliteDb,
    epoch_ms,
    from_ms,
    init_schema,
    transaction,
)

# ---------------------------------------------------------------------------------------
# The ledger


def _check_charges(charges: Sequence[Charge]) -> None:
    ids = [c.bucket.id for c in charges]
    if len(set(ids)) != len(ids):
        raise ValueError("charges must name each bucket at most once")
    for c in charges:
        if c.amount < 0 or c.tokens < 0:
            raise ValueError("charges must not be negative")


def _upsert_bucket(conn: sqlite3.Connection, b: Bucket) -> None:
    # Limits follow the current config; counters are never touched here.
    conn.execute(
        "INSERT INTO buckets (id, name, key_name, user_name, action, start_ms, end_ms, "
        "limit_nanos, limit_tokens, limit_requests, team_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET action = excluded.action, limit_nanos = excluded.limit_nanos, "
        "limit_tokens = excluded.limit_tokens, limit_requests = excluded.limit_requests",
        (
            b.id, b.name, b.key, b.user, b.rule.action, epoch_ms(b.start),
            epoch_ms(b.end) if b.end is not None else None,
            to_nanos(b.limit_usd) if b.limit_usd is not None else None,
            b.limit_tokens, b.limit_requests, b.team,
        ),
    )


_BucketConfig = tuple[str, "int | None", "int | None", "int | None"]


def _config_of(b: Bucket) -> _BucketConfig:
    """What `_upsert_bucket` writes over an existing row."""
    rule = b.rule
    limit = rule.limit_usd
    return (rule.action, _limit_nanos(limit) if limit is not None else None, rule.limit_tokens, rule.limit_requests)


@functools.lru_cache(maxsize=256)
def _limit_nanos(limit: Decimal) -> int:
    # Every reserve and settle compares or writes the limits; configs hold a few of them.
    return to_nanos(limit)


def _bucket_state(conn: sqlite3.Connection, bucket_id: str, now_ms: int) -> BucketState:
    return _bucket_state_and_config(conn, bucket_id, now_ms)[0]


def _bucket_state_and_config(
    conn: sqlite3.Connection, bucket_id: str, now_ms: int
) -> tuple[BucketState, _BucketConfig | None]:
    """The bucket's state, and its stored limits (None: no row yet)."""
    # One statement (the aggregate always gives one row; the bucket's may be missing).
    row = conn.execute(_STATE_SQL, (bucket_id, now_ms, bucket_id)).fetchone()
    if row[3] is None:  # action is NOT NULL: no bucket row yet
        spent, tokens, requests, config = 0, 0, 0, None
    else:
        spent, tokens, requests = row[0], row[1], row[2]
        config = (row[3], row[4], row[5], row[6])
    state = BucketState(
        spent=from_nanos(spent), reserved=from_nanos(row[7]), tokens=tokens,
        requests=requests, reserved_tokens=row[8], reserved_requests=row[9],
    )
    return state, config


_STATE_SQL = (
    "SELECT b.spent_nanos, b.tokens, b.requests, b.action, b.limit_nanos, b.limit_tokens, "
    "b.limit_requests, r.amount, r.tokens, r.n FROM "
    "(SELECT COALESCE(SUM(amount_nanos), 0) AS amount, COALESCE(SUM(tokens), 0) AS tokens, "
    "COUNT(*) AS n FROM reservations WHERE bucket_id = ? AND lease_until_ms > ?) AS r "
    "LEFT JOIN buckets AS b ON b.id = ?"
)


def _plus(st: BucketState, amount: Decimal, tokens: int) -> BucketState:
    return BucketState(
        spent=st.spent, reserved=st.reserved + amount, tokens=st.tokens, requests=st.requests,
        reserved_tokens=st.reserved_tokens + tokens, reserved_requests=st.reserved_requests + 1,
    )


def _minus(st: BucketState, amount: Decimal, tokens: int) -> BucketState:
    return BucketState(
        spent=st.spent, reserved=st.reserved - amount, tokens=st.tokens, requests=st.requests,
        reserved_tokens=st.reserved_tokens - tokens, reserved_requests=st.reserved_requests - 1,
    )


def _settle_interrupted(
    conn: sqlite3.Connection, request_id: str, bucket_ids: Sequence[str], what: IfInterrupted, now_ms: int
) -> None:
    """Charge a dead process's reservation its estimated input, and log it as interrupted."""
    cur = conn.execute("INSERT OR IGNORE INTO settled (request_id, at_ms) VALUES (?, ?)", (request_id, now_ms))
    if cur.rowcount == 0:
        return
    nanos = spend_nanos(what.row.cost)
    conn.executemany(
        "UPDATE buckets SET spent_nanos = spent_nanos + ?, tokens = tokens + ?, requests = requests + 1 WHERE id = ?",
        [(nanos, what.tokens, bid) for bid in bucket_ids],
    )
    insert_spend_row(conn, request_id, what.row)


class SqliteLedger:
    """Budget counters, reservations and the spend log in one SQLite file."""

    def __init__(self, db: SqliteDb) -> None:
        self.db = db
        self.interrupted = 0

    @classmethod
    async def open(cls, path: str | Path, busy_timeout_seconds: float = 30.0) -> SqliteLedger:
        db = SqliteDb(path, busy_timeout_seconds)
        await db.run(lambda c: init_schema(c, SPEND_LOG_SCHEMA + LEDGER_SCHEMA))
        return cls(db)

    # -- reserve ---------------------------------------------------------------------

    async def reserve(
        self, request_id: str, charges: Sequence[Charge], lease_seconds: float, now: datetime,
        if_interrupted: IfInterrupted | None = None,
    ) -> ReserveResult:
        _check_charges(charges)
        interrupted_json = if_interrupted.to_json() if if_interrupted is not None else None
        now_ms = epoch_ms(now)
        lease_until = now_ms + int(lease_seconds * 1000)
        # Amounts as the ledger stores them, so checks and records agree to the nano.
        quantized = [(c, to_nanos(c.amount)) for c in charges]

        def body(conn: sqlite3.Connection) -> ReserveResult:
            dup = conn.execute(
                "SELECT 1 FROM reservations WHERE request_id = ? UNION ALL "
                "SELECT 1 FROM settled WHERE request_id = ? UNION ALL "
                "SELECT 1 FROM spend_log WHERE ledger_id = ? LIMIT 1",
                (request_id, request_id, request_id),
            ).fetchone()
            if dup is not None:
                raise DuplicateReservation(f"request id {request_id!r} was already reserved")
            states: dict[str, BucketState] = {}
            stored: dict[str, _BucketConfig | None] = {}
            refused: tuple[Bucket, BucketState, LimitKind] | None = None
            for c, nanos in quantized:
                st, stored[c.bucket.id] = _bucket_state_and_config(conn, c.bucket.id, now_ms)
                states[c.bucket.id] = st
                if refused is None and c.bucket.blocking:
                    reason = exceeds(c.bucket, st, from_nanos(nanos), c.tokens)
                    if reason is not None:
                        refused = (c.bucket, st, reason)
            if refused is not None:
                return ReserveResult(False, states, refused[0], refused[1], refused[2])
            for c, nanos in quantized:
                if stored[c.bucket.id] != _config_of(c.bucket):
                    _upsert_bucket(conn, c.bucket)  # new bucket, or the config changed
                conn.execute(
                    "INSERT INTO reservations (request_id, bucket_id, amount_nanos, tokens, "
                    "lease_until_ms) VALUES (?, ?, ?, ?, ?)",
                    (request_id, c.bucket.id, nanos, c.tokens, lease_until),
                )
                states[c.bucket.id] = _plus(states[c.bucket.id], from_nanos(nanos), c.tokens)
            if interrupted_json is not None and quantized:
                conn.execute(
                    "INSERT INTO if_interrupted (request_id, json) VALUES (?, ?)", (request_id, interrupted_json)
                )
            return ReserveResult(True, states)

        return await self.db.transact(body)

    async def lease(
        self, lease_id: str, charges: Sequence[Charge], lease_seconds: float, now: datetime,
        give_back: bool = False,
    ) -> ReserveResult:
        _check_charges(charges)
        now_ms = epoch_ms(now)
        lease_until = now_ms + int(lease_seconds * 1000)
        quantized = [(c, to_nanos(c.amount)) for c in charges]

        def body(conn: sqlite3.Connection) -> ReserveResult:
            states: dict[str, BucketState] = {}
            stored: dict[str, _BucketConfig | None] = {}
            refused: tuple[Bucket, BucketState, LimitKind] | None = None
            for c, nanos in quantized:
                st, stored[c.bucket.id] = _bucket_state_and_config(conn, c.bucket.id, now_ms)
                own = conn.execute(
                    "SELECT amount_nanos, tokens FROM reservations WHERE request_id = ? AND bucket_id = ? "
                    "AND lease_until_ms > ?",
                    (lease_id, c.bucket.id, now_ms),
                ).fetchone()
                if own is not None:
                    st = _minus(st, from_nanos(own[0]), own[1])
                states[c.bucket.id] = st
                # A give-back is unchecked only while it does not grow the lease.
                shrinks = (nanos == 0 and c.tokens == 0) or (own is not None and nanos <= own[0] and c.tokens <= own[1])
                if refused is None and c.bucket.blocking and not (give_back and shrinks):
                    reason = exceeds(c.bucket, st, from_nanos(nanos), c.tokens)
                    if reason is not None:
                        refused = (c.bucket, st, reason)
            if refused is not None:
                return ReserveResult(False, states, refused[0], refused[1], refused[2])
            conn.execute("DELETE FROM reservations WHERE request_id = ?", (lease_id,))
            for c, nanos in quantized:
                if stored[c.bucket.id] != _config_of(c.bucket):
                    _upsert_bucket(conn, c.bucket)
                if nanos or c.tokens:
                    conn.execute(
                        "INSERT INTO reservations (request_id, bucket_id, amount_nanos, tokens, "
                        "lease_until_ms) VALUES (?, ?, ?, ?, ?)",
                        (lease_id, c.bucket.id, nanos, c.tokens, lease_until),
                    )
            return ReserveResult(True, states)

        return await self.db.transact(body)

    # -- settle / release / expire ---------------------------------------------------

    async def settle(
        self, request_id: str, actual: Sequence[Charge], spend_row: SpendRow | None, now: datetime,
        *, fresh: bool = False,
    ) -> list[Settled]:
        _check_charges(actual)
        now_ms = epoch_ms(now)
        # Most settlements (leased, or under no budget) are fresh with a row: two statements
        # (the row, a bucket's spend) where the general case takes five.
        fresh = fresh and spend_row is not None

        def body(conn: sqlite3.Connection) -> list[Settled]:
            # Exactly once. A settlement with a spend row needs no marker of its own: the row,
            # keyed by the same id, says it was settled (a `settled` row and its index entry
            # fewer to write per request). Without a row, or ended another way (expired as
            # interrupted, abandoned), the marker is a row of `settled`: an id that was
            # never reserved can have no such row, so for it the insert is the whole check.
            if fresh:
                assert spend_row is not None
                if not insert_spend_row(conn, request_id, spend_row):
                    return []
            elif conn.execute(
                "SELECT 1 FROM settled WHERE request_id = ? UNION ALL "
                "SELECT 1 FROM spend_log WHERE ledger_id = ? LIMIT 1",
                (request_id, request_id),
            ).fetchone():
                return []
            elif spend_row is not None:
                insert_spend_row(conn, request_id, spend_row)
            else:
                conn.execute("INSERT INTO settled (request_id, at_ms) VALUES (?, ?)", (request_id, now_ms))
            out = []
            for c in actual:
                nanos = spend_nanos(c.amount)
                # The limits follow the config, as _upsert_bucket would set them; the row
                # exists unless the reservation was lost (lease expired, ledger replaced).
                counted = conn.execute(
                    "UPDATE buckets SET spent_nanos = spent_nanos + ?, tokens = tokens + ?, "
                    "requests = requests + 1, action = ?, limit_nanos = ?, limit_tokens = ?, "
                    "limit_requests = ? WHERE id = ? RETURNING spent_nanos - ?, spent_nanos",
                    (nanos, c.tokens, *_config_of(c.bucket), c.bucket.id, nanos),
                ).fetchone()
                if counted is None:
                    _upsert_bucket(conn, c.bucket)
                    counted = conn.execute(
                        "UPDATE buckets SET spent_nanos = spent_nanos + ?, tokens = tokens + ?, "
                        "requests = requests + 1 WHERE id = ? RETURNING spent_nanos - ?, spent_nanos",
                        (nanos, c.tokens, c.bucket.id, nanos),
                    ).fetchone()
                before, after = counted
                out.append(Settled(c.bucket.id, from_nanos(before), from_nanos(after)))
            if not fresh:
                conn.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))
                conn.execute("DELETE FROM if_interrupted WHERE request_id = ?", (request_id,))
            return out

        return await self.db.transact(body)

    async def release(self, request_id: str, now: datetime) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM if_interrupted WHERE request_id = ?", (request_id,))
            cur = conn.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))
            return cur.rowcount > 0

        return await self.db.transact(body)

    async def abandon(self, request_id: str, now: datetime) -> bool:
        now_ms = epoch_ms(now)

        def body(conn: sqlite3.Connection) -> bool:
            # The settled marker makes a later reserve of this id a duplicate, refused.
            conn.execute("INSERT OR IGNORE INTO settled (request_id, at_ms) VALUES (?, ?)", (request_id, now_ms))
            conn.execute("DELETE FROM if_interrupted WHERE request_id = ?", (request_id,))
            return conn.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,)).rowcount > 0

        return await self.db.run(lambda conn: transaction(conn, body))

    async def renew(self, request_ids: Sequence[str], lease_seconds: float, now: datetime) -> int:
        ids = list(request_ids)
        if not ids:
            return 0
        lease_until = epoch_ms(now) + int(lease_seconds * 1000)

        def body(conn: sqlite3.Connection) -> int:
            renewed: set[str] = set()
            for i in range(0, len(ids), RENEW_BATCH):
                batch = ids[i : i + RENEW_BATCH]
                marks = ", ".join("?" for _ in batch)
                rows = conn.execute(
                    f"UPDATE reservations SET lease_until_ms = ? WHERE request_id IN ({marks}) RETURNING request_id",
                    (lease_until, *batch),
                ).fetchall()
                renewed.update(r[0] for r in rows)
            return len(renewed)

        return await self.db.run(lambda conn: transaction(conn, body))

    async def expire(self, now: datetime) -> int:
        """Drop reservations whose lease ended; returns how many requests they belonged to.

        Also forgets settled markers older than a week (the idempotency window)."""
        now_ms = epoch_ms(now)

        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            dead = conn.execute(
                "SELECT r.request_id, r.bucket_id, i.json FROM reservations AS r "
                "LEFT JOIN if_interrupted AS i ON i.request_id = r.request_id WHERE r.lease_until_ms <= ?",
                (now_ms,),
            ).fetchall()
            by_request: dict[str, tuple[list[str], str | None]] = {}
            for rid, bid, text in dead:
                by_request.setdefault(rid, ([], text))[0].append(bid)
            interrupted = 0
            for rid, (bids, text) in by_request.items():
                if text is not None:
                    _settle_interrupted(conn, rid, bids, IfInterrupted.from_json(text), now_ms)
                    interrupted += 1
            conn.execute("DELETE FROM reservations WHERE lease_until_ms <= ?", (now_ms,))
            conn.executemany("DELETE FROM if_interrupted WHERE request_id = ?", [(rid,) for rid in by_request])
            conn.execute("DELETE FROM settled WHERE at_ms < ?", (now_ms - SETTLED_RETENTION_MS,))
            return len(by_request), interrupted

        count, interrupted = await self.db.run(lambda conn: transaction(conn, body))
        self.interrupted += interrupted
        return count

    # -- reading ---------------------------------------------------------------------

    async def state(self, buckets: Sequence[Bucket], now: datetime) -> dict[str, BucketState]:
        now_ms = epoch_ms(now)
        ids = [b.id for b in buckets]
        return await self.db.run(lambda conn: {i: _bucket_state(conn, i, now_ms) for i in ids})

    async def spend_report(self, start: datetime, end: datetime, group_by: Sequence[GroupBy]) -> list[dict[str, Any]]:
        return await self.db.run(lambda c: query_spend(c, start, end, group_by))

    async def budget_report(self, now: datetime) -> list[dict[str, Any]]:
        """Every bucket whose window contains `now` and that has seen a request."""
        now_ms = epoch_ms(now)

        def body(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(OPEN_BUCKETS_SQL, (now_ms, now_ms, now_ms)).fetchall()
            # The live reservations in one pass over the table of requests in flight,
            # instead of one look-up per bucket.
            live = {
                bid: (amount, tokens, n)
                for bid, amount, tokens, n in conn.execute(
                    "SELECT bucket_id, SUM(amount_nanos), SUM(tokens), COUNT(*) FROM reservations "
                    "WHERE lease_until_ms > ? GROUP BY bucket_id",
                    (now_ms,),
                )
            }
            out = []
            for r in rows:
                amount, rtokens, n = live.get(r[0], (0, 0, 0))
                state = BucketState(
                    spent=from_nanos(r[10]), reserved=from_nanos(amount), tokens=r[11],
                    requests=r[12], reserved_tokens=rtokens, reserved_requests=n,
                )
                out.append(budget_row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], state, team=r[13]))
            return out

        return await self.db.run(body)

    async def close(self) -> None:
        await self.db.close()


_BUCKET_COLUMNS = (
    "SELECT id, name, key_name, user_name, action, start_ms, end_ms, limit_nanos, "
    "limit_tokens, limit_requests, spent_nanos, tokens, requests, team_name FROM buckets "
)
# The buckets of windows open at ?, and total budgets, ordered by name: two ranges of the
# buckets_end index. Rows of finished windows are never read, however many users they had.
OPEN_BUCKETS_SQL = (
    f"{_BUCKET_COLUMNS} WHERE end_ms > ? AND start_ms <= ? "
    f"UNION ALL {_BUCKET_COLUMNS} WHERE end_ms IS NULL AND start_ms <= ? ORDER BY 2, 1"
)


def budget_row(
    bucket_id: str, name: str, key: str | None, user: str | None, action: str,
    start_ms: int, end_ms: int | None, limit_nanos: int | None, limit_tokens: int | None,
    limit_requests: int | None, st: BucketState, team: str | None = None,
) -> dict[str, Any]:
    """One line of `tollgate budgets` / `GET /v1/tollgate/budgets` (both backends)."""
    limit = from_nanos(limit_nanos) if limit_nanos is not None else None
    return {
        "bucket": bucket_id,
        "name": name,
        "key": key,
        "user": user,
        "team": team,
        "action": action,
        "window_start": from_ms(start_ms),
        "window_end": from_ms(end_ms) if end_ms is not None else None,
        "limit_usd": limit,
        "limit_tokens": limit_tokens,
        "limit_requests": limit_requests,
        "spent": st.spent,
        "reserved": st.reserved,
        "remaining": max(Decimal(0), limit - st.used) if limit is not None else None,
        "tokens": st.tokens,
        "reserved_tokens": st.reserved_tokens,
        "requests": st.requests,
        "reserved_requests": st.reserved_requests,
    }
