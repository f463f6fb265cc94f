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
from collections.abc import Callable
from typing import Any

import orjson

from proxy.content_shape import ContentShape, learn
from proxy.exchange import Exchange
from proxy.output import (
    REASONING,
    VISIBLE,
    note_finish_reason,
    note_response_identity,
    output_of_payload,
)
from proxy.sse import SSEEvent, SSEParser
from proxy.strip import USAGE_NULL, EventRewriter
from proxy.usage import usage_from_stream_payload

log = logging.getLogger("tollgate.measure")

# A fast event in a read: where it starts, where its content literal ends, where it ends
# (after its blank line), and its decoded content.
_Fast = tuple[int, int, int, str]
_USAGE_NULL_LEN = len(USAGE_NULL)
# The longest partial event the tap holds across reads itself; a longer one goes to the
# parser, which scans a long line once rather than again at every read.
_MAX_CARRY = 16384


class StreamTap:
    """Measures an SSE response as its chunks pass by.

    Each chunk comes with the monotonic time it was read from upstream: `feed` (the events
    it completed), `tap` (the relay wrote it already) or `strip` (what to relay instead,
    through a UsageStripper). A chunk counts once for timing even if it holds several
    output-carrying events (the gap histogram is per chunk). `tap` and `strip` take the
    stream's plain content chunks without the SSE parser or a JSON decode of the whole
    chunk, once the parser has decoded one (`content_shape`); what they measure and relay
    is exactly what `feed` and `rewrite` would give.
    """

    __slots__ = ("_carry", "_first_token_cb", "_shape", "ex", "healthy", "parser", "parts")

    def __init__(self, ex: Exchange, on_first_token: Callable[[Exchange], None]) -> None:
        self.ex = ex
        self.parser = SSEParser()
        self.parts = ex.output_text
        self.healthy = True
        self._first_token_cb = on_first_token
        # The bytes the stream's plain content chunks share, once one has been decoded.
        self._shape: ContentShape | None = None
        # The start of an event of that shape, held until a later read ends its data line
        # (never given to the parser, which is then at a block start).
        self._carry = b""

    def feed(self, chunk: bytes, t_ns: int) -> list[SSEEvent]:
        events = self.parser.feed(chunk)
        if events and self.healthy:
            self._measure(events, t_ns)
        return events

    def tap(self, chunk: bytes, t_ns: int) -> None:
        """`feed` for a relay that has written the chunk already and needs no events back."""
        carry = self._carry
        if carry:
            chunk = carry + chunk
            self._carry = b""
        if self._one(chunk, t_ns, None) is None:
            self._take(chunk, t_ns, None)

    def strip(self, chunk: bytes, t_ns: int, rewriter: EventRewriter) -> bytes:
        """`feed`, then the bytes `rewriter.rewrite` makes of the events: what to relay."""
        carry = self._carry
        if carry:
            chunk = carry + chunk
            self._carry = b""
        one = self._one(chunk, t_ns, rewriter)
        if one is not None:
            return one
        out = self._take(chunk, t_ns, rewriter)
        assert out is not None
        return out[0] if len(out) == 1 else b"".join(out)

    def _one(self, chunk: bytes, t_ns: int, rewriter: EventRewriter | None) -> bytes | None:
        """`_take` for the reads nearly every stream is made of: content events of the
        stream's shape, one (a read per chunk) or several (a busy proxy reads several chunks
        at once), perhaps followed by others, or by the start of one the next read ends.
        What to relay (the read itself when nothing is cut), or None when the read starts
        otherwise: `_take` then takes it."""
        shape = self._shape
        if shape is None or not chunk.startswith(shape.line):
            return None
        cut = rewriter is not None and rewriter.cuts_usage_null
        if not self.healthy or not self.parser.at_block_start() or (cut and not shape.strippable):
            return None
        tail = b""
        if not chunk.endswith(b"\n\n"):
            # The read ends inside an event, on its data line: held back until a read ends
            # the line (the parser would hold it too), so that event can be taken here.
            done = max(chunk.rfind(b"\n\n") + 2, 0)
            tail = chunk[done:]
            if len(tail) > _MAX_CARRY or b"\n" in tail or b"\r" in tail:
                return None
            if not done:
                self._carry = tail
                return b""
            chunk = chunk[:done]
        start = len(shape.line)
        end = len(chunk) - 2
        if chunk.find(b"\n", start, end) >= 0:
            out = self._several(chunk, t_ns, shape, rewriter, cut)
        else:
            match = shape.match(chunk, start, end)
            if match is None:
                return None  # `_take` and the parser decide
            at, content = match
            self._measure_texts(content, t_ns, shape, [])
            out = chunk
            if cut and shape.cut_line >= 0:
                out = chunk[: shape.cut_line] + chunk[shape.cut_line + _USAGE_NULL_LEN :]
            elif cut and shape.cut_mid >= 0:
                c = at + shape.cut_mid
                out = chunk[:c] + chunk[c + _USAGE_NULL_LEN :]
        if out is not None and tail:
            self._carry = tail
        return out

    def _several(
        self, chunk: bytes, t_ns: int, shape: ContentShape, rewriter: EventRewriter | None, cut: bool
    ) -> bytes | None:
        """`_one` for a read of several whole events: the leading run of the shape's
        content events measured in one pass, their texts appended as one; the events after
        it (the stream's finish and usage chunks, say) through the parser. Nothing is
        measured before the run is known to decode (else None, and `_take` takes it)."""
        line = shape.line
        skip = len(line)
        lm = len(shape.mid)
        obfuscated = shape.obfuscated
        cut_line, cut_mid = (shape.cut_line, shape.cut_mid) if cut else (-1, -1)
        literals: list[bytes] = []
        cuts: list[int] = []
        pos = 0  # where the event starts in the chunk
        # The chunk ends with a blank line (`_one` checked): the last piece is empty. An
        # event of the shape holds no LF (line and mid hold none, a literal cannot), so it
        # is one whole piece; the run ends at the first piece that is not one.
        events = chunk.split(b"\n\n")
        events.pop()
        for ev in events:
            if not ev.startswith(line):
                break
            at = shape.literal_end(ev, skip, len(ev))
            if at < 0:
                break
            literals.append(ev[skip:at])
            if obfuscated:
                literals.append(ev[at + lm : -1])
            if cut_line >= 0:
                cuts.append(pos + cut_line)
            elif cut_mid >= 0:
                cuts.append(pos + at + cut_mid)
            pos += len(ev) + 2
        if not pos:
            return None
        try:
            # All of them in one decode. Joined by LF (raw, it cannot sit inside a JSON
            # string) and a comma, quote-bounded pieces that decode to as many values are
            # one string literal each.
            texts: list[str] = orjson.loads(b"[" + b"\n,".join(literals) + b"]")
        except orjson.JSONDecodeError:
            return None
        if len(texts) != len(literals):
            return None
        rest = self.parser.feed(chunk[pos:]) if pos < len(chunk) else []
        self._measure_texts("".join(texts[::2] if obfuscated else texts), t_ns, shape, rest)
        if rewriter is None:
            return chunk
        out = chunk if pos == len(chunk) else chunk[:pos]
        if cuts:
            # Keep what lies between the cuts: [0, a1), [a1 + 13, a2), ..., [an + 13, end).
            parts = [out[: cuts[0]]]
            for i in range(1, len(cuts)):
                parts.append(out[cuts[i - 1] + _USAGE_NULL_LEN : cuts[i]])
            parts.append(out[cuts[-1] + _USAGE_NULL_LEN :])
            out = b"".join(parts)
        if rest:
            out += b"".join([rewriter.rewrite(ev) for ev in rest])
        return out

    def _measure_texts(self, text: str, t_ns: int, shape: ContentShape, rest: list[SSEEvent]) -> None:
        """The decoded content of a read's fast events, then the parser's events that came
        after them in the read: as `_measure_items` would, the read timed once."""
        try:
            flags = self._took(text, shape)
            if rest:
                flags |= self.on_events(rest)
            if flags:
                self._carried(t_ns, flags)
        except Exception:  # noqa: BLE001 - as _measure: never reach the relay
            self._failed()

    def _took(self, content: str, shape: ContentShape) -> int:
        """What decoding a fast event whole would note: its content, and the shape's id and
        model (those of the chunk it was learned from, byte for byte the same). Its flags."""
        ex = self.ex
        if shape.response_id is not None:
            ex.response_id = shape.response_id
        if shape.response_model is not None:
            ex.response_model = shape.response_model
        if content:
            self.parts.append(content)
            return VISIBLE
        return 0

    def _take(self, chunk: bytes, t_ns: int, rewriter: EventRewriter | None) -> list[bytes] | None:
        """`feed` (and, with `rewriter`, the rewritten bytes to relay), with the events of
        the stream's shape taken without the parser, measured and rewritten as on_events
        and rewrite would."""
        parser = self.parser
        if not self.healthy:
            return self._general(chunk, t_ns, rewriter)
        cut = rewriter is not None and rewriter.cuts_usage_null
        # 1. Cut the chunk, in order, into the parser's events and fast events.
        items: list[list[SSEEvent] | _Fast] = []
        n = len(chunk)
        pos = 0
        carried = 0
        shape = self._shape
        if shape is None:
            # No content chunk decoded yet. A busy proxy reads the stream's first chunks
            # together, a dozen at a time: the events are parsed and measured one block at
            # a time only until one of them gives the shape; the rest can take the fast path.
            if not parser.nothing_pending() or b"\r" in chunk:
                return self._general(chunk, t_ns, rewriter)
            pos, carried = self._find_shape(chunk, items)
            shape = self._shape  # set by measuring, if a content chunk came
            if not self.healthy or shape is None or not parser.at_block_start() or (cut and not shape.strippable):
                return self._parsed_rest(chunk, pos, t_ns, rewriter, items, carried)
            measured = len(items)
        else:
            if cut and not shape.strippable:
                return self._general(chunk, t_ns, rewriter)
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
        line = shape.line
        skip = len(line)
        while chunk.startswith(line, pos):
            # Line and mid hold no CR or LF: the first LF after the line must end the data
            # line, and a second one the event.
            eol = chunk.find(b"\n", pos + skip)
            if eol < 0 or eol + 1 >= n or chunk[eol + 1] != 0x0A:
                break
            match = shape.match(chunk, pos + skip, eol)
            if match is None:
                break  # the parser decides what it is
            items.append((pos, match[0], eol + 2, match[1]))
            pos = eol + 2
        if pos < n:
            rest = chunk[pos:]
            if (
                parser.at_block_start() and len(rest) <= _MAX_CARRY and rest.startswith(line)
                and b"\n" not in rest and b"\r" not in rest
            ):
                self._carry = rest  # the start of an event of the shape: as `_one` holds it
            else:
                items.append(parser.feed(rest))
        # 2. Measure them in order (those that found the shape are measured already); a
        # fast event's id and model are those of the shape it matched (measuring the
        # parser's events may learn another).
        self._measure_items(items[measured:] if measured else items, t_ns, shape, carried)
        if rewriter is None:
            return None
        # 3. What to relay.
        cut_line, cut_mid = (shape.cut_line, shape.cut_mid) if cut else (-1, -1)
        out: list[bytes] = []
        for item in items:
            if isinstance(item, list):
                out.extend([rewriter.rewrite(ev) for ev in item])
                continue
            start, at, end, _ = item
            c = start + cut_line if cut_line >= 0 else (at + cut_mid if cut_mid >= 0 else -1)
            out.append(chunk[start:end] if c < 0 else chunk[start:c] + chunk[c + _USAGE_NULL_LEN : end])
        return out

    def _general(self, chunk: bytes, t_ns: int, rewriter: EventRewriter | None) -> list[bytes] | None:
        events = self.feed(chunk, t_ns)
        return None if rewriter is None else [rewriter.rewrite(ev) for ev in events]

    def _find_shape(self, chunk: bytes, items: list[list[SSEEvent] | _Fast]) -> tuple[int, int]:
        """Parse and measure the LF-only `chunk` one block at a time until an event gives
        the shape (or the blocks run out, or measuring fails), appending each block's
        events to `items`. Returns where it stopped and the flags measured so far: the
        read is timed once, when it has all been measured (as `_measure` would)."""
        parser = self.parser
        pos = 0
        carried = 0
        try:
            while self._shape is None:
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
        items: list[list[SSEEvent] | _Fast], carried: int,
    ) -> list[bytes] | None:
        """The rest of a read whose start `_find_shape` took, through the parser: what
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
        self, items: list[list[SSEEvent] | _Fast], t_ns: int, shape: ContentShape, carried: int = 0
    ) -> None:
        try:
            for item in items:
                if isinstance(item, list):
                    if item:
                        carried |= self.on_events(item)
                    continue
                carried |= self._took(item[3], shape)
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
        carry = self._carry
        if carry:
            # An event the stream never ended: the parser's, as if it had held it all along.
            self._carry = b""
            events = self.parser.feed(carry)
            events += self.parser.flush()
        else:
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
            shape = self._shape
            if chat and shape is not None and data.startswith(shape.prefix):
                match = shape.match(data, len(shape.prefix), len(data))
                if match is not None:  # else the whole decode below decides what it is
                    carried |= self._took(match[1], shape)
                    continue
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # relayed unchanged; nothing to measure in it
            if not isinstance(payload, dict):
                continue
            carried |= output_of_payload(ex.endpoint, ev.event, payload, self.parts)
            self._note_metadata(payload)
            if chat:
                learned = learn(ev, payload)
                if learned is not None:
                    self._shape = learned
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
