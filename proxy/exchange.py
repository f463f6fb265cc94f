"""The per-request record: what was asked, where it went, and what was measured.

An `Exchange` is created when a request has been fully received (t0) and is finished exactly
once, on every path: success, upstream error, client gone, refused. All timestamps are
`time.perf_counter_ns()` values; wall-clock time is kept only for log lines and the ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from proxy.pricing import CostParts
from proxy.usage import Usage

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
    # sha256 hex of the request body exactly as received (model endpoints): lets `tollgate
    # advise` find repeated identical requests without the spend log holding any payload.
    body_sha256: str | None = None
    requested_model: str | None = None
    stream: bool = False
    output_cap: int | None = None
    user: str | None = None
    key_name: str | None = None
    # The virtual key's `metadata` from the config (its `team` scopes team budgets).
    key_metadata: dict[str, str] | None = None
    # The client asked to see the cost in the body (`usage.cost`): its key's `include_cost`
    # or the request's x-tollgate-include-cost header.
    include_cost: bool = False
    traceparent: str | None = None
    tracestate: str | None = None

    # route
    upstream: str | None = None
    upstream_kind: str | None = None
    upstream_model: str | None = None
    route_model: str | None = None  # the configured name used as the bounded `model` label
    upstream_url: str | None = None  # the upstream's API base: the span's server.address
    # The replica of a replicated upstream that took the request (its configured name or
    # host:port), and those whose connect failed before it, in order.
    replica: str | None = None
    replica_failures: tuple[str, ...] = ()
    usage_injected: bool = False
    # The request came in Azure's deployment layout: the path named the model (a deployment
    # name), so the response's model may price it.
    azure_deployment: bool = False
    # Why a path Tollgate cannot meter went through: the passthrough glob, or "unguarded".
    unmetered: str | None = None

    # The response cache (proxy/cached.py): `hit` (answered from it), `miss` (looked up,
    # forwarded), `bypass` (not looked up); None when the cache is off. A hit costs 0 and
    # `saved` is what it would have cost upstream.
    cache: Literal["hit", "miss", "bypass"] | None = None
    saved: Decimal | None = None

    # admit: ok, warn, clamped:<budget>, refused:<budget>, unchecked, ledger_unavailable
    budget_verdict: str | None = None

    # forward / relay (perf_counter_ns)
    t_upstream_sent_ns: int | None = None
    t_headers_ns: int | None = None
    t_first_byte_ns: int | None = None
    t_first_token_ns: int | None = None  # first output chunk, any channel (measure.py)
    t_first_content_ns: int | None = None  # first visible output chunk: not reasoning
    t_last_token_ns: int | None = None
    t_end_ns: int | None = None
    gaps_ns: list[int] = field(default_factory=list)
    output_events: int = 0
    # A chunk carried reasoning text itself: its reasoning tokens were emitted as chunks, so
    # they are in TPOT's divisor (hidden reasoning is not).
    reasoning_streamed: bool = False
    # Latency Tollgate added for the client (see `overhead_s`): pre-send time plus
    # `relay_delay_ns`, the relay delay of the one chunk that counts.
    overhead_ns: int = 0
    relay_delay_ns: int | None = None
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
    cost_parts: CostParts | None = None  # set only when priced
    priced: bool = True
    # Measuring or accounting raised (a bug): the record is kept with what was known.
    measure_failed: bool = False
    account_failed: bool = False
    started: bool = False  # observers' on_start has fired
    finished: bool = False

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
    def ttfc_s(self) -> float | None:
        """Time to first visible content: as TTFT, counting only content, refusal, a tool or
        function call and audio (not reasoning). Equals TTFT unless reasoning came first."""
        return self._since_t0(self.t_first_content_ns)

    @property
    def upstream_ttft_s(self) -> float | None:
        if self.t_first_token_ns is None or self.t_upstream_sent_ns is None:
            return None
        return (self.t_first_token_ns - self.t_upstream_sent_ns) / 1e9

    @property
    def duration_s(self) -> float | None:
        return self._since_t0(self.t_end_ns)

    @property
    def emitted_output_tokens(self) -> int | None:
        """Output tokens that came as chunks: all output tokens, less reasoning tokens the
        upstream reported but never streamed (OpenAI reasoning models think before the first
        chunk and report it only in usage). None without usage."""
        usage = self.usage
        if usage is None:
            return None
        n = usage.output_tokens
        if usage.reasoning_tokens and not self.reasoning_streamed:
            n -= usage.reasoning_tokens
        return n

    @property
    def tpot_s(self) -> float | None:
        """(last output chunk - first output chunk) / (output tokens emitted after the first
        chunk), as README defines it: the divisor is `emitted_output_tokens - 1`, so hidden
        reasoning, produced before the first chunk, does not make the pace look faster."""
        if self.t_first_token_ns is None or self.t_last_token_ns is None:
            return None
        n = self.emitted_output_tokens
        if n is None or n < 2:
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


def llamacpp_phases(ex: Exchange) -> dict[str, float]:
    """Where a llama.cpp request's time went, in seconds. prompt_eval and generation are the
    server's `timings` (prompt_ms, predicted_ms). queue_network is what Tollgate saw the
    upstream take that the server did not count as work: for a stream, upstream TTFT (request
    sent → first output chunk) − prompt_ms; for a plain body, request sent → end of body −
    prompt_ms − predicted_ms. It holds the network both ways, the wait for a free slot, and
    for a stream the first token's own decode step. Clamped at 0 (two clocks)."""
    timings = ex.llamacpp_timings or {}
    prompt_ms = timings.get("prompt_ms")
    predicted_ms = timings.get("predicted_ms")
    out: dict[str, float] = {}
    if isinstance(prompt_ms, (int, float)):
        out["prompt_eval"] = prompt_ms / 1000.0
    if isinstance(predicted_ms, (int, float)):
        out["generation"] = predicted_ms / 1000.0
    sent = ex.t_upstream_sent_ns
    if sent is None or not isinstance(prompt_ms, (int, float)):
        return out
    if ex.stream and ex.t_first_token_ns is not None:
        waited = (ex.t_first_token_ns - sent) / 1e9 - prompt_ms / 1000.0
    elif not ex.stream and ex.t_end_ns is not None and isinstance(predicted_ms, (int, float)):
        waited = (ex.t_end_ns - sent) / 1e9 - (prompt_ms + predicted_ms) / 1000.0
    else:
        return out
    out["queue_network"] = max(0.0, waited)
    return out
