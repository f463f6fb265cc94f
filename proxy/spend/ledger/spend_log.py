"""The spend log: one row per settled request, in SQLite (shared with the Redis ledger, which
keeps its own local copy)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy.spend.budgets import (
    from_nanos,
    spend_nanos,
)
from proxy.spend.ledger.base import (
    GroupBy,
    SpendRow,
    check_group_by,
)
from proxy.spend.ledger.sqlite_db import (
    SPEND_LOG_SCHEMA,
    V1_SPEND_COLUMNS,
    SqliteDb,
    init_schema,
    log_time,
    transaction,
)

# ---------------------------------------------------------------------------------------
# The spend log (shared with the Redis ledger, which keeps its own local copy)


_SPEND_COLUMNS = (
    "ledger_id", *V1_SPEND_COLUMNS, "team_name", "key_metadata", "body_sha256", "finish_reason", "saved_nanos", "cache",
)
# `seq` is taken inside the write transaction, so commit order is seq order: a reader
# never sees a row without every row of a lower seq (what makes export cursors gap-free).
_INSERT_SPEND = (
    f"INSERT OR IGNORE INTO spend_log ({', '.join(_SPEND_COLUMNS)}, seq) "
    f"VALUES ({', '.join('?' for _ in _SPEND_COLUMNS)}, (SELECT COALESCE(MAX(seq), 0) + 1 FROM spend_log))"
)


def insert_spend_row(conn: sqlite3.Connection, ledger_id: str, row: SpendRow) -> bool:
    """The row of settlement `ledger_id`, unless it is there already (a retried settle)."""
    cur = conn.execute(
        _INSERT_SPEND,
        (
            ledger_id, row.request_id, log_time(row.time), row.key, row.user, row.model, row.upstream,
            row.endpoint, row.input_tokens, row.cached_input_tokens, row.output_tokens,
            row.reasoning_tokens, row.cache_write_tokens, row.input_source, row.output_source,
            spend_nanos(row.cost), row.outcome, row.status, row.team,
            json.dumps(row.key_metadata, sort_keys=True) if row.key_metadata else None,
            row.body_sha256, row.finish_reason, spend_nanos(row.saved), row.cache,
        ),
    )
    return cur.rowcount == 1


_GROUP_SQL = {
    "key": "key_name", "user": "user_name", "team": "team_name", "model": "model", "day": "substr(time, 1, 10)",
}


def query_spend(
    conn: sqlite3.Connection, start: datetime, end: datetime, group_by: Sequence[GroupBy]
) -> list[dict[str, Any]]:
    """Totals over [start, end), grouped; `day` is the UTC calendar day; `saved` (USD) only
    where response-cache hits saved something."""
    groups = check_group_by(group_by)
    cols = [f"{_GROUP_SQL[g]} AS g_{g}" for g in groups]
    sums = (
        "COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), "
        "SUM(reasoning_tokens), SUM(cost_nanos), SUM(saved_nanos)"
    )
    sql = f"SELECT {', '.join([*cols, sums])} FROM spend_log WHERE time >= ? AND time < ?"
    if groups:
        order = ", ".join(f"g_{g}" for g in groups)
        sql += f" GROUP BY {order} ORDER BY {order}"
    out = []
    for rec in conn.execute(sql, (log_time(start), log_time(end))):
        values = dict(zip(groups, rec[: len(groups)], strict=True))
        requests, inp, cached, outp, reasoning, cost, saved = rec[len(groups):]
        if not requests:
            continue  # no GROUP BY and no rows: SQL still returns one row of NULLs
        values.update(
            requests=requests,
            input_tokens=inp or 0,
            cached_input_tokens=cached or 0,
            output_tokens=outp or 0,
            reasoning_tokens=reasoning or 0,
            cost=from_nanos(cost or 0),
        )
        if saved:
            # What response-cache hits saved: only where there were some, so reports of a
            # proxy without the cache keep their shape.
            values["saved"] = from_nanos(saved)
        out.append(values)
    return out


class SpendLog:
    """Just the spend log: the local SQLite copy kept beside a Redis ledger."""

    def __init__(self, db: SqliteDb, identity: str) -> None:
        self.db = db
        self.identity = identity

    @classmethod
    async def open(cls, path: str | Path, busy_timeout_seconds: float = 30.0) -> SpendLog:
        db = SqliteDb(path, busy_timeout_seconds)
        await db.run(lambda c: init_schema(c, SPEND_LOG_SCHEMA))

        def identity(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO spend_log_identity (only, id) VALUES (1, ?)", (uuid.uuid4().hex,))
            return str(conn.execute("SELECT id FROM spend_log_identity").fetchone()[0])

        return cls(db, await db.run(lambda c: transaction(c, identity)))

    async def write(self, ledger_id: str, row: SpendRow) -> bool:
        """Insert the row unless settlement `ledger_id` wrote it already; True if inserted."""
        return await self.db.run(lambda c: transaction(c, lambda t: insert_spend_row(t, ledger_id, row)))

    async def spend_report(self, start: datetime, end: datetime, group_by: Sequence[GroupBy]) -> list[dict[str, Any]]:
        return await self.db.run(lambda c: query_spend(c, start, end, group_by))

    async def close(self) -> None:
        await self.db.close()
