"""The stream tap's fast path on real upstreams' bytes: it learns each capture's content chunk
shape and takes nearly every chunk without the parser, and what it relays and measures is
what the parser and a decode of every event give (test_fuzz holds the properties)."""

from __future__ import annotations

import re
from typing import Any
from unittest import mock

import orjson
import pytest

from proxy import measure
from proxy.content_shape import learn
from proxy.exchange import Exchange
from proxy.measure import StreamTap
from proxy.sse import SSEEvent, SSEParser
from proxy.strip import UsageStripper
from tests.support.cassettes import llamacpp_capture, openai_capture
from tests.unit.test_fuzz import SHAPES, assert_fast_path_is_the_general_path, exchange, relay, shaped_chunk, spliced

CAPTURES = {
    "openai chat-streaming": lambda: openai_capture("chat-streaming").body,
    "llama-server chat stream": lambda: llamacpp_capture("post_v1_chat_completions_stream").body,
    "llama-server chat stream, include_usage": lambda: llamacpp_capture(
        "post_v1_chat_completions_stream_include_usage"
    ).body,
}


def _events(body: bytes) -> list[bytes]:
    return [raw for raw in body.split(b"\n\n") if raw.strip()]


def _shapes(content: list[bytes]) -> int:
    """How many shapes (the bytes around the content and obfuscation literals) there are."""
    literal = rb'"(?:[^"\\]|\\.)*"'
    return len({re.sub(rb'"obfuscation":' + literal, b"", re.sub(rb'"content":' + literal, b"", raw)) for raw in content})


def _decoded_whole(reads: list[bytes], strip: bool) -> int:
    """How many of a chat stream's events are decoded whole (each then goes to `learn`)
    when `relay` takes `reads`."""
    seen: list[int] = []
    real = learn

    def counting(ev: SSEEvent, payload: dict[str, Any]) -> Any:
        seen.append(1)
        return real(ev, payload)

    with mock.patch.object(measure, "learn", counting):
        relay(reads, "chat.completions", strip)
    return len(seen)


@pytest.mark.parametrize("name", sorted(CAPTURES))
@pytest.mark.parametrize("strip", [False, True])
def test_real_streams_take_the_fast_path_and_measure_as_the_parser(name: str, strip: bool) -> None:
    body = CAPTURES[name]()
    events = [raw + b"\n\n" for raw in _events(body)]
    content = [raw for raw in events if b'"delta":{"content":' in raw]
    assert len(content) >= 8, "the capture holds a stream of content chunks"
    one_each = events
    several = [b"".join(events[i : i + 7]) for i in range(0, len(events), 7)]
    for reads in (one_each, several, [body]):
        assert_fast_path_is_the_general_path(reads, strip)
        # Every event but the content chunks is decoded whole, and of those only the first
        # of each shape, which teaches it (llama-server stamps `created` per chunk, so its
        # shape changes as the second turns). The fast path before knew one key order only
        # and took none of these captures.
        assert _decoded_whole(reads, strip) <= len(events) - len(content) + _shapes(content)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("usage_null", [False, True])
def test_each_upstreams_shape_is_decoded_whole_once(shape: str, usage_null: bool) -> None:
    obfuscation = "ab" if shape == "openai-2025" else None
    chunks = [shaped_chunk(shape, f" w{i}", usage_null, obfuscation) for i in range(20)]
    for reads in (chunks, [b"".join(chunks[:7]), b"".join(chunks[7:])]):
        assert_fast_path_is_the_general_path(reads, strip=usage_null)
        assert _decoded_whole(reads, usage_null) == 1


def test_learned_shape_of_openai_2025_chunk() -> None:
    raw = shaped_chunk("openai-2025", "Hi", True, "nX")
    (ev,) = SSEParser().feed(raw)
    shape = learn(ev, orjson.loads(ev.data or b""))
    assert shape is not None
    assert shape.line.endswith(b'"delta":{"content":')
    assert shape.mid == b'},"finish_reason":null}],"usage":null,"obfuscation":'
    assert shape.obfuscated and shape.strippable and shape.cut_mid == len(b'},"finish_reason":null}]')
    assert (shape.response_id, shape.response_model) == ("chatcmpl-x1", "gpt-4o")


@pytest.mark.parametrize(
    "payload",
    [
        # Something the measuring reads besides the content, or a second `"content":`.
        {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]},
        {"choices": [{"index": 0, "delta": {"content": "a", "refusal": None}}]},
        {"choices": [{"index": 0, "delta": {"content": "a", "role": 1}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": {"prompt_tokens": 1}},
        {"choices": [{"index": 0, "delta": {"content": "a"}}], "timings": {"predicted_n": 1}},
        {"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": []}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]},
        {"model": {"content": "a"}, "choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"id": ["a"], "choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}}], "obfuscation": 1},
        {"choices": [{"index": 0, "delta": {"content": "a"}}], "obfuscation": "x", "id": "c"},
    ],
)
def test_no_shape_is_learned_from_a_chunk_that_carries_more_than_its_content(payload: dict[str, Any]) -> None:
    (ev,) = SSEParser().feed(b"data: " + orjson.dumps(payload) + b"\n\n")
    assert learn(ev, orjson.loads(ev.data or b"")) is None


def test_no_shape_from_a_chunk_whose_literal_is_written_otherwise() -> None:
    # `\u0048` is "H": orjson writes "Hi", so the literal cannot be found byte for byte.
    raw = shaped_chunk("openai-2025", "Hi", False, "x").replace(b'"Hi"', b'"\\u0048i"')
    (ev,) = SSEParser().feed(raw)
    assert learn(ev, orjson.loads(ev.data or b"")) is None


def test_a_shape_whose_usage_null_the_stripper_cuts_otherwise_is_not_stripped_fast() -> None:
    # `"usage":null` first: UsageStripper cuts `"usage":null,` (not the `,"usage":null` the
    # fast path cuts), so a stripped stream leaves these chunks to the parser.
    first = b'data: {"usage":null,"id":"c","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    (ev,) = SSEParser().feed(first)
    shape = learn(ev, orjson.loads(ev.data or b""))
    assert shape is not None and not shape.strippable
    reads = [first, first.replace(b'"a"', b'"b"'), first.replace(b'"a"', b'"c"') * 2]
    assert_fast_path_is_the_general_path(reads, strip=True)
    out, _ = relay(reads, "chat.completions", True)
    assert b"usage" not in out and out.count(b'data: {"id":"c"') == 4


@pytest.mark.parametrize("shape", SHAPES)
def test_pieces_that_are_not_one_literal_each_are_not_taken(shape: str) -> None:
    """Content slots holding `"x","` and `"` (joined with a bare comma they decode as two
    strings), or `"x","y"` (two strings in one slot): no such chunk is JSON, so none is
    measured, whether read alone or with others."""
    obfuscation = "ab" if shape == "openai-2025" else None
    first = shaped_chunk(shape, "a", True, obfuscation)
    halves = spliced(shape, b'"x","', True, obfuscation) + spliced(shape, b'"', True, obfuscation)
    two = spliced(shape, b'"x","y"', True, obfuscation)
    for reads in ([first, halves], [first, halves + first], [first, first + two], [first, two + first + two]):
        assert_fast_path_is_the_general_path(reads, strip=True)
        _, ex = relay(reads, "chat.completions", True)
        assert set(ex.output_text.text()) == {"a"}


@pytest.mark.parametrize("literal", [b'"\\q"', b'"a\tb"'])
def test_an_obfuscation_literal_that_is_not_json_leaves_the_chunk_unmeasured(literal: bytes) -> None:
    first = shaped_chunk("openai-2025", "a", True, "ab")
    bad = shaped_chunk("openai-2025", "b", True, "zz").replace(b'"zz"', literal)
    for reads in ([first, bad], [first + bad], [first, bad * 2], [first, bad + first]):
        assert_fast_path_is_the_general_path(reads, strip=True)
        _, ex = relay(reads, "chat.completions", True)
        assert "b" not in ex.output_text.text()


def test_the_reference_path_learns_nothing() -> None:
    ex: Exchange = exchange()
    tap = StreamTap(ex, lambda _: None)
    with mock.patch.object(measure, "learn", lambda ev, payload: None):
        tap.feed(shaped_chunk("openai-2025", "a", True, "ab") * 3, 1)
    assert tap._shape is None and ex.output_text.text() == "aaa"
    stripped = UsageStripper().rewrite(SSEParser().feed(shaped_chunk("openai-2025", "a", True, "ab"))[0])
    assert b"usage" not in stripped
