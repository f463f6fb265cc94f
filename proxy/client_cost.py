"""Cost where the client sees it: the x-tollgate-cost-* response headers and the opt-in
`usage.cost` object in a JSON body. Pure.

`usage.cost` is added by re-serialising the `usage` object alone and splicing it back in
place: every other byte of the upstream's body stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

from proxy.body import object_end
from proxy.exchange import Exchange
from proxy.pricing import CostParts, plain_usd

COST_SOURCE_PRICED = "price_table"
COST_SOURCE_NONE = "none"


def cost_headers(ex: Exchange) -> dict[str, str]:
    """The headers of a measured non-stream response. Unpriced (no price for the model, or
    no usage at all): only `x-tollgate-cost-source: none`, never a cost of 0."""
    out = {"X-Tollgate-Overhead-Ms": f"{ex.overhead_ns / 1e6:.3f}"}
    parts = ex.cost_parts
    if parts is None:
        out["X-Tollgate-Cost-Source"] = COST_SOURCE_NONE
        return out
    out["X-Tollgate-Cost-Source"] = COST_SOURCE_PRICED
    out["X-Tollgate-Cost-Usd"] = plain_usd(parts.total)
    out["X-Tollgate-Cost-Input-Usd"] = plain_usd(parts.input)
    out["X-Tollgate-Cost-Cached-Input-Usd"] = plain_usd(parts.cached_input)
    out["X-Tollgate-Cost-Output-Usd"] = plain_usd(parts.output)
    return out


def _number(amount: Decimal) -> bytes:
    # A JSON number with the exact decimal digits (orjson would need a float, and round it).
    return plain_usd(amount).encode()


def usage_with_cost(usage: Mapping[str, Any], parts: CostParts | None) -> bytes:
    """The `usage` object, serialised, with `cost` (priced: total and parts in USD) and
    `cost_source` added; unpriced gets `cost_source: "none"` and no `cost`."""
    rest = {k: v for k, v in usage.items() if k not in ("cost", "cost_source")}
    head = orjson.dumps(rest)[:-1]  # without its closing brace
    sep = b"," if rest else b""
    if parts is None:
        return head + sep + b'"cost_source":"none"}'
    cost = (
        b'{"total_usd":' + _number(parts.total)
        + b',"input_usd":' + _number(parts.input)
        + b',"cached_input_usd":' + _number(parts.cached_input)
        + b',"output_usd":' + _number(parts.output)
        + b"}"
    )
    return head + sep + b'"cost":' + cost + b',"cost_source":"' + COST_SOURCE_PRICED.encode() + b'"}'


def with_usage_cost(body: bytes, parts: CostParts | None) -> bytes | None:
    """`body` (a JSON object with a top-level `usage` object) with `usage.cost` added, or
    None when it has no such object or its span cannot be found for sure."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return None
    usage = payload["usage"]
    new_usage = usage_with_cost(usage, parts)
    expected = {**payload, "usage": orjson.loads(new_usage)}
    # The top-level `usage` is usually last; a `"usage"` inside a string or a nested
    # object would splice the wrong span, so each candidate is checked by parsing the result.
    at = len(body)
    for _ in range(8):
        at = body.rfind(b'"usage"', 0, at)
        if at < 0:
            return None
        start = body.find(b"{", at)
        end = object_end(body, start) if start >= 0 else -1
        if end > 0 and body[at + 7 : start].strip() == b":":
            candidate = body[:start] + new_usage + body[end:]
            try:
                if orjson.loads(candidate) == expected:
                    return candidate
            except orjson.JSONDecodeError:
                pass
    return None
