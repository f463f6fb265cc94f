"""The bytes a stream's plain content chunks share, learned from one the parser decoded. Pure.

Nearly every event of a chat stream is a content chunk that differs from the one before only
in its content literal (and, from OpenAI since 2025, in an `"obfuscation"` padding string):
id, created, model and the rest repeat byte for byte. Once the parser has decoded one such
chunk and found it to carry nothing but its content, id and model (`learn`), later chunks are
matched against its bytes (`literal_end`) and only their literals are decoded. The shape is
learned, not written down, so OpenAI's current chunks (no `logprobs`, an obfuscation string),
its older ones (`"logprobs":null`), llama-server's (content first, id and model after it) and
Ollama's (the role on every chunk) all take the fast path, in whatever key order the upstream
writes.

Why a match measures exactly what the parser would: the chunk is the learned chunk's bytes
with one JSON string literal in the content's place (and one in the obfuscation's). A string
literal cannot hold a raw quote, CR or LF, so it cannot reach into the bytes around it; the
rest of the chunk, byte for byte the learned one, holds no key the measuring reads but id and
model (`learn` checks that). Callers decode each literal and reject the chunk unless it is
exactly one string (`literal_end` checks it starts and ends with a quote).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.sse import SSEEvent
from proxy.strip import USAGE_NULL, UsageStripper

# What a plain content chunk may hold besides its one choice: nothing the measuring reads but
# id and model. (`usage` only as null, which UsageStripper may cut; `obfuscation` only as the
# last key, a string that varies per chunk.)
_TOP_LEVEL = frozenset(
    {"id", "object", "created", "model", "service_tier", "system_fingerprint", "choices", "usage", "obfuscation"}
)
_CHOICE = frozenset({"index", "delta", "logprobs", "finish_reason"})
# Ollama and TGI repeat the role on every chunk; the measuring does not read it.
_DELTA = frozenset({"content", "role"})
_OBFUSCATION = b'"obfuscation":'


@dataclass(frozen=True, slots=True)
class ContentShape:
    """A content chunk's bytes around its content literal.

    An event of this shape is `line`, a string literal, then `mid`; then, when `obfuscated`,
    another string literal and `}`. `line` is the data line's start (`data: ` and the JSON up
    to the literal), `prefix` the same without `data: `. `cut_line` / `cut_mid`: where
    UsageStripper cuts the 13 bytes of `,"usage":null` (an offset into `line` or `mid`, -1
    when elsewhere or absent); `strippable` is False when its cut is not that one (the fast
    path then leaves a stripped stream's chunks to the parser).
    """

    line: bytes
    prefix: bytes
    mid: bytes
    obfuscated: bool
    response_id: str | None
    response_model: str | None
    cut_line: int
    cut_mid: int
    strippable: bool

    def literal_end(self, buf: bytes, start: int, end: int) -> int:
        """Where the content literal that starts at `start` ends, if `buf[start:end]` (an
        event's data after `prefix`) has this shape around it; else -1. The literal (and
        an obfuscation literal, `buf[at + len(mid) : end - 1]`) are the caller's to decode."""
        mid = self.mid
        if self.obfuscated:
            if not buf.endswith(b'"}', start, end):
                return -1
            at = buf.rfind(b'"', start, end - 2) - len(mid)
        else:
            at = end - len(mid)
        if at <= start or not buf.startswith(mid, at) or buf[start] != 0x22 or buf[at - 1] != 0x22:
            return -1
        return at

    def match(self, buf: bytes, start: int, end: int) -> tuple[int, str] | None:
        """`literal_end` and the decode of the literals: where the content literal ends and
        the content, if `buf[start:end]` has this shape around one string literal (and one
        obfuscation literal); else None, and the parser decides what the event is."""
        at = self.literal_end(buf, start, end)
        if at < 0:
            return None
        try:
            content: str = orjson.loads(buf[start:at])
            if self.obfuscated:
                orjson.loads(buf[at + len(self.mid) : end - 1])
        except orjson.JSONDecodeError:
            return None
        return at, content


def _identity(value: Any) -> bool:
    return value is None or type(value) is str


def learn(ev: SSEEvent, payload: dict[str, Any]) -> ContentShape | None:
    """The shape of `ev` (its decoded data: `payload`), if it is a plain content chunk written
    on one data line: one choice whose delta is a content string (and perhaps the role), no
    finish reason, logprobs or usage, nothing else the measuring reads. None for any other
    event, or when the content literal cannot be found in the bytes as orjson writes it."""
    choices = payload.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict or not _DELTA.issuperset(delta) or not _identity(delta.get("role")):
        return None
    content = delta.get("content")
    if type(content) is not str:
        return None
    if not (_TOP_LEVEL.issuperset(payload) and _CHOICE.issuperset(choice)):
        return None
    if payload.get("usage") is not None or choice.get("finish_reason") is not None:
        return None
    if choice.get("logprobs") is not None:
        return None
    # Only strings (or null) where a nested `"content":` could hide: the one found below is
    # then the delta's.
    rid, model = payload.get("id"), payload.get("model")
    if not (_identity(rid) and _identity(model) and _identity(payload.get("object"))):
        return None
    if not (_identity(payload.get("service_tier")) and _identity(payload.get("system_fingerprint"))):
        return None
    if type(payload.get("created", 0)) is not int:
        return None
    data, raw = ev.data, ev.raw
    if data is None or raw != b"data: " + data + b"\n\n":
        return None
    literal = orjson.dumps(content)
    key = b'"content":' + literal
    at = data.find(key)
    if at < 0 or data.find(key, at + 1) >= 0:
        return None
    start = at + len(b'"content":')
    prefix, suffix = data[:start], data[start + len(literal) :]
    obfuscation = payload.get("obfuscation")
    obfuscated = obfuscation is not None
    if obfuscated:
        if type(obfuscation) is not str:
            return None
        tail = orjson.dumps(obfuscation) + b"}"
        if not suffix.endswith(_OBFUSCATION + tail):
            return None
        mid = suffix[: -len(tail)]
    else:
        mid = suffix
    line = b"data: " + prefix
    cut_line = cut_mid = -1
    strippable = True
    if "usage" in payload:
        # The cut UsageStripper makes (the first `,"usage":null`), found in the bytes that
        # repeat, and checked against the stripper itself rather than argued.
        cut = raw.find(USAGE_NULL)
        if 0 <= cut and cut + len(USAGE_NULL) <= len(line):
            cut_line = cut
        elif cut >= len(line) + len(literal) and cut + len(USAGE_NULL) <= len(line) + len(literal) + len(mid):
            cut_mid = cut - len(line) - len(literal)
        strippable = (cut_line >= 0 or cut_mid >= 0) and (
            UsageStripper().rewrite(ev) == raw[:cut] + raw[cut + len(USAGE_NULL) :]
        )
    return ContentShape(line, prefix, mid, obfuscated, rid, model, cut_line, cut_mid, strippable)
