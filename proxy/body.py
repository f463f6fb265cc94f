"""Measuring a non-stream response body: usage, output text and metadata, with memory bounded
whatever the body's size. Pure."""

from __future__ import annotations

import logging

import orjson

from proxy.exchange import Exchange
from proxy.output import note_finish_reason, note_response_identity, text_of_chat_delta
from proxy.usage import usage_from_body, usage_from_llamacpp_timings

log = logging.getLogger("tollgate.measure")


# Non-stream bodies larger than this are relayed but not parsed for usage (memory bound).
MAX_PARSED_BODY = 32 * 1024 * 1024


# Of a body over MAX_PARSED_BODY, only this much of its end is kept: an OpenAI-shaped body
# ends with its `usage` object (embeddings of thousands of inputs run to tens of MB).
BODY_TAIL_BYTES = 64 * 1024


class BodyKeeper:
    """A non-stream response body as measuring needs it: whole up to MAX_PARSED_BODY,
    beyond that only its last BODY_TAIL_BYTES, so memory stays bounded per request."""

    __slots__ = ("parts", "size", "tail")

    def __init__(self) -> None:
        self.parts: list[bytes] | None = []
        self.size = 0
        self.tail = b""

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.parts is not None:
            if self.size <= MAX_PARSED_BODY:
                self.parts.append(chunk)
                return
            self.parts.append(chunk)
            self.tail = b"".join(self.parts)[-BODY_TAIL_BYTES:]
            self.parts = None
        elif len(chunk) >= BODY_TAIL_BYTES:
            self.tail = chunk[-BODY_TAIL_BYTES:]
        else:
            self.tail = self.tail[len(chunk) - BODY_TAIL_BYTES :] + chunk

    def measure(self, ex: Exchange) -> None:
        """Measure what was kept, once; later calls find nothing left."""
        if self.parts is not None:
            if self.parts:
                measure_body(ex, b"".join(self.parts))
                self.parts.clear()
        elif self.tail:
            measure_body_tail(ex, self.tail)
            self.tail = b""


def measure_body_tail(ex: Exchange, tail: bytes) -> None:
    """Usage from the end of a body too large to parse whole: the last `"usage": {...}`."""
    ex.body_measured = "tail"
    if ex.status is not None and ex.status >= 400:
        return
    at = tail.rfind(b'"usage"')
    start = tail.find(b"{", at) if at >= 0 else -1
    end = object_end(tail, start) if start >= 0 else -1
    if end < 0:
        return
    try:
        usage = usage_from_body(ex.endpoint, {"usage": orjson.loads(tail[start:end])})
    except orjson.JSONDecodeError:
        return
    if usage is not None:
        ex.usage = usage


def object_end(data: bytes, start: int) -> int:
    """The index after the JSON object that opens at `start`, or -1 if it does not close."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(data)):
        c = data[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def measure_body(ex: Exchange, body: bytes) -> None:
    """Read usage, model and timings out of a complete non-stream JSON response."""
    if not body or len(body) > MAX_PARSED_BODY:
        return
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(payload, dict):
        return
    if ex.status is not None and ex.status >= 400:
        err = payload.get("error")
        if isinstance(err, dict):
            ex.error_message = str(err.get("message"))[:500] if err.get("message") else None
        return
    usage = usage_from_body(ex.endpoint, payload)
    timings = payload.get("timings")
    if isinstance(timings, dict):
        ex.llamacpp_timings = timings
        if usage is None:
            usage = usage_from_llamacpp_timings(timings)
    if usage is not None:
        ex.usage = usage
    note_response_identity(ex, payload)
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            note_finish_reason(ex, choice)
            msg = choice.get("message")
            if isinstance(msg, dict):
                text_of_chat_delta(msg, ex.output_text)
            text = choice.get("text")
            if isinstance(text, str):
                ex.output_text.append(text)
    if ex.endpoint == "responses" and isinstance(payload.get("status"), str):
        ex.finish_reasons.append(payload["status"])
