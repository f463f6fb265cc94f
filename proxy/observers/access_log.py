"""One JSON line per finished exchange.

What is logged is an explicit allow-list built from the Exchange's measured fields, never a dump
of the request: no header value ever appears (so never the Authorization header), and prompt
and completion text only when payload logging is "truncated", cut to `payload_max_chars`.

Each line is written and flushed as one `write` call on a binary stream; a line is small, and
a pipe or file takes it without waiting on anything but the kernel.
"""

from __future__ import annotations

import logging
import math
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

import orjson

from proxy.exchange import Exchange
from proxy.observer import Observer
from proxy.pricing import plain_usd

PayloadMode = Literal["off", "truncated"]


def wall_iso_ms(wall: float) -> str:
    """ISO-8601 UTC with milliseconds and a `Z` suffix."""
    # What datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds") gives (it
    # rounds to microseconds half-even, then cuts to milliseconds), with the text up to
    # the second built once per second: a line per request, most within the same second.
    frac, whole = math.modf(wall)
    sec = int(whole)
    us = round(frac * 1e6)
    if us < 0:
        sec -= 1
        us += 1_000_000
    elif us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    cached = _second_text
    if cached[0] != sec:
        cached = _cache_second(sec)
    return f"{cached[1]}.{us // 1000:03d}Z"


def _cache_second(sec: int) -> tuple[int, str]:
    global _second_text
    _second_text = (sec, datetime.fromtimestamp(sec, tz=UTC).isoformat()[:-6])
    return _second_text


_second_text: tuple[int, str] = (-(2**62), "")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _content_text(content: Any) -> str:
    """Text of an OpenAI message `content`: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
                elif part.get("type"):
                    texts.append(f"[{part['type']}]")
            elif isinstance(part, str):
                texts.append(part)
        return " ".join(texts)
    return ""


def prompt_text(body: dict[str, Any] | None) -> str | None:
    """A readable rendering of the request's prompt (chat messages, completion prompt,
    Responses/embeddings input), for truncated payload logging."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list):
        lines = []
        for m in messages:
            if isinstance(m, dict):
                lines.append(f"{m.get('role', '?')}: {_content_text(m.get('content'))}")
        return "\n".join(lines)
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for item in value:
                if isinstance(item, str):
                    parts.append(item)
                elif isinstance(item, dict):
                    role = item.get("role")
                    text = _content_text(item.get("content"))
                    parts.append(f"{role}: {text}" if role else text)
                else:
                    parts.append(str(item))
            return "\n".join(parts)
    return None


class AccessLogObserver(Observer):
    def __init__(
        self,
        stream: IO[bytes] | None = None,
        payloads: PayloadMode = "off",
        payload_max_chars: int = 1000,
    ) -> None:
        if payloads not in ("off", "truncated"):
            raise ValueError(f"payloads: expected 'off' or 'truncated', got {payloads!r}")
        self.stream: IO[bytes] = stream if stream is not None else sys.stdout.buffer
        self.payloads = payloads
        self.payload_max_chars = payload_max_chars

    def on_finish(self, ex: Exchange) -> None:
        line = orjson.dumps(self.record(ex), default=str, option=orjson.OPT_APPEND_NEWLINE)
        self.stream.write(line)
        self.stream.flush()

    def record(self, ex: Exchange) -> dict[str, Any]:
        gap_mean, gap_p95 = ex.gap_stats_s()
        usage = ex.usage
        tokens: dict[str, Any] | None = None
        if usage is not None:
            tokens = {
                "input": usage.input_tokens,
                "cached_input": usage.cached_input_tokens,
                "cache_write": usage.cache_write_tokens,
                "output": usage.output_tokens,
                "reasoning": usage.reasoning_tokens,
                "input_source": usage.input_source,
                "output_source": usage.output_source,
            }
        rec: dict[str, Any] = {
            "ts": wall_iso_ms(ex.wall_start),
            "request_id": ex.request_id,
            "key": ex.key_name,
            # The end user (the configured user header, else the body's `user`), and the
            # key's team: who spent, beside which key they used.
            "user": ex.user,
            "team": ex.team,
            "model": ex.requested_model,
            "route_model": ex.model_label,
            "upstream_model": ex.upstream_model,
            "response_model": ex.response_model,
            "upstream": ex.upstream,
            "endpoint": ex.endpoint,
            "method": ex.method,
            "status": ex.status,
            "stream": ex.stream,
            "outcome": ex.outcome,
            "ttfb_s": ex.ttfb_s,
            "ttft_s": ex.ttft_s,
            "ttfc_s": ex.ttfc_s,
            "upstream_ttft_s": ex.upstream_ttft_s,
            "gap_mean_s": gap_mean,
            "gap_p95_s": gap_p95,
            "tpot_s": ex.tpot_s,
            "duration_s": ex.duration_s,
            "overhead_s": ex.overhead_s,
            "tokens": tokens,
            # Exact decimal as a string: JSON numbers would go through a float.
            "cost_usd": None if ex.cost is None else plain_usd(ex.cost),
            "priced": ex.priced,
            "finish_reasons": ex.finish_reasons or None,
            "error_type": ex.error_type,
        }
        if ex.key_metadata:
            rec["key_metadata"] = ex.key_metadata
        if ex.error_detail is not None:
            rec["error_detail"] = ex.error_detail
        if ex.replica is not None:
            rec["replica"] = ex.replica
        if ex.replica_failures:
            rec["replica_connect_failures"] = list(ex.replica_failures)
        unmetered = ex.unmetered
        if unmetered is not None:
            rec["unmetered"] = unmetered
        if ex.body_measured != "whole":
            rec["body_measured"] = ex.body_measured
        budget = ex.budget_verdict
        if budget is not None:
            rec["budget"] = budget
        if ex.llamacpp_timings:
            rec["llamacpp"] = ex.llamacpp_timings
        if self.payloads == "truncated":
            prompt = prompt_text(ex.body)
            rec["prompt"] = None if prompt is None else _truncate(prompt, self.payload_max_chars)
            rec["completion"] = _truncate(ex.output_text.text(), self.payload_max_chars)
        return rec


class JsonLogFormatter(logging.Formatter):
    """Tollgate's and its libraries' log records as one JSON object per line, in the access
    log's shape (`ts` as there), so one parser reads both streams. A traceback stays inside
    its record (`exc`), never spread over lines of its own."""

    def format(self, record: logging.LogRecord) -> str:
        rec: dict[str, Any] = {
            "ts": wall_iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            rec["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            rec["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(rec, default=str).decode()
