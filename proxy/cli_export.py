"""`tollgate export`: every spend-log row for finance, incrementally.

It reads the SQLite spend log the proxy writes (with either ledger backend the spend log is
the local file at `ledger.path`), beside a running proxy: one SELECT per batch under WAL.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
from pathlib import Path
from typing import IO, Any

from proxy.cli_ledger import DEFAULT_CONFIG, no_ledger, report_settings
from proxy.spend.ledger.base import LedgerError
from proxy.spend.ledger.export import (
    FOCUS_FIELDS,
    RAW_FIELDS,
    CursorError,
    decode_cursor,
    encode_cursor,
    focus_record,
    raw_record,
    rows_after,
    spend_log_identity,
)
from proxy.spend.ledger.sqlite_db import SCHEMA_VERSION, SPEND_LOG_SCHEMA, init_schema


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    export = sub.add_parser(
        "export", help="every spend-log row as JSONL or CSV (raw or FOCUS 1.2), resumable with --since-cursor"
    )
    export.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="YAML config file")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default jsonl)")
    export.add_argument("--focus", action="store_true", help="the FinOps FOCUS 1.2 columns instead of Tollgate's own")
    export.add_argument(
        "--since-cursor", metavar="C",
        help="only rows written after the export that printed this cursor (it prints the next one on stderr)",
    )
    export.set_defaults(func=cmd_export)


def open_spend_log(path: Path) -> sqlite3.Connection:
    """A connection to the spend log, migrated to this version's schema if it is older (an
    older file has no `seq` to resume from until it is numbered)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version < SCHEMA_VERSION:
        init_schema(conn, SPEND_LOG_SCHEMA)
    return conn


def cmd_export(args: argparse.Namespace) -> int:
    settings = report_settings(args.config)
    if settings is None:
        return 2
    if no_ledger(settings):
        return 1
    try:
        conn = open_spend_log(Path(settings.ledger.path))
    except (sqlite3.Error, LedgerError) as exc:
        print(f"cannot read the spend log at {settings.ledger.path}: {exc}", file=sys.stderr)
        return 1
    try:
        identity = spend_log_identity(conn)
        try:
            after = decode_cursor(args.since_cursor, identity) if args.since_cursor is not None else 0
        except CursorError as exc:
            print(f"--since-cursor: {exc}", file=sys.stderr)
            return 2
        last = write_export(conn, identity, after, args.format, args.focus, sys.stdout)
    except sqlite3.Error as exc:
        print(f"cannot read the spend log at {settings.ledger.path}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    sys.stdout.flush()
    # On stderr, so stdout is exactly the rows (pipe it into a file or a loader as is).
    print(f"cursor: {encode_cursor(identity, last)}", file=sys.stderr)
    return 0


def write_export(
    conn: sqlite3.Connection, identity: str, after: int, fmt: str, focus: bool, out: IO[str]
) -> int:
    """Write the rows after seq `after`; the seq of the last row written (or `after`)."""
    fields = FOCUS_FIELDS if focus else RAW_FIELDS
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(fields)
    last = after
    # One read transaction: the batches are one snapshot, so `last` is a prefix's end.
    conn.execute("BEGIN")
    try:
        for row in rows_after(conn, after):
            rec = focus_record(row.raw, identity) if focus else raw_record(row.raw)
            if writer is not None:
                writer.writerow([_cell(rec[f]) for f in fields])
            else:
                out.write(json.dumps({f: rec[f] for f in fields}, separators=(",", ":")) + "\n")
            last = row.seq
    finally:
        conn.execute("COMMIT")
    return last


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


__all__ = ["add_commands", "cmd_export", "open_spend_log", "write_export"]
