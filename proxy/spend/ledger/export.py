"""Raw spend export for finance: every spend-log row in commit order, resumable by cursor,
as Tollgate's own columns or as the FinOps FOCUS 1.2 column set.

The cursor is the spend log's identity plus the `seq` of the last row exported. `seq` is
taken under SQLite's write lock (proxy/spend/ledger/spend_log.py), so commit order is seq
order and a reader's snapshot always holds a prefix of the sequence: resuming after the last
seq seen never skips a row committed later, nor repeats one.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from proxy.spend.money import from_nanos, iso_utc

# Rows fetched per round trip: bounds memory on exports of any size.
BATCH = 1000
_CURSOR_PREFIX = "tge1"

_COLUMNS = (
    "seq", "ledger_id", "request_id", "time", "key_name", "user_name", "team_name", "model", "upstream",
    "endpoint", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "cache_write_tokens", "input_source", "output_source", "cost_nanos", "outcome", "status", "key_metadata",
    "body_sha256", "finish_reason", "saved_nanos", "cache",
)

# What `--format jsonl|csv` writes, in order (cost as an exact decimal string).
RAW_FIELDS = (
    "ledger_id", "request_id", "time", "key", "user", "team", "model", "upstream", "endpoint",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cache_write_tokens",
    "input_source", "output_source", "cost_usd", "outcome", "status", "key_metadata",
    "body_sha256", "finish_reason", "saved_usd", "cache",
)

# The FOCUS 1.2 columns, then Tollgate's own (FOCUS's `x_` prefix for custom columns).
FOCUS_FIELDS = (
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName", "BillingAccountType",
    "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart", "CapacityReservationId",
    "CapacityReservationStatus", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency",
    "ChargePeriodEnd", "ChargePeriodStart", "CommitmentDiscountCategory", "CommitmentDiscountId",
    "CommitmentDiscountName", "CommitmentDiscountQuantity", "CommitmentDiscountStatus",
    "CommitmentDiscountType", "CommitmentDiscountUnit", "ConsumedQuantity", "ConsumedUnit", "ContractedCost",
    "ContractedUnitPrice", "EffectiveCost", "InvoiceId", "InvoiceIssuerName", "ListCost", "ListUnitPrice",
    "PricingCategory", "PricingCurrency", "PricingCurrencyContractedUnitPrice", "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice", "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName",
    "RegionId", "RegionName", "ResourceId", "ResourceName", "ResourceType", "ServiceCategory", "ServiceName",
    "ServiceSubcategory", "SkuId", "SkuMeter", "SkuPriceDetails", "SkuPriceId", "SubAccountId",
    "SubAccountName", "SubAccountType", "Tags",
    "x_LedgerId", "x_RequestId", "x_Outcome", "x_InputTokens", "x_CachedInputTokens", "x_OutputTokens",
    "x_ReasoningTokens", "x_CacheWriteTokens",
)


class CursorError(ValueError):
    """A --since-cursor value that is not this spend log's."""


@dataclass(frozen=True, slots=True)
class ExportRow:
    seq: int
    raw: dict[str, Any]  # RAW_FIELDS; cost as Decimal, time as an aware datetime


def encode_cursor(identity: str, seq: int) -> str:
    text = f"{_CURSOR_PREFIX}:{identity}:{seq}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, identity: str) -> int:
    """The seq a cursor resumes after; CursorError if it is malformed or another log's."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, ident, seq_text = text.split(":")
        seq = int(seq_text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CursorError(f"{cursor!r} is not a cursor printed by tollgate export") from None
    if prefix != _CURSOR_PREFIX or seq < 0:
        raise CursorError(f"{cursor!r} is not a cursor printed by tollgate export")
    if ident != identity:
        # Another ledger file (or one recreated since): its seqs mean nothing here.
        raise CursorError("that cursor belongs to another spend log (a different or recreated ledger file)")
    return seq


def spend_log_identity(conn: sqlite3.Connection) -> str:
    """This file's identity, made if it has none yet (an embedded ledger's file)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT OR IGNORE INTO spend_log_identity (only, id) VALUES (1, ?)", (uuid.uuid4().hex,))
        ident = str(conn.execute("SELECT id FROM spend_log_identity").fetchone()[0])
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return ident


def rows_after(conn: sqlite3.Connection, after_seq: int) -> Iterator[ExportRow]:
    """Every row with seq > after_seq, in seq order, fetched in batches."""
    sql = f"SELECT {', '.join(_COLUMNS)} FROM spend_log WHERE seq > ? ORDER BY seq LIMIT {BATCH}"
    last = after_seq
    while True:
        batch = conn.execute(sql, (last,)).fetchall()
        for rec in batch:
            yield _row(rec)
        if len(batch) < BATCH:
            return
        last = batch[-1][0]


def _row(rec: tuple[Any, ...]) -> ExportRow:
    d = dict(zip(_COLUMNS, rec, strict=True))
    return ExportRow(d["seq"], {
        "ledger_id": d["ledger_id"],
        "request_id": d["request_id"],
        "time": datetime.fromisoformat(d["time"].replace("Z", "+00:00")),
        "key": d["key_name"],
        "user": d["user_name"],
        "team": d["team_name"],
        "model": d["model"],
        "upstream": d["upstream"],
        "endpoint": d["endpoint"],
        "input_tokens": d["input_tokens"],
        "cached_input_tokens": d["cached_input_tokens"],
        "output_tokens": d["output_tokens"],
        "reasoning_tokens": d["reasoning_tokens"],
        "cache_write_tokens": d["cache_write_tokens"],
        "input_source": d["input_source"],
        "output_source": d["output_source"],
        "cost_usd": from_nanos(d["cost_nanos"]),
        "outcome": d["outcome"],
        "status": d["status"],
        "key_metadata": json.loads(d["key_metadata"]) if d["key_metadata"] else None,
        "body_sha256": d["body_sha256"],
        "finish_reason": d["finish_reason"],
        "saved_usd": from_nanos(d["saved_nanos"] or 0),
        "cache": d["cache"],
    })


def raw_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON shows it: time in ISO UTC with microseconds, cost as exact digits."""
    out = dict(raw)
    out["time"] = raw["time"].astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    out["cost_usd"] = f"{raw['cost_usd']:f}"
    out["saved_usd"] = f"{raw['saved_usd']:f}"
    return out


def _month(moment: datetime) -> tuple[datetime, datetime]:
    first = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
    return first, nxt


def focus_record(raw: dict[str, Any], identity: str) -> dict[str, Any]:
    """One spend row as a FOCUS 1.2 charge row. Unset columns are None (empty in CSV): see
    the README's export section for why each is empty."""
    cost: Decimal = raw["cost_usd"]
    money = f"{cost:f}"
    when: datetime = raw["time"].astimezone(UTC)
    hour = when.replace(minute=0, second=0, microsecond=0)
    month_start, month_end = _month(when)
    tokens = raw["input_tokens"] + raw["output_tokens"]
    model = raw["model"]
    upstream = raw["upstream"]
    tags: dict[str, str] = dict(raw["key_metadata"] or {})
    for name in ("key", "user", "team", "endpoint"):
        if raw[name] is not None:
            tags[f"tollgate/{name}"] = str(raw[name])
    rec: dict[str, Any] = dict.fromkeys(FOCUS_FIELDS)
    rec.update({
        "BilledCost": money,
        "EffectiveCost": money,
        "ListCost": money,
        "ContractedCost": money,
        "PricingCurrencyEffectiveCost": money,
        "BillingAccountId": identity,
        "BillingAccountName": "Tollgate spend log",
        "BillingAccountType": "Tollgate spend log",
        "BillingCurrency": "USD",
        "PricingCurrency": "USD",
        "BillingPeriodStart": iso_utc(month_start),
        "BillingPeriodEnd": iso_utc(month_end),
        "ChargePeriodStart": iso_utc(hour),
        "ChargePeriodEnd": iso_utc(hour + timedelta(hours=1)),
        "ChargeCategory": "Usage",
        "ChargeFrequency": "Usage-Based",
        "ChargeDescription": (
            f"{model or 'unknown model'} via {upstream or 'unknown upstream'}: {raw['input_tokens']} input "
            f"({raw['cached_input_tokens']} cached), {raw['output_tokens']} output tokens"
        ),
        "ConsumedQuantity": str(tokens),
        "ConsumedUnit": "Tokens",
        "PricingCategory": "Standard",
        "ProviderName": upstream,
        "PublisherName": upstream,
        "ResourceId": f"{upstream}/{model}" if upstream and model else model,
        "ResourceName": model,
        "ResourceType": "Model",
        "ServiceCategory": "AI and Machine Learning",
        "ServiceSubcategory": "Generative AI",
        "ServiceName": raw["endpoint"],
        "SkuId": model,
        "SkuPriceId": model,
        "SkuMeter": "Tokens",
        "SubAccountId": raw["key"],
        "SubAccountName": raw["key"],
        "SubAccountType": "Virtual key" if raw["key"] is not None else None,
        "Tags": tags,
        "x_LedgerId": raw["ledger_id"],
        "x_RequestId": raw["request_id"],
        "x_Outcome": raw["outcome"],
        "x_InputTokens": raw["input_tokens"],
        "x_CachedInputTokens": raw["cached_input_tokens"],
        "x_OutputTokens": raw["output_tokens"],
        "x_ReasoningTokens": raw["reasoning_tokens"],
        "x_CacheWriteTokens": raw["cache_write_tokens"],
    })
    return rec


__all__ = [
    "BATCH", "FOCUS_FIELDS", "RAW_FIELDS", "CursorError", "ExportRow", "decode_cursor", "encode_cursor",
    "focus_record", "raw_record", "rows_after", "spend_log_identity",
]
