"""The exact-match response cache's rules: which requests may be served from it, the key
an entry is filed under, what an entry holds, and the RFC 9211 `Cache-Status` value. Pure:
the stores are in proxy/cache_store.py, the lookup and replay in proxy/cached.py.

What may be cached (README "Response cache"): a chat or text completion that is
deterministic (an explicit `temperature: 0` and at most one choice), any embeddings request,
or any request on those endpoints whose client opts in with `x-tollgate-cache: on`. A
client bypasses the cache with `x-tollgate-cache: off` or `Cache-Control: no-store`
(neither read nor written) or `Cache-Control: no-cache` (not read; the fresh answer is
stored). The Responses API is never cached: its responses are stored objects upstream,
named by ids a later request may refer to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from proxy.usage import TokenSource, Usage

CACHE_NAME = "tollgate"
OPT_HEADER = "x-tollgate-cache"

Scope = Literal["key", "user", "team", "global"]
# Why a request went upstream, as RFC 9211's `fwd` names it: `bypass` (the cache does not
# handle it: not deterministic, an endpoint it does not cache), `request` (the client's
# Cache-Control or x-tollgate-cache said so), `uri-miss` (no entry under its key).
Forward = Literal["bypass", "request", "uri-miss"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the cache does with one request: look it up, store its answer, or neither."""

    key: str
    lookup: bool
    store: bool
    fwd: Forward


def _cache_control(value: str) -> set[str]:
    return {d.split("=", 1)[0].strip().lower() for d in value.split(",") if d.strip()}


def deterministic(endpoint: str, payload: Mapping[str, Any]) -> bool:
    """A request whose answer is the same every time it is asked: embeddings, or a
    completion with an explicit temperature 0 and one choice. OpenAI's default temperature
    is 1, so a completion that sets none is sampled, not deterministic."""
    if endpoint == "embeddings":
        return True
    temperature = payload.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != 0:
        return False
    n = payload.get("n", 1)
    best_of = payload.get("best_of", 1)
    return n in (1, None) and best_of in (1, None)


def scope_id(scope: Scope, key_name: str | None, credential: str | None, user: str | None, team: str | None) -> str:
    """Who shares entries. Without virtual keys the client's own credential stands for its
    key (hashed: never stored), so two clients with different upstream keys never share."""
    if key_name is not None:
        key_part = "key:" + key_name
    else:
        key_part = "cred:" + hashlib.sha256((credential or "").encode()).hexdigest()
    if scope == "global":
        return "global"
    if scope == "team":
        return "team:" + team if team is not None else key_part
    if scope == "user":
        return key_part + "\x00user:" + (user or "")
    return key_part


def cache_key(
    endpoint: str,
    upstream: str,
    upstream_model: str | None,
    scope: str,
    payload: Mapping[str, Any],
    stripped_usage: bool,
) -> str:
    """The entry's key: sha256 over the routing, the scope and the canonical body (the parsed
    JSON with sorted keys, so whitespace and key order do not matter). No body field is left
    out: anything the client sent may change the answer (`user` included). `stripped_usage`:
    the stream the client gets has Tollgate's usage injection undone, so it differs from the
    stream of a client that asked for usage itself."""
    h = hashlib.sha256()
    for part in (endpoint, upstream, upstream_model or "", scope, "strip" if stripped_usage else "as-is"):
        h.update(part.encode())
        h.update(b"\x00")
    h.update(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()


def plan(
    endpoint: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str],
    endpoints: tuple[str, ...],
    key: str,
) -> Plan:
    """What to do with a request whose key is `key`, given its body and headers."""
    opt = headers.get(OPT_HEADER, "").strip().lower()
    control = _cache_control(headers.get("Cache-Control", ""))
    if opt == "off" or "no-store" in control:
        return Plan(key, lookup=False, store=False, fwd="request")
    if endpoint not in endpoints or not (opt == "on" or deterministic(endpoint, payload)):
        return Plan(key, lookup=False, store=False, fwd="bypass")
    if "no-cache" in control:
        return Plan(key, lookup=False, store=True, fwd="request")
    return Plan(key, lookup=True, store=True, fwd="uri-miss")


def hit_status(ttl_seconds: float) -> str:
    return f"{CACHE_NAME}; hit; ttl={max(0, int(ttl_seconds))}"


def forward_status(fwd: Forward, upstream_status: int, stored: bool) -> str:
    return f"{CACHE_NAME}; fwd={fwd}; fwd-status={upstream_status}" + ("; stored" if stored else "")


# --------------------------------------------------------------------------- entries

_USAGE_FIELDS = (
    "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens", "cache_write_tokens",
    "web_search_calls", "file_search_calls",
)  # fmt: skip
_SOURCES: frozenset[str] = frozenset({"upstream", "estimated", "estimated_lower_bound", "estimated_upper_bound"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response: the bytes the client got, chunk by chunk as they were written
    (a replayed stream keeps the original chunking), and the usage it was billed for (what
    a hit saves)."""

    content_type: str
    chunks: tuple[bytes, ...]
    usage: Usage | None = None
    status: int = 200

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def is_sse(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def encode(self) -> bytes:
        """A JSON head line (orjson never writes a raw newline), then the chunks back to back."""
        usage = None
        if self.usage is not None:
            usage = {name: getattr(self.usage, name) for name in _USAGE_FIELDS}
            usage["input_source"] = self.usage.input_source
            usage["output_source"] = self.usage.output_source
        head = {"v": 1, "status": self.status, "ct": self.content_type, "lens": [len(c) for c in self.chunks], "usage": usage}
        return orjson.dumps(head) + b"\n" + b"".join(self.chunks)

    @classmethod
    def decode(cls, blob: bytes) -> Entry | None:
        """The entry, or None for anything that is not one this version wrote whole."""
        nl = blob.find(b"\n")
        if nl < 0:
            return None
        try:
            head = orjson.loads(blob[:nl])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(head, dict) or head.get("v") != 1:
            return None
        lens, ct, status = head.get("lens"), head.get("ct"), head.get("status")
        if not isinstance(lens, list) or not isinstance(ct, str) or not isinstance(status, int):
            return None
        if not all(isinstance(n, int) and n >= 0 for n in lens) or sum(lens) != len(blob) - nl - 1:
            return None
        chunks, at = [], nl + 1
        for n in lens:
            chunks.append(blob[at : at + n])
            at += n
        return cls(ct, tuple(chunks), _usage_of(head.get("usage")), status)


def _usage_of(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    counts: dict[str, int] = {}
    for name in _USAGE_FIELDS:
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
        counts[name] = value
    inp, out = raw.get("input_source"), raw.get("output_source")
    if inp not in _SOURCES or out not in _SOURCES:
        return None
    input_source: TokenSource = inp
    output_source: TokenSource = out
    return Usage(**counts, input_source=input_source, output_source=output_source)


@dataclass(slots=True)
class Recorder:
    """Collects the bytes a client is sent for a response that may be stored; gives up
    (and holds nothing more) once they pass `limit` or the response is not a 200."""

    plan: Plan
    limit: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    content_type: str = ""
    failed: bool = False
    # Admission wrote an output cap of its own into the request (a budget's clamp, or the
    # assumed cap of a capless request): an answer that stopped at that cap was cut for
    # this request's budget alone, so it is not stored.
    capped: bool = False

    def cache_status(self, status: int, content_type: str) -> str:
        """The response's `Cache-Status` when its headers go out. `stored` is said when the
        response will be stored if it completes: a stream's headers go out before its end,
        so one cut short or grown too large is not stored after all (a held plain body's
        headers wait for its end and get `final_status`)."""
        self.content_type = content_type
        if status != 200 or not self.plan.store:
            self.failed = True
        return forward_status(self.plan.fwd, status, not self.failed)

    def add(self, chunk: bytes) -> None:
        if self.failed:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.failed = True
            self.chunks = []
            return
        self.chunks.append(chunk)

    def keeps(self, outcome: str | None, status: int | None, finish_reasons: list[str]) -> bool:
        """Whether the response, now whole, is one to store: complete and successful, a
        stream that ended with a finish_reason (one without was cut short upstream, however
        cleanly), and not stopped by an output cap admission wrote in."""
        if self.failed or not self.chunks or outcome != "ok" or status != 200:
            return False
        if self.capped and "length" in finish_reasons:
            return False
        return bool(finish_reasons) or not self.content_type.startswith("text/event-stream")

    def final_status(self, outcome: str | None, status: int, finish_reasons: list[str]) -> str:
        """`Cache-Status` for a response whose headers wait for its end (a held plain body):
        `stored` only if it will be."""
        return forward_status(self.plan.fwd, status, self.keeps(outcome, status, finish_reasons))

    def entry(self, usage: Usage | None) -> Entry | None:
        if self.failed or not self.chunks:
            return None
        return Entry(self.content_type, tuple(self.chunks), usage)
