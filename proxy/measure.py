"""The side tap on a relayed stream: reads a copy of what flows to the client and fills the
Exchange. (Plain bodies: proxy.body; what counts as output: proxy.output.)

It never decides what the client receives, with two exceptions the caller opts into: when
Tollgate itself injected `stream_options.include_usage`, `UsageStripper` rewrites each event so
the client gets the bytes it would have got without the option; when the client asked for
usage and for its cost, `client_cost.UsageCoster` adds `usage.cost` to the usage event.

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
from typing import Any

import orjson

from proxy.exchange import Exchange
from proxy.output import (
    CHAT_CONTENT_CHUNK,
    CONTENT_TAIL,
    REASONING,
    VISIBLE,
    note_finish_reason,
    note_response_identity,
    output_of_payload,
)
from proxy.sse import SSEEvent, SSEParser
from proxy.strip import EventRewriter
from proxy.usage import usage_from_stream_payload

log = logging.getLogger("tollgate.measure")


def _decodes(literal: bytes) -> bool:
    """Whether a content literal is valid JSON, and with it the whole fast event: one that
    is not is relayed as it came, as `UsageStripper.rewrite` relays what it cannot read."""
    try:
        orjson.loads(literal)
    except orjson.JSONDecodeError:
        return False
    return True


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
        if self._one(chunk, t_ns, None) is None:
            self._take(chunk, t_ns, None)

    def strip(self, chunk: bytes, t_ns: int, rewriter: EventRewriter) -> bytes:
        """`feed`, then the bytes `rewriter.rewrite` makes of the events: what to relay."""
        one = self._one(chunk, t_ns, rewriter)
        if one is not None:
            return one
        out = self._take(chunk, t_ns, rewriter)
        assert out is not None
        return out[0] if len(out) == 1 else b"".join(out)

    def _one(self, chunk: bytes, t_ns: int, rewriter: EventRewriter | None) -> bytes | None:
        """`_take` for the reads nearly every stream is made of: whole content events that
        repeat the last prefix, one (a read per chunk) or several (a busy proxy reads several
        chunks at once). What to relay (the read itself when nothing is cut), or None when
        the read is any other: `_take` then takes it."""
        line = self._prefix_line
        if line is None or not chunk.startswith(line) or not chunk.endswith(b"\n\n"):
            return None
        if not self.healthy or not self.parser.at_block_start():
            return None
        # The tail admits no CR or LF: a match is the whole of one event's one data line.
        m = CONTENT_TAIL(chunk, len(line), len(chunk) - 2)
        if m is None:
            return self._several(chunk, t_ns, rewriter)
        try:
            content = orjson.loads(m.group(1))
        except orjson.JSONDecodeError:
            # Then the whole chunk is not JSON either: relayed as it came (rewrite cuts
            # nothing it cannot read), not measured.
            return chunk
        self._measure_texts([content], t_ns)
        if rewriter is None or not rewriter.cuts_usage_null:
            return chunk
        at = m.start(2)
        return chunk if at < 0 else chunk[:at] + chunk[m.end(2) :]

    def _several(self, chunk: bytes, t_ns: int, rewriter: EventRewriter | None) -> bytes | None:
        """`_one` for a read of several whole content events: measured in one pass, their
        texts appended as one. Nothing is measured before the whole read is known to
        qualify (else None, and `_take` takes it)."""
        line = self._prefix_line
        assert line is not None
        skip = len(line)
        cut = rewriter is not None and rewriter.cuts_usage_null
        literals: list[bytes] = []
        cuts: list[int] = []
        pos = 0  # where the event starts in the chunk
        # The chunk ends with a blank line (`_one` checked): the last piece is empty. Prefix
        # and tail hold no CR or LF (the regexes admit neither), so an event of the fast
        # shape is one whole piece; a piece that is not (several data lines, a stray LF)
        # makes the read not qualify.
        events = chunk.split(b"\n\n")
        events.pop()
        for ev in events:
            if not ev.startswith(line):
                return None
            m = CONTENT_TAIL(ev, skip)
            if m is None:
                return None
            literals.append(m.group(1))
            # The event's only `,"usage":null` is the one in its tail (id, model and content
            # hold no unescaped quote): the first, the one rewrite cuts.
            if cut and m.start(2) >= 0:
                cuts.append(pos + m.start(2))
                cuts.append(pos + m.end(2))
            pos += len(ev) + 2
        try:
            # All of them in one decode: each is a JSON string literal, unless the read
            # holds an event that is not JSON (relayed uncut, not measured): `_take` then.
            texts: list[str] = orjson.loads(b"[" + b",".join(literals) + b"]")
        except orjson.JSONDecodeError:
            return None
        self._measure_texts(texts, t_ns)
        if not cuts:
            return chunk
        # Keep what lies between the cuts: [0, a1), [b1, a2), ..., [bn, end).
        bounds = [0, *cuts, len(chunk)]
        return b"".join([chunk[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)])

    def _measure_texts(self, texts: list[str], t_ns: int) -> None:
        """The decoded contents of a read's fast events: as `_measure_items` would."""
        try:
            if texts:
                ex = self.ex
                ex.response_id = self._prefix_id
                ex.response_model = self._prefix_model
            text = "".join(texts)
            if text:
                self.parts.append(text)
                self._carried(t_ns, VISIBLE)
        except Exception:  # noqa: BLE001 - as _measure: never reach the relay
            self._failed()

    def _take(self, chunk: bytes, t_ns: int, rewriter: EventRewriter | None) -> list[bytes] | None:
        """`feed` (and, with `rewriter`, the rewritten bytes to relay), with the usual events
        taken without the parser: whole chat content chunks of OpenAI's shape that repeat
        the stream's last prefix, measured and rewritten as on_events and rewrite would."""
        parser = self.parser
        if not self.healthy:
            return self._general(chunk, t_ns, rewriter)
        # 1. Cut the chunk, in order, into the parser's events and fast events (matches).
        items: list[list[SSEEvent] | re.Match[bytes]] = []
        n = len(chunk)
        pos = 0
        carried = 0
        line = self._prefix_line
        if line is None:
            # No content chunk seen yet. A busy proxy reads the stream's first chunks
            # together, a dozen at a time: the events are parsed and measured one block at
            # a time only until one of them sets the prefix; the rest can take the fast path.
            if not parser.nothing_pending() or b"\r" in chunk:
                return self._general(chunk, t_ns, rewriter)
            pos, carried = self._find_prefix(chunk, items)
            line = self._prefix_line  # set by measuring, if a content chunk came
            if not self.healthy or line is None or not parser.at_block_start():
                return self._parsed_rest(chunk, pos, t_ns, rewriter, items, carried)
            measured = len(items)
        else:
            measured = 0
        if not parser.at_block_start():
            # A read ended inside an event: the parser completes that one, the rest of
            # the chunk can still take the fast path.
            pos = parser.pending_block_end(chunk)
            if pos == 0:
                return self._general(chunk, t_ns, rewriter)
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
            m = CONTENT_TAIL(chunk, pos + skip, eol)
            if m is None:
                break
            items.append(m)
            pos = eol + 2
        if pos < n:
            items.append(parser.feed(chunk[pos:]))
        # 2. Measure them in order (those that found the prefix are measured already); a
        # fast event's id and model are those of the prefix it matched (measuring the
        # parser's events may move the prefix on).
        self._measure_items(items[measured:] if measured else items, t_ns, self._prefix_id, self._prefix_model, carried)
        if rewriter is None:
            return None
        # 3. What to relay.
        out: list[bytes] = []
        for item in items:
            if isinstance(item, list):
                out.extend([rewriter.rewrite(ev) for ev in item])
                continue
            start, end = item.pos - skip, item.endpos + 2
            at = item.start(2) if rewriter.cuts_usage_null else -1
            if at >= 0 and not _decodes(item.group(1)):
                at = -1
            # The event's only `,"usage":null` is the one in its tail (id, model and
            # content hold no unescaped quote): the first, the one rewrite cuts.
            out.append(chunk[start:end] if at < 0 else chunk[start:at] + chunk[item.end(2) : end])
        return out

    def _general(self, chunk: bytes, t_ns: int, rewriter: EventRewriter | None) -> list[bytes] | None:
        events = self.feed(chunk, t_ns)
        return None if rewriter is None else [rewriter.rewrite(ev) for ev in events]

    def _find_prefix(self, chunk: bytes, items: list[list[SSEEvent] | re.Match[bytes]]) -> tuple[int, int]:
        """Parse and measure the LF-only `chunk` one block at a time until an event sets
        the prefix (or the blocks run out, or measuring fails), appending each block's
        events to `items`. Returns where it stopped and the flags measured so far: the
        read is timed once, when it has all been measured (as `_measure` would)."""
        parser = self.parser
        pos = 0
        carried = 0
        try:
            while self._prefix_line is None:
                end = chunk.find(b"\n\n", pos)
                if end < 0:
                    break
                events = parser.feed(chunk[pos : end + 2])
                pos = end + 2
                items.append(events)
                if events:
                    carried |= self.on_events(events)
        except Exception:  # noqa: BLE001 - as _measure: never reach the relay
            self._failed()
        return pos, carried

    def _parsed_rest(
        self, chunk: bytes, pos: int, t_ns: int, rewriter: EventRewriter | None,
        items: list[list[SSEEvent] | re.Match[bytes]], carried: int,
    ) -> list[bytes] | None:
        """The rest of a read whose start `_find_prefix` took, through the parser: what
        `_general` does, with the flags of the part already measured."""
        events = self.parser.feed(chunk[pos:]) if pos < len(chunk) else []
        if self.healthy:
            self._measure(events, t_ns, carried)
        if rewriter is None:
            return None
        out = [rewriter.rewrite(ev) for item in items if isinstance(item, list) for ev in item]
        out.extend([rewriter.rewrite(ev) for ev in events])
        return out

    def _measure_items(
        self, items: list[list[SSEEvent] | re.Match[bytes]], t_ns: int, prefix_id: str, prefix_model: str,
        carried: int = 0,
    ) -> None:
        ex = self.ex
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

    def _measure(self, events: list[SSEEvent], t_ns: int, carried: int = 0) -> None:
        """Measure the events one chunk completed (`carried`: the flags of the chunk's
        events measured before them)."""
        # A bug or a surprise in measuring must never reach the relay: stop measuring this
        # stream, say so once, and let the bytes flow on.
        try:
            flags = carried | self.on_events(events)
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
                    tail = CONTENT_TAIL(data, len(prefix))
                    if tail is not None:
                        literal = tail.group(1)
                else:
                    m = CHAT_CONTENT_CHUNK(data)
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
