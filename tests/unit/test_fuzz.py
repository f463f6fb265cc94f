"""Property-based fuzzing of the pure parts a hostile upstream or client can reach, wired as
the request path wires them (no sockets):

* the relay's SSE path: `StreamTap` (parser + measurement) and `UsageStripper`, fed
  arbitrary, SSE-shaped and OpenAI-shaped bytes under arbitrary re-chunkings, exactly as
  forward.relay feeds them. They never raise out, and the bytes the client would receive are
  the upstream's bytes (or, with Tollgate's own usage injection, the bytes a direct call
  without it returns);
* what accept lets in: any body `parse_json_object` accepts can be estimated
  (proxy.usage), re-serialised (proxy.route.outgoing_body) and measured without raising;
* usage extraction and cost, from arbitrary upstream JSON to dollars: never negative,
  monotone in tokens.

tests/unit/test_sse.py, test_tokens.py and test_pricing.py hold each module's own
properties; these are the cross-module ones.

Example counts are moderate by default; set TOLLGATE_FUZZ_EXAMPLES to run every property
with that many examples (a long session: TOLLGATE_FUZZ_EXAMPLES=20000).
"""

from __future__ import annotations

import itertools
import os
from decimal import Decimal
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import estimate as estimating
from proxy import usage as usage_json
from proxy.accept import MAX_JSON_DEPTH, accept_body, json_depth, parse_json_object
from proxy.body import measure_body
from proxy.errors import InvalidRequest
from proxy.exchange import Exchange
from proxy.measure import StreamTap
from proxy.pricing import Price, PriceTable, cost, worst_case_cost
from proxy.route import outgoing_body
from proxy.sse import SSEEvent
from proxy.strip import UsageStripper
from proxy.usage import Usage

_LONG = os.environ.get("TOLLGATE_FUZZ_EXAMPLES")


def examples(default: int) -> int:
    return int(_LONG) if _LONG else default


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ENDPOINTS = ["chat.completions", "completions", "embeddings", "responses", "other"]


def exchange(endpoint: str = "chat.completions") -> Exchange:
    return Exchange(request_id="tg-fuzz", endpoint=endpoint, method="POST", path="/v1/x", t0_ns=0)  # type: ignore[arg-type]


# --- strategies -------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


def _containers(keys: st.SearchStrategy[str]) -> Any:
    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5)

    return extend


json_values = st.recursive(scalars, _containers(st.text(max_size=8)), max_leaves=20)
# The keys the tap and token counters look for, so values of the wrong shape land where
# they are read and not only under random keys.
_KEYS = [
    "choices", "delta", "content", "refusal", "reasoning_content", "tool_calls", "function",
    "arguments", "function_call", "text", "usage", "prompt_tokens", "completion_tokens",
    "input_tokens", "output_tokens", "prompt_tokens_details", "cached_tokens",
    "completion_tokens_details", "reasoning_tokens", "timings", "prompt_n", "predicted_n",
    "type", "response", "model", "id", "error", "finish_reason", "status", "messages", "role",
    "name", "tools", "parameters", "prompt", "input", "instructions", "index",
]
keyed_values = st.recursive(scalars, _containers(st.sampled_from(_KEYS)), max_leaves=25)
payloads = st.dictionaries(st.sampled_from(_KEYS), keyed_values, max_size=6)


@st.composite
def deep(draw: st.DrawFn, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A value nested exactly `n` levels, alternating arrays and objects at random."""
    n = draw(st.integers(1, max_depth))
    value: Any = draw(scalars)
    for _ in range(n):
        value = [value] if draw(st.booleans()) else {draw(st.sampled_from(_KEYS)): value}
    return value


# A chunk of an OpenAI stream built from an arbitrary payload, with no `usage` key at any
# level: what a client gets when it did not ask for usage. (The stripper works on the text:
# a nested `"usage":null` object member would be taken for the injected one. OpenAI never
# nests one; see the report on issue 7.)
_CHUNK_KEYS = [k for k in _KEYS if k != "usage"]
chunk_dicts = st.fixed_dictionaries(
    {"id": st.just("chatcmpl-x"), "object": st.just("chat.completion.chunk")},
    optional={
        "choices": st.recursive(scalars, _containers(st.sampled_from(_CHUNK_KEYS)), max_leaves=25),
        "model": st.text(max_size=10),
        "system_fingerprint": st.none(),
    },
)
usage_objects = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
    optional={"prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 10**6)})},
)
_SSE_BITS = [
    b"data: ", b"data:", b"event: x\n", b"id: 1\n", b"retry: 5\n", b": ping\n\n", b"\n", b"\r\n",
    b"\r", b"\n\n", b"[DONE]", b"{", b"}", b'"choices":[]', b'"usage":null', b',"usage":null',
    b'"usage":{"prompt_tokens":1}', b"\xef\xbb\xbf", b"\xff", b"\x00",
]


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """SSE-ish bytes: well-formed events with arbitrary JSON, fragments, and noise."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            parts.append(b"data: " + orjson.dumps(draw(payloads)) + draw(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r", b"\n"])))
        elif kind == 1:
            parts.append(draw(st.sampled_from(_SSE_BITS)))
        elif kind == 2:
            parts.append(draw(st.binary(max_size=30)))
        else:
            parts.append(b"data: " + orjson.dumps(draw(chunk_dicts)) + b"\n\n")
    return b"".join(parts)


def rechunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def relay(chunks: list[bytes], endpoint: str, strip: bool) -> tuple[bytes, Exchange]:
    """What forward.relay writes to the client for these upstream chunks (same calls, same
    order), with the Exchange the tap filled."""
    ex = exchange(endpoint)
    firsts: list[Exchange] = []
    tap = StreamTap(ex, firsts.append)
    stripper = UsageStripper() if strip else None
    out: list[bytes] = []
    t = 0
    for chunk in chunks:
        t += 1_000
        if stripper is not None:
            out.append(tap.strip(chunk, t, stripper))
        else:
            out.append(chunk)
            tap.tap(chunk, t)
    tail = tap.finish(t + 1_000)
    if stripper is not None:
        out.extend(stripper.rewrite(ev) for ev in tail)
    assert len(firsts) == (1 if ex.t_first_token_ns is not None else 0)
    return b"".join(out), ex


def check_exchange(ex: Exchange) -> None:
    assert ex.output_events >= 0
    assert all(g >= 0 for g in ex.gaps_ns)
    assert len(ex.gaps_ns) == max(0, ex.output_events - 1)
    if ex.usage is not None:
        assert ex.usage.input_tokens >= 0 and ex.usage.output_tokens >= 0
    assert ex.error_type is None or len(ex.error_type) <= 64


# --- the relay's SSE path -------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(100))
@given(stream=st.one_of(sse_streams(), st.binary(max_size=400)), cuts=st.lists(st.integers(0, 400), max_size=40),
       endpoint=st.sampled_from(ENDPOINTS))
def test_tap_never_raises_and_never_changes_relayed_bytes(stream: bytes, cuts: list[int], endpoint: str) -> None:
    out, ex = relay(rechunk(stream, cuts), endpoint, strip=False)
    assert out == stream
    assert not ex.measure_failed  # the tap did not even fail internally
    check_exchange(ex)


@settings(FUZZ, max_examples=examples(100))
@given(stream=sse_streams(), cuts=st.lists(st.integers(0, 400), max_size=40), endpoint=st.sampled_from(ENDPOINTS))
def test_measurement_does_not_depend_on_chunking(stream: bytes, cuts: list[int], endpoint: str) -> None:
    _, whole = relay([stream], endpoint, strip=False)
    _, chunked = relay(rechunk(stream, cuts), endpoint, strip=False)
    assert chunked.output_text == whole.output_text
    assert chunked.usage == whole.usage
    assert chunked.finish_reasons == whole.finish_reasons
    assert chunked.error_type == whole.error_type


@settings(FUZZ, max_examples=examples(100))
@given(chunks=st.lists(chunk_dicts, max_size=8), cuts=st.lists(st.integers(0, 2000), max_size=40),
       crlf=st.booleans(), comments=st.booleans())
def test_stripper_leaves_streams_without_injected_usage_unchanged(
    chunks: list[dict[str, Any]], cuts: list[int], crlf: bool, comments: bool
) -> None:
    end = b"\r\n\r\n" if crlf else b"\n\n"
    events = [b"data: " + orjson.dumps(c) + end for c in chunks]
    if comments:
        events = [b": keep-alive" + end + e for e in events]
    stream = b"".join(events) + b"data: [DONE]" + end
    out, ex = relay(rechunk(stream, cuts), "chat.completions", strip=True)
    assert out == stream
    check_exchange(ex)


@settings(FUZZ, max_examples=examples(100))
@given(chunks=st.lists(chunk_dicts, max_size=8), usage=usage_objects, cuts=st.lists(st.integers(0, 3000), max_size=40))
def test_stripper_undoes_exactly_the_injected_usage(
    chunks: list[dict[str, Any]], usage: dict[str, Any], cuts: list[int]
) -> None:
    """With include_usage, OpenAI adds "usage":null to every chunk and a usage-only chunk
    before [DONE]; after the stripper the client holds the stream it would have got
    without the option, and the tap still read the usage."""
    direct = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    injected = (
        b"".join(b"data: " + orjson.dumps({**c, "usage": None}) + b"\n\n" for c in chunks)
        + b"data: " + orjson.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk", "choices": [], "usage": usage}) + b"\n\n"
        + b"data: [DONE]\n\n"
    )
    out, ex = relay(rechunk(injected, cuts), "chat.completions", strip=True)
    assert out == direct
    assert ex.usage is not None and ex.usage.input_source == "upstream"
    assert ex.usage.input_tokens == usage["prompt_tokens"]
    assert ex.usage.output_tokens == usage["completion_tokens"]


# The content chunks of four real upstreams, byte for byte in key order: OpenAI's before
# 2025 (`"logprobs":null` in the choice), OpenAI's since (no logprobs; `service_tier` and an
# `obfuscation` string last, as in tests' chat-streaming capture), llama-server's (choices
# first, id and model after the content) and Ollama's (the role in every delta).
SHAPES = ("openai-2024", "openai-2025", "llama-server", "ollama")


def shaped_chunk(
    shape: str, content: str, usage_null: bool, obfuscation: str | None, model: str = "gpt-4o"
) -> bytes:
    """A content chunk of `shape` exactly as that upstream writes it."""
    obj: dict[str, Any]
    if shape == "ollama":
        obj = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1755137921, "model": model,
               "system_fingerprint": "fp_ollama",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}]}
    elif shape == "llama-server":
        obj = {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": content}}], "created": 1795405588,
               "id": "chatcmpl-wUKQ", "model": model, "system_fingerprint": "b1-0c1e570", "object": "chat.completion.chunk"}
    else:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": content}, "finish_reason": None}
        if shape == "openai-2024":
            choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
        obj = {"id": "chatcmpl-x1", "object": "chat.completion.chunk", "created": 1755137921, "model": model,
               "service_tier": "default", "system_fingerprint": "fp_1" if shape == "openai-2024" else None,
               "choices": [choice]}
    if usage_null:
        obj["usage"] = None
    if obfuscation is not None:
        obj["obfuscation"] = obfuscation
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def openai_chunk(content: str, usage_null: bool, obfuscation: str | None, model: str = "gpt-4o") -> bytes:
    """A content chunk as api.openai.com wrote it before 2025."""
    return shaped_chunk("openai-2024", content, usage_null, obfuscation, model)


def relay_general(chunks: list[bytes], strip: bool) -> tuple[bytes, Exchange]:
    """`relay` through the parser, a decode of every event and `UsageStripper.rewrite` only:
    no content shape is ever learned, so nothing takes a fast path."""
    ex = exchange("chat.completions")
    tap = StreamTap(ex, lambda _: None)
    stripper = UsageStripper()
    out: list[bytes] = []
    t = 0
    with mock.patch("proxy.measure.learn", lambda ev, payload: None):
        for chunk in chunks:
            t += 1_000
            events = tap.feed(chunk, t)
            out.extend(stripper.rewrite(ev) for ev in events) if strip else out.append(chunk)
        tail = tap.finish(t + 1_000)
    assert tap._shape is None
    if strip:
        out.extend(stripper.rewrite(ev) for ev in tail)
    return b"".join(out), ex


# Content that reaches into the bytes around a literal if anything does: quotes, backslashes,
# the shapes' own tails, line ends, non-ASCII.
_tricky_text = st.text(max_size=6) | st.sampled_from(
    ['"', "\\", '"},"logprobs":null', '"},"finish_reason":null}]', ',"usage":null', ',"obfuscation":"', "\r\n", "é", "}}]"]
)


def _shaped_chunks(shapes: st.SearchStrategy[str], models: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return st.builds(
        shaped_chunk,
        shapes,
        _tricky_text,
        st.booleans(),
        st.none() | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6),
        models,
    )


def _openai_chunks(models: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return _shaped_chunks(st.sampled_from(SHAPES), models)


# What stands where a content literal stood in a chunk of a learned shape: nothing of it one
# string literal alone, some of them valid JSON as a whole chunk (another key in the delta,
# whitespace, a number), some not (an invalid escape, an unclosed string, raw CR or LF).
_NOT_ONE_LITERAL = [
    b'"\\q"', b'"a","role":"b"', b'"a" ', b' "a"', b'"a"\r', b"1", b"null", b'["a"]', b'"a', b'"a\\"', b'"', b'""""',
    b'"a","refusal":"b"', b'"a\nb"', b'"x","y"',
]


def spliced(shape: str, literal: bytes, usage_null: bool, obfuscation: str | None) -> bytes:
    """A chunk of `shape` with `literal`'s bytes in its content literal's place."""
    return shaped_chunk(shape, "x", usage_null, obfuscation).replace(b'"content":"x"', b'"content":' + literal)


def _not_json(usage_null: bool) -> bytes:
    """A content chunk of the fast shape whose content literal is not JSON (an invalid escape):
    relayed as it came, `"usage":null` and all, and not measured, by either path."""
    return spliced("openai-2024", b'"\\q"', usage_null, None)


_spliced = st.builds(
    spliced,
    st.sampled_from(SHAPES),
    st.sampled_from(_NOT_ONE_LITERAL),
    st.booleans(),
    st.none() | st.sampled_from(["", "ab"]),
)

_openai_events = st.one_of(
    _openai_chunks(st.sampled_from(["gpt-4o", "gpt-4o", "other"])),
    _spliced,
    st.sampled_from([b": ping\n\n", b"data: [DONE]\n\n", b"event: x\n", b"data: {\"choices\":[]}\n\n", b"\r\n",
                     _not_json(True), _not_json(False)]),
)


def assert_fast_path_is_the_general_path(reads: list[bytes], strip: bool) -> None:
    fast_out, fast = relay(reads, "chat.completions", strip=strip)
    slow_out, slow = relay_general(reads, strip=strip)
    assert fast_out == slow_out
    for name in ("output_text", "output_events", "gaps_ns", "t_first_token_ns", "t_last_token_ns",
                 "response_id", "response_model", "usage", "finish_reasons", "error_type", "measure_failed"):
        assert getattr(fast, name) == getattr(slow, name), name


@settings(FUZZ, max_examples=examples(400))
@given(events=st.lists(_openai_events, max_size=12), cuts=st.lists(st.integers(0, 3000), max_size=20),
       whole=st.booleans(), strip=st.booleans())
def test_tap_fast_path_matches_the_general_path(
    events: list[bytes], cuts: list[int], whole: bool, strip: bool
) -> None:
    """The relay's calls (`tap` / `strip`) take a fast path for OpenAI content chunks that
    continue the stream's shape; what they relay and measure is what the parser plus
    `UsageStripper.rewrite` give, chunk for chunk."""
    assert_fast_path_is_the_general_path(events if whole else rechunk(b"".join(events), cuts), strip)


# Mostly content chunks of one stream's shape (so reads of several of them are common), with
# the odd event of any other shape between them, and the odd chunk whose content slot holds
# something that is not one string literal.
@st.composite
def _content_mostly(draw: st.DrawFn) -> list[bytes]:
    shape = draw(st.sampled_from(SHAPES))
    usage_null = draw(st.booleans())
    pads = st.none() if shape != "openai-2025" or draw(st.booleans()) else st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6
    )
    content = st.builds(shaped_chunk, st.just(shape), _tricky_text, st.just(usage_null), pads)
    bad = st.builds(spliced, st.just(shape), st.sampled_from(_NOT_ONE_LITERAL), st.just(usage_null), pads)
    return draw(st.lists(st.one_of(content, content, content, content, bad, _openai_events), min_size=2, max_size=16))


@settings(FUZZ, max_examples=examples(400))
@given(events=_content_mostly(), sizes=st.lists(st.integers(1, 6), max_size=16),
       strip=st.booleans())
def test_tap_fast_path_matches_the_general_path_for_reads_of_several_events(
    events: list[bytes], sizes: list[int], strip: bool
) -> None:
    """A busy proxy reads several whole chunks at once (most reads at 256 concurrent
    streams): the fast path takes a read of several content chunks in one pass, and what it
    relays and measures is still what the parser plus `UsageStripper.rewrite` give."""
    reads: list[bytes] = []
    i = 0
    for size in [*sizes, len(events)]:
        if i >= len(events):
            break
        reads.append(b"".join(events[i : i + size]))
        i += size
    assert_fast_path_is_the_general_path(reads, strip)


@settings(FUZZ, max_examples=examples(400))
@given(events=_content_mostly(), picks=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 300)), max_size=12),
       strip=st.booleans())
def test_tap_fast_path_matches_the_general_path_for_reads_that_end_inside_an_event(
    events: list[bytes], picks: list[tuple[int, int]], strip: bool
) -> None:
    """Reads cut a little before the end of an event (or at it): the fast path holds the
    start of an event it cannot end yet and takes it whole with the next read, or hands it
    to the parser at the stream's end; what it relays and measures is still what the parser
    plus `UsageStripper.rewrite` give."""
    ends = list(itertools.accumulate(len(ev) for ev in events))
    cuts = [ends[i % len(ends)] - back for i, back in picks]
    assert_fast_path_is_the_general_path(rechunk(b"".join(events), cuts), strip)
    # A stream whose last event never ends: the held start goes to the parser at the end.
    unended = b"".join(events)[: ends[-1] - 2]
    assert_fast_path_is_the_general_path(rechunk(unended, cuts), strip)


@settings(FUZZ, max_examples=examples(100))
@given(stream=st.one_of(sse_streams(), st.binary(max_size=400)), cuts=st.lists(st.integers(0, 400), max_size=40))
def test_stripper_on_arbitrary_bytes_never_raises_and_only_removes(stream: bytes, cuts: list[int]) -> None:
    out, ex = relay(rechunk(stream, cuts), "chat.completions", strip=True)
    # Whatever it removed, it only ever removes: the output is never longer than the input,
    # and a stream that never says "usage" comes through whole.
    assert len(out) <= len(stream)
    if b'"usage":' not in stream:
        assert out == stream
    check_exchange(ex)


@settings(FUZZ, max_examples=examples(100))
@given(raw=st.binary(max_size=200), data=st.one_of(st.none(), st.binary(max_size=100), payloads.map(orjson.dumps)))
def test_stripper_rewrite_is_total(raw: bytes, data: bytes | None) -> None:
    # Any event shape at all (the parser's raw and data need not agree).
    out = UsageStripper().rewrite(SSEEvent(raw=raw, data=data, event=None, id=None, retry=None))
    assert out == b"" or len(out) <= len(raw)


@settings(FUZZ, max_examples=examples(100))
@given(body=st.one_of(st.binary(max_size=300), payloads.map(orjson.dumps), keyed_values.map(orjson.dumps)),
       endpoint=st.sampled_from(ENDPOINTS), status=st.sampled_from([200, 400, 500]))
def test_measure_body_never_raises(body: bytes, endpoint: str, status: int) -> None:
    ex = exchange(endpoint)
    ex.status = status
    measure_body(ex, body)
    check_exchange(ex)


# --- what accept lets in -----------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(80))
@given(extra=st.one_of(deep(), payloads, json_values), endpoint=st.sampled_from(ENDPOINTS[:4]),
       field=st.sampled_from(_KEYS), stream=st.booleans())
def test_any_accepted_body_can_be_estimated_and_reserialised(
    extra: Any, endpoint: str, field: str, stream: bool
) -> None:
    """The chain after accept must not fail on anything accept lets through: the prompt
    estimate (budgets), the outgoing body rewrite (alias, usage injection, cap override)."""
    payload = {"model": "gpt-4o-mini", "stream": stream, field: extra}
    raw = orjson.dumps(payload)
    try:
        parsed = parse_json_object(raw)
        ex = exchange(endpoint)
        accept_body(ex, parsed)
    except InvalidRequest:
        # Only the depth check and the typed fields the proxy reads may refuse it.
        assert json_depth(payload) > MAX_JSON_DEPTH or field in ("model", "stream") or field.startswith("max")
        return
    assert estimating.estimate_prompt_tokens(endpoint, parsed, "gpt-4o-mini") >= 0
    ex.upstream_model = "gpt-4o-mini-2024-07-18"
    out = outgoing_body(ex, raw, parsed, inject_usage=True, cap_override=("max_completion_tokens", 16))
    sent = orjson.loads(out)
    assert sent["model"] == "gpt-4o-mini-2024-07-18" and sent["max_completion_tokens"] == 16
    assert {k: v for k, v in sent.items() if k not in ("model", "max_completion_tokens", "stream_options")} == {
        k: v for k, v in parsed.items() if k not in ("model", "max_completion_tokens", "stream_options")
    }


@settings(FUZZ, max_examples=examples(100))
@given(depth=st.integers(MAX_JSON_DEPTH + 1, 1020), array=st.booleans())
def test_bodies_deeper_than_the_limit_are_refused_not_crashed(depth: int, array: bool) -> None:
    inner = b"[" * depth + b"]" * depth if array else b'{"a":' * depth + b"1" + b"}" * depth
    raw = b'{"model":"gpt-4o-mini","x":' + inner + b"}"
    with pytest.raises(InvalidRequest) as info:
        parse_json_object(raw)
    assert info.value.status == 400


@settings(FUZZ, max_examples=examples(100))
@given(body=st.binary(max_size=300) | json_values.map(orjson.dumps) | deep().map(orjson.dumps))
def test_parse_json_object_raises_only_invalid_request(body: bytes) -> None:
    try:
        assert isinstance(parse_json_object(body), dict)
    except InvalidRequest as err:
        assert err.status == 400 and "Traceback" not in err.message


@settings(FUZZ, max_examples=examples(80))
@given(text=st.text(alphabet=st.characters(blacklist_categories=()), max_size=200), model=st.text(max_size=30))
def test_output_estimate_never_raises(text: str, model: str) -> None:
    # Any code point, lone surrogates included, and any model name (unknown -> default).
    assert estimating.estimate_output_tokens(text, model) >= 0


@settings(FUZZ, max_examples=examples(100))
@given(payload=payloads, endpoint=st.sampled_from(ENDPOINTS))
def test_usage_extraction_never_raises(payload: dict[str, Any], endpoint: str) -> None:
    for usage in (usage_json.usage_from_body(endpoint, payload), usage_json.usage_from_stream_payload(endpoint, payload)):
        assert usage is None or (usage.input_tokens >= 0 and usage.output_tokens >= 0)


# --- cost --------------------------------------------------------------------------------------------

SHIPPED = PriceTable.shipped()
counts = st.integers(min_value=-(10**6), max_value=10**12)
usages = st.builds(
    Usage,
    input_tokens=counts,
    output_tokens=counts,
    cached_input_tokens=counts,
    reasoning_tokens=counts,
    cache_write_tokens=counts,
)
prices = st.builds(
    Price,
    input=st.decimals(min_value=0, max_value=10**4, places=6),
    output=st.decimals(min_value=0, max_value=10**4, places=6),
    cached_input=st.none() | st.decimals(min_value=0, max_value=10**4, places=6),
    cache_write=st.none() | st.decimals(min_value=0, max_value=10**4, places=6),
)
model_names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["gpt-4o", "gpt-4o-mini", "o3", "o1-mini", "text-embedding-3-small", "gpt-4.1-nano", "local/x", "*", "[", "gpt-4o*"]),
)


@settings(FUZZ, max_examples=examples(100))
@given(model=model_names, usage=usages)
def test_shipped_price_lookup_never_raises_and_cost_is_non_negative(model: str, usage: Usage) -> None:
    price = SHIPPED.lookup(model)
    if price is not None:
        assert cost(usage, price) >= 0


@settings(FUZZ, max_examples=examples(100))
@given(payload=st.fixed_dictionaries({"usage": st.dictionaries(st.sampled_from(_KEYS), keyed_values | counts, max_size=6)}),
       price=prices, more=st.integers(0, 10**9), endpoint=st.sampled_from(ENDPOINTS[:4]))
def test_cost_of_any_upstream_usage_is_non_negative_and_monotone(
    payload: dict[str, Any], price: Price, more: int, endpoint: str
) -> None:
    """From whatever usage JSON an upstream sends, to dollars: never negative, and more
    output or input tokens never cost less."""
    usage = usage_json.usage_from_body(endpoint, payload)
    if usage is None:
        return
    base = cost(usage, price)
    assert base >= 0
    assert cost(usage.with_output(usage.output_tokens + more, "upstream"), price) >= base
    bigger_in = Usage(**{**{f: getattr(usage, f) for f in usage.__slots__}, "input_tokens": usage.input_tokens + more})
    assert cost(bigger_in, price) >= base


@settings(FUZZ, max_examples=examples(100))
@given(a=st.integers(0, 10**12), b=st.integers(0, 10**12), cap_a=st.integers(0, 2**31 - 1),
       cap_b=st.integers(0, 2**31 - 1), price=prices)
def test_worst_case_is_monotone_in_both_counts(a: int, b: int, cap_a: int, cap_b: int, price: Price) -> None:
    lo_in, hi_in = sorted((a, b))
    lo_cap, hi_cap = sorted((cap_a, cap_b))
    assert Decimal(0) <= worst_case_cost(lo_in, lo_cap, price) <= worst_case_cost(hi_in, hi_cap, price)
