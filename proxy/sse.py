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

__all__ = ["SSEEvent", "SSEParser"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_DONE = b"[DONE]"


class SSEEvent:
    """One block of the stream. Immutable by convention; a plain slots class because the
    relay makes one per upstream event and a frozen dataclass's __init__ costs several times
    as much."""

    __slots__ = ("data", "event", "id", "raw", "retry")

    def __init__(
        self, raw: bytes, data: bytes | None, event: str | None, id: str | None, retry: int | None
    ) -> None:
        self.raw = raw
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry

    @property
    def is_done(self) -> bool:
        return self.data == _DONE

    def _key(self) -> tuple[bytes, bytes | None, str | None, str | None, int | None]:
        return (self.raw, self.data, self.event, self.id, self.retry)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not SSEEvent:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"SSEEvent(raw={self.raw!r}, data={self.data!r}, event={self.event!r}, "
            f"id={self.id!r}, retry={self.retry!r})"
        )


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

    def pending_block_end(self, chunk: bytes) -> int:
        """With part of a block pending and no CR in sight: how many leading bytes of `chunk`
        complete it (feeding those gives exactly that block and leaves the parser at a
        block start). 0 when it does not end in `chunk` or the case is not that simple."""
        buf = self._buf
        if not buf or self._skip_lf or not self._bom_checked or b"\r" in buf or b"\r" in chunk:
            return 0
        # The pending bytes hold no blank line (it would have ended the block): the first
        # one across the boundary ends it.
        if buf[-1] == _LF and chunk[:1] == b"\n":
            return 1
        blank = chunk.find(b"\n\n")
        return 0 if blank < 0 else blank + 2

    def nothing_pending(self) -> bool:
        """No part of a block or line ending held: the next byte starts a block (or the
        stream, whose BOM `feed` still checks)."""
        return not self._buf and not self._skip_lf

    def at_block_start(self) -> bool:
        """Nothing pending: a chunk holding one whole LF-only block would come back from
        `feed` as exactly that block, leaving the parser as it is now."""
        return not self._buf and self._bom_checked and not self._skip_lf

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        buf = self._buf
        if self._bom_checked and not self._skip_lf and b"\r" not in chunk:
            return self._feed_lf(chunk)
        buf += chunk
        if not self._bom_checked:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return []
            self._bom_checked = True
            if buf.startswith(_BOM):
                self._scan = self._searched = len(_BOM)
        return self._process()

    def _feed_lf(self, chunk: bytes) -> list[SSEEvent]:
        """`feed` for a chunk with no CR, where OpenAI-style upstreams spend nearly all their
        chunks: whole `data: ...` LF LF blocks are cut straight out of the chunk; only a
        block begun in an earlier chunk, a block of another shape and an unfinished last
        block go through `_process`. Gives exactly what `_process` alone would."""
        buf = self._buf
        n = len(chunk)
        pos = 0
        events: list[SSEEvent] = []
        if buf:
            # Finish the pending block first: with no CR, it ends at the first blank line.
            if buf[-1] == _LF and chunk[0] == _LF:
                end = 1
            else:
                blank = chunk.find(b"\n\n")
                if blank == -1 or b"\r" in buf:
                    buf += chunk
                    return self._process()
                end = blank + 2
            if (
                self._scan == 0
                and self._data is None
                and self._event is None
                and self._id is None
                and self._retry is None
                and buf.startswith(b"data: ")
                and chunk.find(b"\n") == end - 2
            ):
                # The pending bytes are the start of one `data: ` line (no line of the
                # block is complete yet) that this chunk's first LF ends, and a blank line
                # follows at once: one data event, as `_process` would make it.
                raw = bytes(buf) + chunk[:end]
                events = [SSEEvent(raw, raw[6:-2], None, None, None)]
                buf.clear()
                self._searched = 0
            else:
                buf += chunk[:end]
                events = self._process()
            pos = end
        elif chunk.startswith(b"data: ") and chunk.find(b"\n") == n - 2 and chunk[-1] == _LF:
            return [SSEEvent(chunk, chunk[6:-2], None, None, None)]  # the usual: one event
        while pos < n:
            if not chunk.startswith(b"data: ", pos):
                break
            eol = chunk.find(b"\n", pos)
            if eol == -1 or eol + 1 >= n or chunk[eol + 1] != _LF:
                break
            events.append(SSEEvent(chunk[pos : eol + 2], chunk[pos + 6 : eol], None, None, None))
            pos = eol + 2
        if pos < n:
            # At a block boundary: the general parser takes the rest from a clean state.
            self._buf += chunk[pos:]
            events += self._process()
        return events

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
