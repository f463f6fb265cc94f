"""The per-request record, and the observers that watch it.

An `Exchange` is created when a request has been fully received (t0) and is finished exactly
once, on every path: success, upstream error, client gone, refused. All timestamps are
`time.perf_counter_ns()` values; wall-clock time is kept only for log lines and the ledger.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol

from proxy.usage import Usage

log = logging.getLogger("tollgate.exchange")

# The endpoints the proxy understands; everything else under /v1 is "other" and passes through.
Endpoint = Literal["chat.completions", "completions", "embeddings", "responses", "models", "other"]

# The relayed output text kept per request. The local output estimate (used only when the
# upstream reports no usage) counts at most this many characters exactly and scales that
# count to the whole; payload logging shows at most this many. Keeping more would only cost
# memory: a 100 MB stream would otherwise be held whole until the request ends.
KEPT_OUTPUT_CHARS = 1 << 16


class OutputText:
    """The output a response carried: its first KEPT_OUTPUT_CHARS characters, and how many
    characters there were in all. Bounded, whatever the size of the response."""

    __slots__ = ("_parts", "kept", "chars")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.kept = 0
        self.chars = 0

    def append(self, text: str) -> None:
        self.chars += len(text)
        room = KEPT_OUTPUT_CHARS - self.kept
        if room > 0:
            piece = text if len(text) <= room else text[:room]
            self._parts.append(piece)
            self.kept += len(piece)

    def __bool__(self) -> bool:
        return self.chars > 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutputText) and (self.chars, self.text()) == (other.chars, other.text())

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"OutputText(chars={self.chars}, kept={self.text()[:40]!r})"

    @property
    def complete(self) -> bool:
        """Whether `text()` is all of it."""
        return self.kept == self.chars

    def text(self) -> str:
        """The kept text: all of it while `complete`, else its beginning."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def estimate_tokens(self, count: Callable[[str], int]) -> int:
        """Tokens in the whole text: `count` of the kept text, scaled to all characters when
        only the beginning was kept (counting 100 MB exactly would also hold the event loop
        for seconds)."""
        if not self.chars:
            return 0
        kept_tokens = count(self.text())
        if self.complete:
            return kept_tokens
        return math.ceil(kept_tokens * self.chars / self.kept)


# OpenTelemetry GenAI `gen_ai.operation.name` values for each endpoint.
OPERATION_NAMES: dict[str, str] = {
    "chat.completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "models": "list_models",
    "other": "other",
}

Outcome = Literal[
    "ok",  # upstream answered 2xx and the whole response reached the client
    "upstream_error",  # upstream answered with an HTTP error status (relayed unchanged)
    "proxy_error",  # the proxy answered with its own error (unreachable, timeout, broken)
    "rejected",  # refused before anything went upstream (bad request, key, budget, model)
    "client_gone",  # the client disconnected before the response was complete
]


@dataclass(slots=True, eq=False)
class Exchange:
    request_id: str
    endpoint: Endpoint
    method: str
    path: str
    t0_ns: int
    wall_start: float = field(default_factory=time.time)

    # accept
    body: dict[str, Any] | None = None
    requested_model: str | None = None
    stream: bool = False
    output_cap: int | None = None
    user: str | None = None
    key_name: str | None = None
    # The virtual key's `metadata` from the config (its `team` scopes team budgets).
    key_metadata: dict[str, str] | None = None
    traceparent: str | None = None

    # route
    upstream: str | None = None
    upstream_kind: str | None = None
    upstream_model: str | None = None
    route_model: str | None = None  # the configured name used as the bounded `model` label
    usage_injected: bool = False

    # forward / relay (perf_counter_ns)
    t_upstream_sent_ns: int | None = None
    t_headers_ns: int | None = None
    t_first_byte_ns: int | None = None
    t_first_token_ns: int | None = None
    t_last_token_ns: int | None = None
    t_end_ns: int | None = None
    gaps_ns: list[int] = field(default_factory=list)
    output_events: int = 0
    overhead_ns: int = 0
    bytes_out: int = 0

    # result
    status: int | None = None
    outcome: Outcome | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_detail: str | None = None  # the lower layer's own words: logs and traces only
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    usage: Usage | None = None
    output_text: OutputText = field(default_factory=OutputText)
    # How much of a non-stream body was measured: "whole", or only its "tail" (a body over
    # the parse limit: usage read from its end, output text not read).
    body_measured: Literal["whole", "tail"] = "whole"
    llamacpp_timings: dict[str, float] | None = None
    cost: Decimal | None = None
    priced: bool = True
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def team(self) -> str | None:
        """The team of the request's virtual key (`metadata.team`), for team budgets."""
        return None if self.key_metadata is None else self.key_metadata.get("team")

    @property
    def operation(self) -> str:
        return OPERATION_NAMES[self.endpoint]

    @property
    def model_label(self) -> str:
        return self.route_model or "other"

    # Derived timings, in seconds; None where the moment never came.
    def _since_t0(self, t_ns: int | None) -> float | None:
        return None if t_ns is None else (t_ns - self.t0_ns) / 1e9

    @property
    def ttfb_s(self) -> float | None:
        return self._since_t0(self.t_first_byte_ns)

    @property
    def ttft_s(self) -> float | None:
        return self._since_t0(self.t_first_token_ns)

    @property
    def upstream_ttft_s(self) -> float | None:
        if self.t_first_token_ns is None or self.t_upstream_sent_ns is None:
            return None
        return (self.t_first_token_ns - self.t_upstream_sent_ns) / 1e9

    @property
    def duration_s(self) -> float | None:
        return self._since_t0(self.t_end_ns)

    @property
    def tpot_s(self) -> float | None:
        """(last output chunk - first output chunk) / (output tokens - 1), as DESIGN.md defines
        it. For models with hidden reasoning this understates the visible-token pace, since
        reasoning tokens are produced before the first chunk."""
        if self.t_first_token_ns is None or self.t_last_token_ns is None or self.usage is None:
            return None
        n = self.usage.output_tokens
        if n < 2:
            return None
        return (self.t_last_token_ns - self.t_first_token_ns) / 1e9 / (n - 1)

    @property
    def overhead_s(self) -> float:
        return self.overhead_ns / 1e9

    def gap_stats_s(self) -> tuple[float | None, float | None]:
        """Mean and p95 (nearest rank) of the inter-token gaps."""
        gaps = self.gaps_ns
        if not gaps:
            return None, None
        ordered = sorted(gaps)
        rank = max(0, -(-95 * len(ordered) // 100) - 1)
        return sum(gaps) / len(gaps) / 1e9, ordered[rank] / 1e9


class Observer(Protocol):
    """Watches exchanges. Hooks are named after the moment they fire.

    Observers run on the request's task, so they must be quick and must not block; an
    exception raised by one is logged and counted by `Observers`, never propagated.
    """

    def on_start(self, ex: Exchange) -> None: ...

    def on_first_token(self, ex: Exchange) -> None: ...

    def on_finish(self, ex: Exchange) -> None: ...


class Observers:
    """Fans hooks out to every observer, containing each one's failures."""

    def __init__(self, observers: list[Observer] | None = None) -> None:
        self.observers: list[Observer] = list(observers or [])
        self.failures = 0
        self.on_failure: list[Any] = []  # callables(name: str) -> None, e.g. a metric counter

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def _call(self, hook: str, ex: Exchange) -> None:
        for obs in self.observers:
            try:
                getattr(obs, hook)(ex)
            except Exception:  # noqa: BLE001 - measuring must never break forwarding
                self.failures += 1
                log.exception("observer %s failed in %s", type(obs).__name__, hook)
                for cb in self.on_failure:
                    try:
                        cb(type(obs).__name__)
                    except Exception:  # noqa: BLE001
                        log.exception("observer failure callback failed")

    def on_start(self, ex: Exchange) -> None:
        self._call("on_start", ex)

    def on_first_token(self, ex: Exchange) -> None:
        self._call("on_first_token", ex)

    def on_finish(self, ex: Exchange) -> None:
        self._call("on_finish", ex)
