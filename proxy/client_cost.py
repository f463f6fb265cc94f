"""Cost where the client sees it: the x-tollgate-cost-* response headers and the opt-in
`usage.cost` object in a JSON body and in a stream's usage event. Pure.

`usage.cost` is added by re-serialising the `usage` object alone and splicing it back in
place: every other byte of the upstream's body (or event) stays as it was.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, ClassVar

import orjson

from proxy.body import object_end
from proxy.exchange import Exchange
from proxy.pricing import CostParts, Price, cost_parts, plain_usd
from proxy.sse import SSEEvent, SSEParser
from proxy.strip import data_lines
from proxy.usage import usage_from_stream_payload

log = logging.getLogger("tollgate.forward")

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


def with_usage_cost(body: bytes, parts: CostParts | None, within: str | None = None) -> bytes | None:
    """`body` (a JSON object with a top-level `usage` object, or with one in its member
    `within`) with `usage.cost` added, or None when it has no such object or its span
    cannot be found for sure."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    holder = payload.get(within) if within is not None and isinstance(payload, dict) else payload
    if not isinstance(holder, dict) or not isinstance(holder.get("usage"), dict):
        return None
    new_usage = usage_with_cost(holder["usage"], parts)
    expected = {**holder, "usage": orjson.loads(new_usage)}
    if within is not None:
        expected = {**payload, within: expected}
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


# The endpoints whose streams end with a usage event when the client asks
# (`stream_options.include_usage`); a Responses stream always ends with one.
_USAGE_OPTION_ENDPOINTS = frozenset({"chat.completions", "completions"})
_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null')


def stream_wants_cost(ex: Exchange) -> bool:
    """The client opted into `usage.cost` and will get a usage event it asked for: not one
    Tollgate injected for itself, which the client never sees."""
    if not ex.include_cost or ex.usage_injected:
        return False
    if ex.endpoint == "responses":
        return True
    if ex.endpoint not in _USAGE_OPTION_ENDPOINTS or ex.body is None:
        return False
    options = ex.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class UsageCoster:
    """Adds `usage.cost` (and `cost_source`) to the one event of a stream that carries the
    usage: the chat/completions chunk with a `usage` object, or the `usage` of a Responses
    `response.completed` (`.incomplete`, `.failed`) event's `response`.

    The usage is read from that very event and priced there (`price` gives the request's
    price, None when unpriced), so the cost is known before the event is relayed: it is
    what `finish` charges, from the same usage at the same price. Every other event, and
    this one whenever anything about it is unexpected, is relayed byte for byte: the
    rewritten event is checked by parsing it back (same fields, the JSON expected), and any
    failure sends the original bytes. Only the data lines change; their `data:` prefix and
    line endings are the upstream's.
    """

    __slots__ = ("_endpoint", "_price", "done")
    cuts_usage_null: ClassVar[bool] = False

    def __init__(self, endpoint: str, price: Callable[[], Price | None]) -> None:
        self._endpoint = endpoint
        self._price = price
        self.done = False  # the usage event was rewritten: the rest passes untouched

    def rewrite(self, ev: SSEEvent) -> bytes:
        data = ev.data
        if self.done or data is None or b"usage" not in data:
            return ev.raw
        if data.count(b'"usage"') == 1 and _USAGE_NULL.search(data):
            return ev.raw  # a content chunk's `"usage": null`: nothing to price, no JSON to decode
        try:
            out = self._rewrite(ev, data)
        except Exception:  # noqa: BLE001 - a surprise here must never break the stream
            log.exception("adding usage.cost to a stream event failed; relayed unchanged")
            return ev.raw
        if out is None:
            return ev.raw
        self.done = True
        return out

    def _rewrite(self, ev: SSEEvent, data: bytes) -> bytes | None:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(payload, dict):
            return None
        within = "response" if self._endpoint == "responses" else None
        holder = payload.get(within) if within is not None else payload
        if not isinstance(holder, dict) or not isinstance(holder.get("usage"), dict):
            return None
        usage = usage_from_stream_payload(self._endpoint, payload)
        if usage is None:
            return None
        price = self._price()
        new_data = with_usage_cost(data, None if price is None else cost_parts(usage, price), within)
        return None if new_data is None else _with_data(ev, new_data)


def _with_data(ev: SSEEvent, new_data: bytes) -> bytes | None:
    """`ev`'s bytes with its data replaced by `new_data`, or None when that cannot be done
    for sure. The data lines must be adjacent; the new ones take the first line's prefix
    (`data: ` or `data:`) and line ending, the last keeps the original last line's."""
    raw = ev.raw
    lines = data_lines(raw)
    if not lines or b"\n".join([raw[s:e] for _, s, e, _ in lines]) != ev.data:
        return None
    if any(a[3] != b[0] for a, b in itertools.pairwise(lines)):
        return None  # a comment or another field between data lines
    first, last = lines[0], lines[-1]
    prefix = raw[first[0] : first[1]]
    eol = raw[first[2] : first[3]]
    new_lines = new_data.split(b"\n")
    if (b"\r" in new_data) or (not eol and len(new_lines) > 1):
        return None
    body = b"".join([prefix + line + eol for line in new_lines[:-1]])
    body += prefix + new_lines[-1] + raw[last[2] : last[3]]
    out = raw[: first[0]] + body + raw[last[3] :]
    # The check, rather than the argument: parsed alone, the new bytes are one event with
    # the same fields and the new data. (An LF carried over from the previous block's CRLF
    # is that block's, not this one's.)
    carried = 1 if raw[:1] == b"\n" and len(raw) > 1 else 0
    parser = SSEParser()
    events = parser.feed(out[carried:]) + parser.flush()
    if len(events) != 1:
        return None
    got = events[0]
    if (got.data, got.event, got.id, got.retry) != (new_data, ev.event, ev.id, ev.retry):
        return None
    return out
