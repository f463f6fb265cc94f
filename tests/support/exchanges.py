"""Exchanges built by hand, for unit tests of observers that need no proxy around them."""

from __future__ import annotations

from typing import Any

from proxy.exchange import Endpoint, Exchange


def chat_exchange(
    request_id: str, t0_ns: int, wall_start: float, fields: dict[str, Any], endpoint: Endpoint = "chat.completions"
) -> Exchange:
    """A POST /v1/chat/completions Exchange begun at `t0_ns`, with `fields` set on it."""
    ex = Exchange(
        request_id=request_id,
        endpoint=endpoint,
        method="POST",
        path="/v1/chat/completions",
        t0_ns=t0_ns,
        wall_start=wall_start,
    )
    for k, v in fields.items():
        setattr(ex, k, v)
    return ex
