"""The side tap on the relay: reads a copy of what flows to the client and fills the Exchange.

It never decides what the client receives, with one exception the caller opts into: when
Tollgate itself injected `stream_options.include_usage`, `UsageStripper` rewrites each event so
the client gets the bytes it would have got without the option.

What counts as output (README "What is measured, exactly"): a chunk carrying non-empty content,
refusal, reasoning text (`reasoning_content`, `reasoning`), completions `text`, a tool call from
its first chunk (id and name, even with `arguments: ""`) on, a legacy `function_call`, or audio
(data or transcript); for the Responses API a non-empty `*.delta` event or the
`response.output_item.added` of a tool call item. The role-only chunk is not output. The first
output chunk is TTFT's moment; the first one that is not reasoning is time to first content's;
a chunk with reasoning text marks the reasoning as streamed, which keeps its tokens in TPOT's
divisor (hidden reasoning is left out: `Exchange.emitted_output_tokens`).

Everything here is synchronous and pure over (bytes, timestamps); forward.py calls it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from proxy.exchange import Exchange
from proxy.sse import SSEEvent, SSEParser
from proxy.usage import usage_from_body, usage_from_llamacpp_timings, usage_from_stream_payload

log = logging.getLogger("tollgate.measure")

# Non-stream bodies larger than this are relayed but not parsed for usage (memory bound).
MAX_PARSED_BODY = 32 * 1024 * 1024


class TextSink(Protocol):
    """Where output text goes: the Exchange's bounded OutputText, or a plain list."""

    def append(self, text: str, /) -> None: ...


# What a stream event carried, as bit flags; 0 is nothing (a role-only chunk, an empty
# delta, metadata). Any of them makes the event's chunk an output chunk (TTFT, gaps, TPOT).
VISIBLE = 1  # content, refusal, a tool call or function call, audio: what the user sees
REASONING = 2  # reasoning text itself (chat reasoning_content / reasoning, Responses reasoning_text)
SUMMARY = 4  # a Responses reasoning summary: output, but the reasoning tokens stay hidden


def _text_of_chat_delta(delta: dict[str, Any], parts: TextSink) -> int:
    """Collect the output text a chat delta (or message) carries; the flags of what it carries.

    A tool call counts from its first chunk, the one with its id and name and `arguments: ""`:
    the model has produced those tokens, though no argument text has come yet. Audio counts
    when it carries data or a transcript. What goes to `parts` (the local output estimate)
    is as before: content, refusal, reasoning and call argument text.
    """
    carries = 0
    for field in ("content", "refusal"):
        value = delta.get(field)
        if isinstance(value, str) and value:
            parts.append(value)
            carries |= VISIBLE
    for field in ("reasoning_content", "reasoning"):
        value = delta.get(field)
        if isinstance(value, str) and value:
            parts.append(value)
            carries |= REASONING
    tool_calls = delta.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if not isinstance(call, dict):
                continue
            if call.get("id"):
                carries |= VISIBLE
            for kind, text_key in (("function", "arguments"), ("custom", "input")):
                fn = call.get(kind)
                if isinstance(fn, dict):
                    if fn.get("name"):
                        carries |= VISIBLE
                    args = fn.get(text_key)
                    if isinstance(args, str) and args:
                        parts.append(args)
                        carries |= VISIBLE
    fn_call = delta.get("function_call")
    if isinstance(fn_call, dict):
        if fn_call.get("name"):
            carries |= VISIBLE
        args = fn_call.get("arguments")
        if isinstance(args, str) and args:
            parts.append(args)
            carries |= VISIBLE
    audio = delta.get("audio")
    if isinstance(audio, dict) and (audio.get("data") or audio.get("transcript")):
        carries |= VISIBLE
    return carries


def _responses_delta_kind(kind: str) -> int:
    if "reasoning_summary" in kind:
        return SUMMARY
    if "reasoning" in kind:
        return REASONING
    return VISIBLE


def output_of_payload(endpoint: str, event_name: str | None, payload: dict[str, Any], parts: TextSink) -> int:
    """Append the output text of one stream event to `parts`; the flags of the output it
    carries (0: none).

    The role-only first chat chunk (`{"role": "assistant", "content": ""}`) carries none.
    Responses: every non-empty `*.delta` event (text, refusal, function-call arguments, audio
    and its transcript, reasoning text and summaries), and `response.output_item.added` for
    a tool call item (`function_call`, `custom_tool_call`, hosted `*_call`s), the
    counterpart of chat's first tool-call chunk.
    """
    if endpoint == "responses":
        kind = payload.get("type") or event_name or ""
        if not isinstance(kind, str):
            return 0
        if kind.endswith(".delta"):
            delta = payload.get("delta")
            if isinstance(delta, str):
                if delta:
                    parts.append(delta)
                    return _responses_delta_kind(kind)
                return 0
            return 0 if delta is None else _responses_delta_kind(kind)
        if kind == "response.output_item.added":
            item = payload.get("item")
            if isinstance(item, dict):
                item_type = item.get("type")
                if isinstance(item_type, str) and item_type.endswith("_call"):
                    return VISIBLE
        return 0
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return 0
    carries = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            carries |= _text_of_chat_delta(delta, parts)
        text = choice.get("text")
        if isinstance(text, str) and text:
            parts.append(text)
            carries |= VISIBLE
    return carries


# OpenAI's chat content chunk, byte for byte as api.openai.com writes it (key order, no
# spaces). A chunk of exactly this shape carries nothing to measure but its content, id and
# model, so it is read with one regex match instead of a JSON decode and a dict walk; any
# other chunk (role, finish, usage, tool calls, other upstreams) takes the general path.
# Unchecked strings are printable ASCII without quote or backslash, so a match is valid
# JSON whenever the content literal is (orjson checks that one).
_ASCII_STR = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
# (The content literal is the unrolled `"(?:[^"\\]|\\.)*"`: fewer regex steps per byte. The
# `,"usage":null` group is what UsageStripper would cut.)
_CONTENT_AND_REST = (
    rb'("[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*")\},"logprobs":null,"finish_reason":null\}\]'
    rb'(,"usage":null)?(?:,"obfuscation":' + _ASCII_STR + rb')?\}'
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

    Each chunk comes with the monotonic time it was read from upstream: `feed` (the events
    it completed), `tap` (the relay wrote it already) or `strip` (what to relay instead,
    through a UsageStripper). A chunk counts once for timing even if it holds several
    output-carrying events (the gap histogram is per chunk). `tap` and `strip` take the
    common OpenAI content chunk without the SSE parser or a JSON decode of the whole
    chunk; what they measure and relay is exactly what `feed` and `rewrite` would give.
    """

    __slots__ = (
        "_first_token_cb", "_prefix", "_prefix_id", "_prefix_line", "_prefix_model", "ex", "healthy", "parser", "parts",
    )

    def __init__(self, ex: Exchange, on_first_token: Callable[[Exchange], None]) -> None:
        self.ex = ex
        self.parser = SSEParser()
        self.parts = ex.output_text
        self.healthy = True
        self._first_token_cb = on_first_token
        # The bytes before the content of the last chunk of OpenAI's shape, and its id/model.
        self._prefix: bytes | None = None
        self._prefix_line: bytes | None = None  # b"data: " + _prefix: where the fast path starts
        self._prefix_id = ""
        self._prefix_model = ""

    def feed(self, chunk: bytes, t_ns: int) -> list[SSEEvent]:
        events = self.parser.feed(chunk)
        if events and self.healthy:
            self._measure(events, t_ns)
        return events

    def tap(self, chunk: bytes, t_ns: int) -> None:
        """`feed` for a relay that has written the chunk already and needs no events back."""
        self._take(chunk, t_ns, None)

    def strip(self, chunk: bytes, t_ns: int, stripper: UsageStripper) -> bytes:
        """`feed`, then the bytes `stripper.rewrite` makes of the events: what to relay."""
        out = self._take(chunk, t_ns, stripper)
        assert out is not None
        return out[0] if len(out) == 1 else b"".join(out)

    def _take(self, chunk: bytes, t_ns: int, stripper: UsageStripper | None) -> list[bytes] | None:
        """`feed` (and, with `stripper`, the rewritten bytes to relay), with the usual events
        taken without the parser: whole chat content chunks of OpenAI's shape that repeat
        the stream's last prefix, measured and rewritten as on_events and rewrite would."""
        parser = self.parser
        line = self._prefix_line
        if line is None or not self.healthy:
            return self._general(chunk, t_ns, stripper)
        # 1. Cut the chunk, in order, into the parser's events and fast events (matches).
        items: list[list[SSEEvent] | re.Match[bytes]] = []
        n = len(chunk)
        pos = 0
        if not parser.at_block_start():
            # A read ended inside an event: the parser completes that one, the rest of
            # the chunk can still take the fast path.
            pos = parser.pending_block_end(chunk)
            if pos == 0:
                return self._general(chunk, t_ns, stripper)
            items.append(parser.feed(chunk[:pos]))
            if not parser.at_block_start():
                items.append(parser.feed(chunk[pos:]))
                pos = n
        skip = len(line)
        while chunk.startswith(line, pos):
            # Prefix and tail hold no CR or LF (the regexes admit neither): the first LF
            # after the prefix must end the data line, and a second one the event.
            eol = chunk.find(b"\n", pos + skip)
            if eol < 0 or eol + 1 >= n or chunk[eol + 1] != 0x0A:
                break
            m = _CONTENT_TAIL(chunk, pos + skip, eol)
            if m is None:
                break
            items.append(m)
            pos = eol + 2
        if pos < n:
            items.append(parser.feed(chunk[pos:]))
        # 2. Measure them in order; a fast event's id and model are those of the prefix
        # it matched (measuring the parser's events may move the prefix on).
        self._measure_items(items, t_ns, self._prefix_id, self._prefix_model)
        if stripper is None:
            return None
        # 3. What to relay.
        out: list[bytes] = []
        for item in items:
            if isinstance(item, list):
                out.extend([stripper.rewrite(ev) for ev in item])
                continue
            start, end = item.pos - skip, item.endpos + 2
            at = item.start(2)
            # The event's only `,"usage":null` is the one in its tail (id, model and
            # content hold no unescaped quote): the first, the one rewrite cuts.
            out.append(chunk[start:end] if at < 0 else chunk[start:at] + chunk[item.end(2) : end])
        return out

    def _general(self, chunk: bytes, t_ns: int, stripper: UsageStripper | None) -> list[bytes] | None:
        events = self.feed(chunk, t_ns)
        return None if stripper is None else [stripper.rewrite(ev) for ev in events]

    def _measure_items(
        self, items: list[list[SSEEvent] | re.Match[bytes]], t_ns: int, prefix_id: str, prefix_model: str
    ) -> None:
        ex = self.ex
        carried = 0
        try:
            for item in items:
                if isinstance(item, list):
                    if item:
                        carried |= self.on_events(item)
                    continue
                try:
                    content = orjson.loads(item.group(1))
                except orjson.JSONDecodeError:
                    continue  # then the whole chunk is not JSON either: relayed, not measured
                if content:
                    self.parts.append(content)
                    carried |= VISIBLE
                ex.response_id = prefix_id
                ex.response_model = prefix_model
            if carried:
                self._carried(t_ns, carried)
        except Exception:  # noqa: BLE001 - as _measure: never reach the relay
            self._failed()

    def _carried(self, t_ns: int, flags: int) -> None:
        ex = self.ex
        ex.output_events += 1
        if flags & VISIBLE and ex.t_first_content_ns is None:
            ex.t_first_content_ns = t_ns
        if flags & REASONING:
            ex.reasoning_streamed = True
        if ex.t_first_token_ns is None:
            ex.t_first_token_ns = t_ns
            self._first_token_cb(ex)
        else:
            ex.gaps_ns.append(t_ns - ex.t_last_token_ns)  # type: ignore[operator]
        ex.t_last_token_ns = t_ns

    def finish(self, t_ns: int) -> list[SSEEvent]:
        events = self.parser.flush()
        if events and self.healthy:
            self._measure(events, t_ns)
        return events

    def _measure(self, events: list[SSEEvent], t_ns: int) -> None:
        """Measure the events one chunk completed."""
        # A bug or a surprise in measuring must never reach the relay: stop measuring this
        # stream, say so once, and let the bytes flow on.
        try:
            flags = self.on_events(events)
            if flags:
                self._carried(t_ns, flags)
        except Exception:  # noqa: BLE001
            self._failed()

    def _failed(self) -> None:
        self.healthy = False
        self.ex.measure_failed = True
        log.exception("measuring stream %s failed; relaying on unmeasured", self.ex.request_id)

    def on_events(self, events: list[SSEEvent]) -> int:
        """Measure the events; the flags of the output they carry (timing is the caller's)."""
        ex = self.ex
        carried = 0
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
                        self._prefix_line = b"data: " + self._prefix
                        self._prefix_id = m.group(1)[1:-1].decode("ascii")
                        self._prefix_model = m.group(2)[1:-1].decode("ascii")
                if literal is not None:
                    try:
                        content = orjson.loads(literal)
                    except orjson.JSONDecodeError:
                        continue  # then the whole chunk is not JSON either
                    if content:
                        self.parts.append(content)
                        carried |= VISIBLE
                    ex.response_id = self._prefix_id
                    ex.response_model = self._prefix_model
                    continue
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # relayed unchanged; nothing to measure in it
            if not isinstance(payload, dict):
                continue
            carried |= output_of_payload(ex.endpoint, ev.event, payload, self.parts)
            self._note_metadata(payload)
        return carried

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

    With the option, an upstream adds a final usage-only chunk (`"choices": []` and the usage)
    before `[DONE]`, and OpenAI also adds `"usage":null` to every other chunk. Removing exactly
    those gives the client the bytes a direct call without the option returns.

    It works on the event's meaning, not on OpenAI's byte formatting: the data is decoded as
    JSON, so spaces after `:` and `,`, any key order, pretty-printed JSON over several `data:`
    lines, `data:` without a space, CRLF or CR line endings and comment or `retry:` lines in
    the block all strip alike. A chunk is usage-only when its top-level `usage` is an object
    and its `choices` is `[]` or absent; the whole block goes (comments and all: the upstream
    would not have sent it). A top-level `"usage": null` member is cut out of the raw bytes
    together with one adjacent comma (and, for pretty-printed JSON, a data line left empty by
    the cut), so the rest of the block stays byte for byte. Anything it cannot read (not
    JSON, not an object, no top-level usage) is relayed unchanged. Works on whole events, so
    the relay holds at most one partial event while injection is on.
    """

    __slots__ = ()

    def rewrite(self, ev: SSEEvent) -> bytes:
        data = ev.data
        raw = ev.raw
        if data is None or data == b"[DONE]":
            return raw
        # Cheap rejection for the chunks that cannot carry a usage key (a JSON key may be
        # written with \u escapes, so those are decoded too).
        if b"usage" not in data and b"\\u" not in data:
            return raw
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return raw
        if not isinstance(payload, dict) or "usage" not in payload:
            return raw
        usage = payload["usage"]
        if isinstance(usage, dict) and payload.get("choices", []) == []:
            # The carried LF of a CRLF split across reads belongs to the previous block.
            return b"\n" if raw[:1] == b"\n" and len(raw) > 1 else b""
        if usage is not None:
            return raw  # a real usage on a content chunk: not what the option added alone
        # OpenAI's own bytes: the only "usage" is the top-level key, written compactly.
        if data.count(b'"usage"') == 1:
            at = raw.find(b',"usage":null')
            if at >= 0:
                return raw[:at] + raw[at + 13 :]
        return _cut_usage_null(raw, data, payload)


# JSON tokens that matter for finding a top-level member: strings (so that nothing inside one
# is taken for structure) and the structural characters. Numbers, literals and whitespace
# are skipped over.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],]', re.S)
_BOM = b"\xef\xbb\xbf"


def _usage_null_span(data: bytes) -> tuple[int, int] | None:
    """The bytes of `data` (a JSON object) to cut to remove its top-level `usage` member, with
    one adjacent comma: `, "usage": null` after the previous member, or `"usage": null, ` as
    the first. Whitespace is cut so that compact, spaced and pretty-printed JSON each come
    out as the upstream would have written them without the member. None if not found."""
    depth = 0
    key_next = False
    open_end = -1
    prev_value_end = -1  # end of the previous member's value; -1 while at the first member
    member_start = -1
    is_usage = False
    for m in _JSON_TOKEN.finditer(data):
        c = data[m.start()]
        if c == 0x22:  # a string
            if depth == 1 and key_next:
                key_next = False
                member_start = m.start()
                tok = m.group()
                is_usage = tok == b'"usage"' or (b"\\" in tok and orjson.loads(tok) == "usage")
            continue
        if c == 0x7B or c == 0x5B:  # { [
            depth += 1
            if depth == 1:
                if c != 0x7B:
                    return None
                open_end = m.end()
                key_next = True
            continue
        if c == 0x2C and depth != 1:  # a comma inside a nested value
            continue
        if c != 0x2C and depth != 1:  # } ] closing a nested value
            depth -= 1
            continue
        # A comma or the closing brace at the top level: the current member ends here.
        value_end = len(data[: m.start()].rstrip())
        if is_usage:
            if not data[member_start:value_end].endswith(b"null"):
                return None
            if prev_value_end >= 0:
                return prev_value_end, value_end
            if c != 0x2C:
                return member_start, value_end  # the only member
            start = member_start
            # Pretty-printed: the member's indentation goes with it (its line empties).
            indent = len(data[open_end:start]) - len(data[open_end:start].rstrip(b" \t"))
            if indent and data[start - indent - 1 : start - indent] in (b"\n", b"\r"):
                start -= indent
            end = m.end()
            while end < len(data) and data[end] in b" \t":
                end += 1
            return start, end
        if c != 0x2C:
            return None  # the object closed without a usage member
        prev_value_end = value_end
        key_next = True
    return None


def _data_lines(raw: bytes) -> list[tuple[int, int, int, int]]:
    """Each `data` line of one SSE block: (line start, value start, value end, next line)."""
    lines: list[tuple[int, int, int, int]] = []
    n = len(raw)
    pos = len(_BOM) if raw.startswith(_BOM) else 0
    while pos < n:
        lf = raw.find(b"\n", pos)
        cr = raw.find(b"\r", pos)
        eol = n if lf < 0 and cr < 0 else (lf if cr < 0 or (0 <= lf < cr) else cr)
        nxt = eol + 2 if raw[eol : eol + 2] == b"\r\n" else eol + 1
        if raw.startswith(b"data", pos) and (eol == pos + 4 or raw[pos + 4] == 0x3A):
            start = min(pos + 5, eol)
            if start < eol and raw[start] == 0x20:
                start += 1
            lines.append((pos, start, eol, min(nxt, n)))
        pos = nxt
    return lines


def _cut_usage_null(raw: bytes, data: bytes, payload: dict[str, Any]) -> bytes:
    """`raw` without the top-level `"usage": null` member of its data, cut in place from the
    data lines that hold it; `raw` unchanged whenever that cannot be done exactly."""
    span = _usage_null_span(data)
    if span is None:
        return raw
    lines = _data_lines(raw)
    if b"\n".join([raw[s:e] for _, s, e, _ in lines]) != data:
        return raw  # raw and data disagree (not a block the parser made): leave it
    cut_a, cut_b = span
    out: list[bytes] = []
    kept = 0  # raw bytes before this offset are in `out` already
    offset = 0  # where the current line's value starts in `data`
    for line_start, start, end, _next in lines:
        length = end - start
        a, b = max(cut_a, offset), min(cut_b, offset + length)
        if length and a <= offset and b >= offset + length:
            out.append(raw[kept:line_start])  # the whole line goes
            kept = _next
        elif a < b:
            out.append(raw[kept : start + a - offset])
            kept = start + b - offset
        offset += length + 1
    out.append(raw[kept:])
    result = b"".join(out)
    # The guarantee, checked rather than argued: the block still parses to the same object
    # without its usage member; anything else relays the upstream's bytes as they were.
    try:
        after = orjson.loads(b"\n".join([result[s:e] for _, s, e, _ in _data_lines(result)]))
    except orjson.JSONDecodeError:
        return raw
    expected = dict(payload)
    del expected["usage"]
    return result if after == expected else raw


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
    end = _object_end(tail, start) if start >= 0 else -1
    if end < 0:
        return
    try:
        usage = usage_from_body(ex.endpoint, {"usage": orjson.loads(tail[start:end])})
    except orjson.JSONDecodeError:
        return
    if usage is not None:
        ex.usage = usage


def _object_end(data: bytes, start: int) -> int:
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
                _text_of_chat_delta(msg, ex.output_text)
            text = choice.get("text")
            if isinstance(text, str):
                ex.output_text.append(text)
    if ex.endpoint == "responses" and isinstance(payload.get("status"), str):
        ex.finish_reasons.append(payload["status"])
