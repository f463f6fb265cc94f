"""Incremental Server-Sent Events parser (pure, no I/O).

The relay feeds every upstream chunk through `SSEParser.feed` and gets back the blocks that
chunk completed. Parsing follows the WHATWG "event stream interpretation" rules (LF, CRLF and
CR line endings, `:` comments, a field with no colon, one leading space after the colon
stripped, data lines joined with LF, a leading BOM ignored), with two deliberate differences
that suit a relay rather than a browser:

* Every block is returned, even one without data (comment-only keep-alives, stray blank lines),
  and `raw` keeps its exact bytes, so that concatenating `raw` over all events returned by
  `feed` and `flush` reproduces the input exactly. A relay can therefore hold back a partial
  event, drop one it injected, and still write the upstream's bytes unchanged.
* `id` and `event` are per block (None when the block lacks them), not the spec's sticky
  "last event ID" state; callers that care can carry it themselves.

A CR ending one chunk and an LF starting the next are one line ending. The block is returned as
soon as its blank line is seen (waiting for the next chunk could hold a token back for seconds),
so in that one case the LF that completes the CRLF is carried at the start of the *next* block's
`raw` and skipped when parsing it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_DONE = b"[DONE]"


@dataclass(slots=True, frozen=True)
class SSEEvent:
    raw: bytes
    data: bytes | None
    event: str | None
    id: str | None
    retry: int | None

    @property
    def is_done(self) -> bool:
        return self.data == _DONE


class SSEParser:
    __slots__ = (
        "_buf",
        "_scan",
        "_searched",
        "_skip_lf",
        "_bom_checked",
        "_data",
        "_event",
        "_id",
        "_retry",
    )

    def __init__(self) -> None:
        # Bytes of the current, incomplete block; completed blocks are cut off after each feed.
        self._buf = bytearray()
        # Start of the first line of the current block not yet interpreted.
        self._scan = 0
        # Everything before this offset is known to hold no CR/LF after `_scan`; keeps tiny
        # chunks of a long line from rescanning it (linear, not quadratic).
        self._searched = 0
        self._skip_lf = False
        self._bom_checked = False
        self._reset_fields()

    def _reset_fields(self) -> None:
        self._data: list[bytes] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        if not self._bom_checked:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return []
            self._bom_checked = True
            if buf.startswith(_BOM):
                self._scan = self._searched = len(_BOM)
        return self._process()

    def flush(self) -> list[SSEEvent]:
        """End of stream: return what is left (an unterminated block) as one event, and reset."""
        buf = self._buf
        if not buf:
            self._reset_stream()
            return []
        pos = self._scan
        if self._skip_lf and pos < len(buf) and buf[pos] == _LF:
            pos += 1
        if pos < len(buf):
            # Only a final line without its line ending can remain here.
            self._field(bytes(buf[pos:]))
        event = self._dispatch(bytes(buf))
        self._reset_stream()
        return [event]

    def _reset_stream(self) -> None:
        self._buf = bytearray()
        self._scan = self._searched = 0
        self._skip_lf = False
        self._bom_checked = False
        self._reset_fields()

    def _process(self) -> list[SSEEvent]:
        buf = self._buf
        n = len(buf)
        pos = self._scan
        if self._skip_lf:
            if pos < n and buf[pos] == _LF:
                pos += 1
            self._skip_lf = False
        search_from = max(pos, self._searched)
        lf = buf.find(b"\n", search_from)
        cr = buf.find(b"\r", search_from)
        start = 0
        events: list[SSEEvent] = []
        while lf != -1 or cr != -1:
            if cr == -1 or (lf != -1 and lf < cr):
                eol = lf
                nxt = lf + 1
            else:
                eol = cr
                if cr + 1 < n:
                    nxt = cr + 2 if buf[cr + 1] == _LF else cr + 1
                else:
                    nxt = n
                    self._skip_lf = True
            if eol == pos:
                events.append(self._dispatch(bytes(buf[start:nxt])))
                start = nxt
            else:
                self._field(bytes(buf[pos:eol]))
            pos = nxt
            if lf != -1 and lf < pos:
                lf = buf.find(b"\n", pos)
            if cr != -1 and cr < pos:
                cr = buf.find(b"\r", pos)
        if start:
            del buf[:start]
        self._scan = pos - start
        self._searched = n - start
        return events

    def _field(self, line: bytes) -> None:
        colon = line.find(b":")
        if colon == 0:
            return  # comment / keep-alive
        if colon < 0:
            name = line
            value = b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            # The spec ignores an id containing NUL.
            if b"\x00" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():  # bytes.isdigit is ASCII-only, as the spec requires
                self._retry = int(value)

    def _dispatch(self, raw: bytes) -> SSEEvent:
        data = self._data
        event = SSEEvent(
            raw=raw,
            data=None if data is None else (data[0] if len(data) == 1 else b"\n".join(data)),
            event=self._event,
            id=self._id,
            retry=self._retry,
        )
        self._reset_fields()
        return event
