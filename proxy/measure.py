"""The side tap on the relay: reads a copy of what flows to the client and fills the Exchange.

It never decides what the client receives, with one exception the caller opts into: when
Tollgate itself injected `stream_options.include_usage`, `UsageStripper` rewrites each event so
the client gets the bytes it would have got without the option.

Everything here is synchronous and pure over (bytes, timestamps); forward.py calls it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import orjson

from proxy.exchange import Exchange
from proxy.sse import SSEEvent, SSEParser
from proxy.tokens import usage_from_body, usage_from_llamacpp_timings, usage_from_stream_payload

log = logging.getLogger("tollgate.measure")

# Non-stream bodies larger than this are relayed but not parsed for usage (memory bound).
MAX_PARSED_BODY = 32 * 1024 * 1024


def _text_of_chat_delta(delta: dict[str, Any], parts: list[str]) -> bool:
    """Collect the output a chat delta carries; True if it carries any."""
    carries = False
    for field in ("content", "refusal", "reasoning_content", "reasoning"):
        value = delta.get(field)
        if isinstance(value, str) and value:
            parts.append(value)
            carries = True
    tool_calls = delta.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                args = fn.get("arguments")
                if isinstance(args, str) and args:
                    parts.append(args)
                    carries = True
    fn_call = delta.get("function_call")
    if isinstance(fn_call, dict):
        args = fn_call.get("arguments")
        if isinstance(args, str) and args:
            parts.append(args)
            carries = True
    return carries


def output_of_payload(endpoint: str, event_name: str | None, payload: dict[str, Any], parts: list[str]) -> bool:
    """Append the output text of one stream event to `parts`; True if the event carries output.

    The role-only first chat chunk (`{"role": "assistant", "content": ""}`) carries none.
    """
    if endpoint == "responses":
        kind = payload.get("type") or event_name or ""
        if isinstance(kind, str) and kind.endswith(".delta"):
            delta = payload.get("delta")
            if isinstance(delta, str):
                if delta:
                    parts.append(delta)
                    return True
                return False
            return delta is not None
        return False
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return False
    carries = False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            carries = _text_of_chat_delta(delta, parts) or carries
        text = choice.get("text")
        if isinstance(text, str) and text:
            parts.append(text)
            carries = True
    return carries


# OpenAI's chat content chunk, byte for byte as api.openai.com writes it (key order, no
# spaces). A chunk of exactly this shape carries nothing to measure but its content, id and
# model, so it is read with one regex match instead of a JSON decode and a dict walk; any
# other chunk (role, finish, usage, tool calls, other upstreams) takes the general path.
# Unchecked strings are printable ASCII without quote or backslash, so a match is valid
# JSON whenever the content literal is (orjson checks that one).
_ASCII_STR = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_CONTENT_AND_REST = (
    rb'("(?:[^"\\\x00-\x1f]|\\.)*")\},"logprobs":null,"finish_reason":null\}\]'
    rb'(?:,"usage":null)?(?:,"obfuscation":' + _ASCII_STR + rb')?\}'
)
_CHAT_CONTENT_CHUNK = re.compile(
    rb'\{"id":(' + _ASCII_STR + rb'),"object":"chat\.completion\.chunk","created":(?:0|[1-9][0-9]{0,15}),'
    rb'"model":(' + _ASCII_STR + rb'),(?:"service_tier":' + _ASCII_STR + rb',)?'
    rb'"system_fingerprint":(?:' + _ASCII_STR + rb'|null),'
    rb'"choices":\[\{"index":0,"delta":\{"content":' + _CONTENT_AND_REST
).fullmatch
# Within a stream every chunk repeats the part before the content byte for byte (id,
# created, model...): once one chunk matched whole, the next only need the rest checked.
_CONTENT_TAIL = re.compile(_CONTENT_AND_REST).fullmatch


def note_response_identity(ex: Exchange, response: dict[str, Any]) -> None:
    """The model that answered and the response id, from a body, a chunk or a Responses event."""
    model = response.get("model")
    if isinstance(model, str):
        ex.response_model = model
    rid = response.get("id")
    if isinstance(rid, str):
        ex.response_id = rid


def note_finish_reason(ex: Exchange, choice: dict[str, Any]) -> None:
    reason = choice.get("finish_reason")
    if isinstance(reason, str):
        ex.finish_reasons.append(reason)


class StreamTap:
    """Measures an SSE response as its chunks pass by.

    `on_chunk(events, t_ns)` is given the events a chunk completed and the monotonic time the
    chunk was read from upstream; a chunk counts once for timing even if it holds several
    output-carrying events (the gap histogram is per chunk).
    """

    __slots__ = ("_first_token_cb", "_prefix", "_prefix_id", "_prefix_model", "ex", "healthy", "parser", "parts")

    def __init__(self, ex: Exchange, on_first_token: Callable[[Exchange], None]) -> None:
        self.ex = ex
        self.parser = SSEParser()
        self.parts: list[str] = ex.output_text_parts
        self.healthy = True
        self._first_token_cb = on_first_token
        # The bytes before the content of the last chunk of OpenAI's shape, and its id/model.
        self._prefix: bytes | None = None
        self._prefix_id = ""
        self._prefix_model = ""

    def feed(self, chunk: bytes, t_ns: int) -> list[SSEEvent]:
        events = self.parser.feed(chunk)
        if events and self.healthy:
            self._measure(events, t_ns)
        return events

    def finish(self, t_ns: int) -> list[SSEEvent]:
        events = self.parser.flush()
        if events and self.healthy:
            self._measure(events, t_ns)
        return events

    def _measure(self, events: list[SSEEvent], t_ns: int) -> None:
        # A bug or a surprise in measuring must never reach the relay: stop measuring this
        # stream, say so once, and let the bytes flow on.
        try:
            self.on_events(events, t_ns)
        except Exception:  # noqa: BLE001
            self.healthy = False
            self.ex.extra["measure_failed"] = True
            log.exception("measuring stream %s failed; relaying on unmeasured", self.ex.request_id)

    def on_events(self, events: list[SSEEvent], t_ns: int) -> None:
        ex = self.ex
        carried = False
        chat = ex.endpoint != "responses"
        for ev in events:
            data = ev.data
            if not data or data == b"[DONE]":
                continue
            if chat:
                literal = None
                prefix = self._prefix
                if prefix is not None and data.startswith(prefix):
                    tail = _CONTENT_TAIL(data, len(prefix))
                    if tail is not None:
                        literal = tail.group(1)
                else:
                    m = _CHAT_CONTENT_CHUNK(data)
                    if m is not None:
                        literal = m.group(3)
                        self._prefix = data[: m.start(3)]
                        self._prefix_id = m.group(1)[1:-1].decode("ascii")
                        self._prefix_model = m.group(2)[1:-1].decode("ascii")
                if literal is not None:
                    try:
                        content = orjson.loads(literal)
                    except orjson.JSONDecodeError:
                        continue  # then the whole chunk is not JSON either
                    if content:
                        self.parts.append(content)
                        carried = True
                    ex.response_id = self._prefix_id
                    ex.response_model = self._prefix_model
                    continue
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # relayed unchanged; nothing to measure in it
            if not isinstance(payload, dict):
                continue
            if output_of_payload(ex.endpoint, ev.event, payload, self.parts):
                carried = True
            self._note_metadata(payload)
        if carried:
            ex.output_events += 1
            if ex.t_first_token_ns is None:
                ex.t_first_token_ns = t_ns
                self._first_token_cb(ex)
            else:
                ex.gaps_ns.append(t_ns - ex.t_last_token_ns)  # type: ignore[operator]
            ex.t_last_token_ns = t_ns

    def _note_metadata(self, payload: dict[str, Any]) -> None:
        ex = self.ex
        if "error" in payload and isinstance(payload["error"], dict):
            err = payload["error"]
            ex.error_type = str(err.get("code") or err.get("type") or "stream_error")[:64]
        usage = usage_from_stream_payload(ex.endpoint, payload)
        if usage is not None:
            ex.usage = usage
        timings = payload.get("timings")
        if isinstance(timings, dict):
            ex.llamacpp_timings = timings
        response = payload.get("response") if ex.endpoint == "responses" else payload
        if isinstance(response, dict):
            note_response_identity(ex, response)
        choices = payload.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    note_finish_reason(ex, choice)
        if ex.endpoint == "responses" and payload.get("type") == "response.completed":
            resp = payload.get("response")
            if isinstance(resp, dict) and isinstance(resp.get("status"), str):
                ex.finish_reasons.append(resp["status"])


class UsageStripper:
    """Undoes what Tollgate's own `include_usage` injection did to a chat/completions stream.

    With the option, OpenAI adds `"usage":null` to every chunk and one extra chunk with
    `"choices":[]` and the usage before `[DONE]`. Removing exactly those gives the client the
    bytes a direct call without the option returns. Works on whole events, so the relay holds
    at most one partial event while injection is on.
    """

    __slots__ = ()

    def rewrite(self, ev: SSEEvent) -> bytes:
        data = ev.data
        if data is None or data == b"[DONE]":
            return ev.raw
        if b'"usage":' not in data:
            return ev.raw
        if self._is_usage_only(data):
            return b""
        raw = ev.raw
        # Cut the first occurrence (as bytes.replace(..., 1) would) with one search, not two.
        at = raw.find(b',"usage":null')
        if at >= 0:
            return raw[:at] + raw[at + 13 :]
        at = raw.find(b'"usage":null,')
        if at >= 0:
            return raw[:at] + raw[at + 13 :]
        return raw

    @staticmethod
    def _is_usage_only(data: bytes) -> bool:
        if b'"choices":[]' not in data:
            return False
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        return (
            isinstance(payload, dict)
            and payload.get("choices") == []
            and isinstance(payload.get("usage"), dict)
        )


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
                _text_of_chat_delta(msg, ex.output_text_parts)
            text = choice.get("text")
            if isinstance(text, str):
                ex.output_text_parts.append(text)
    if ex.endpoint == "responses" and isinstance(payload.get("status"), str):
        ex.finish_reasons.append(payload["status"])
