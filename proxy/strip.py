"""Undoing Tollgate's own `stream_options.include_usage` injection, event by event. Pure.

Also the shape every stream rewriter has (`EventRewriter`): the relay hands it whole events
and writes what it returns instead.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar, Protocol

import orjson

from proxy.sse import SSEEvent

log = logging.getLogger("tollgate.measure")

# The member OpenAI adds to every chunk but the usage chunk when asked for usage, as it writes
# it (with the comma before it): what `UsageStripper` cuts from its compact bytes.
USAGE_NULL = b',"usage":null'


class EventRewriter(Protocol):
    """What the relay writes instead of each whole event of a stream it rewrites."""

    # Whether the `,"usage":null` of an OpenAI content chunk is cut: the tap's fast path
    # (measure.StreamTap) relays those chunks without calling `rewrite`.
    cuts_usage_null: ClassVar[bool]

    def rewrite(self, ev: SSEEvent) -> bytes: ...


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
    cuts_usage_null: ClassVar[bool] = True

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
            at = raw.find(USAGE_NULL)
            if at >= 0:
                return raw[:at] + raw[at + len(USAGE_NULL) :]
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


def data_lines(raw: bytes) -> list[tuple[int, int, int, int]]:
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
    lines = data_lines(raw)
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
        after = orjson.loads(b"\n".join([result[s:e] for _, s, e, _ in data_lines(result)]))
    except orjson.JSONDecodeError:
        return raw
    expected = dict(payload)
    del expected["usage"]
    return result if after == expected else raw
