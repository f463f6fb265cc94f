from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import SSEEvent, SSEParser
from tests.support.cassettes import Capture, llamacpp_capture, llamacpp_capture_names, openai_captures

Fields = tuple[bytes | None, str | None, str | None, int | None]


def parse_all(chunks: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.flush())
    return events


def fields(events: list[SSEEvent]) -> list[Fields]:
    return [(e.data, e.event, e.id, e.retry) for e in events]


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    cuts = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def datas(events: list[SSEEvent]) -> list[bytes | None]:
    return [e.data for e in events]


# --- basics -----------------------------------------------------------------------------------


def test_single_event_lf() -> None:
    parser = SSEParser()
    [event] = parser.feed(b"data: hello\n\n")
    assert event == SSEEvent(raw=b"data: hello\n\n", data=b"hello", event=None, id=None, retry=None)
    assert parser.pending == b""
    assert parser.flush() == []


def test_several_events_in_one_chunk_in_order() -> None:
    events = SSEParser().feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\n")
    assert datas(events) == [b"1", b"2", b"3"]
    assert [e.raw for e in events] == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]


def test_event_split_across_chunks_at_every_position() -> None:
    stream = b"data: {\"a\": 1}\n\nevent: e\ndata: two\n\n"
    for cut in range(1, len(stream)):
        parser = SSEParser()
        first = parser.feed(stream[:cut])
        assert b"".join(e.raw for e in first) + parser.pending == stream[:cut]
        second = parser.feed(stream[cut:])
        assert datas(first + second) == [b'{"a": 1}', b"two"], cut
        assert parser.pending == b""


def test_event_returned_by_the_chunk_that_completes_it() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\n") == []
    assert parser.pending == b"data: x\n"
    [event] = parser.feed(b"\ndata: y")
    assert event.data == b"x"
    assert parser.pending == b"data: y"


def test_empty_chunk() -> None:
    parser = SSEParser()
    assert parser.feed(b"") == []
    assert parser.flush() == []


# --- line endings -----------------------------------------------------------------------------


def test_crlf_line_endings() -> None:
    events = SSEParser().feed(b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n")
    assert datas(events) == [b"a\nb", b"c"]
    assert events[0].raw == b"data: a\r\ndata: b\r\n\r\n"


def test_cr_line_endings() -> None:
    events = SSEParser().feed(b"data: a\rdata: b\r\rdata: c\r\r")
    assert datas(events) == [b"a\nb", b"c"]


def test_mixed_line_endings() -> None:
    events = SSEParser().feed(b"data: a\rdata: b\ndata: c\r\n\n")
    assert datas(events) == [b"a\nb\nc"]


def test_crlf_split_between_cr_and_lf_is_one_line_ending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # Were the LF a second line ending, it would form a blank line and dispatch "a" alone.
    assert parser.feed(b"\ndata: b\r\n") == []
    [event] = parser.feed(b"\r\n")
    assert event.data == b"a\nb"
    assert event.raw == b"data: a\r\ndata: b\r\n\r\n"


def test_block_ending_cr_is_dispatched_at_once_and_its_lf_carried_over() -> None:
    parser = SSEParser()
    [first] = parser.feed(b"data: a\r\n\r")
    assert first.data == b"a"
    assert first.raw == b"data: a\r\n\r"
    [second] = parser.feed(b"\ndata: b\r\n\r\n")
    assert second.data == b"b"
    assert second.raw == b"\ndata: b\r\n\r\n"
    assert parser.flush() == []


def test_lf_after_cr_at_chunk_end_then_end_of_stream() -> None:
    parser = SSEParser()
    [first] = parser.feed(b"data: a\r\r")
    assert first.data == b"a"
    assert parser.feed(b"\n") == []
    [tail] = parser.flush()
    assert tail == SSEEvent(raw=b"\n", data=None, event=None, id=None, retry=None)


def test_pure_cr_stream_dispatches_without_waiting_for_next_chunk() -> None:
    parser = SSEParser()
    [event] = parser.feed(b"data: a\r\r")
    assert event.data == b"a"
    [event2] = parser.feed(b"data: b\r\r")
    assert event2.data == b"b"
    assert event2.raw == b"data: b\r\r"


# --- fields -----------------------------------------------------------------------------------


def test_comment_only_block_is_returned_without_data() -> None:
    [event] = SSEParser().feed(b": keep-alive\n\n")
    assert event == SSEEvent(raw=b": keep-alive\n\n", data=None, event=None, id=None, retry=None)
    assert not event.is_done


def test_comment_inside_event_is_ignored() -> None:
    [event] = SSEParser().feed(b": c1\ndata: x\n:c2\ndata: y\n\n")
    assert event.data == b"x\ny"


def test_multiline_data_joined_with_lf() -> None:
    [event] = SSEParser().feed(b"data: line one\ndata: line two\ndata:\ndata: four\n\n")
    assert event.data == b"line one\nline two\n\nfour"


def test_field_without_colon() -> None:
    [event] = SSEParser().feed(b"data\nevent\n\n")
    assert event.data == b""
    assert event.event == ""
    [no_data] = SSEParser().feed(b"event\n\n")
    assert no_data.data is None


def test_only_one_leading_space_stripped() -> None:
    events = SSEParser().feed(b"data:x\n\ndata: x\n\ndata:  x\n\ndata:\tx\n\n")
    assert datas(events) == [b"x", b"x", b" x", b"\tx"]


def test_colon_in_value_kept() -> None:
    [event] = SSEParser().feed(b"data: {\"a\":\"b: c\"}\n\n")
    assert event.data == b'{"a":"b: c"}'


def test_event_id_retry_fields() -> None:
    [event] = SSEParser().feed(
        b"event: response.output_text.delta\nid: 42\nretry: 1500\ndata: {}\n\n"
    )
    assert event.event == "response.output_text.delta"
    assert event.id == "42"
    assert event.retry == 1500
    assert event.data == b"{}"


def test_fields_are_per_block() -> None:
    first, second = SSEParser().feed(b"event: a\nid: 1\ndata: x\n\ndata: y\n\n")
    assert (first.event, first.id) == ("a", "1")
    assert (second.event, second.id, second.retry) == (None, None, None)


def test_last_occurrence_of_a_field_wins() -> None:
    [event] = SSEParser().feed(b"event: a\nevent: b\nid: 1\nid: 2\n\n")
    assert (event.event, event.id) == ("b", "2")


def test_invalid_retry_and_id_with_nul_ignored() -> None:
    [event] = SSEParser().feed(b"retry: 12a\nretry: \xd9\xa3\nid: a\x00b\ndata: x\n\n")
    assert event.retry is None
    assert event.id is None


def test_unknown_fields_ignored() -> None:
    [event] = SSEParser().feed(b"foo: bar\nData: no\ndata: yes\n\n")
    assert event.data == b"yes"


def test_invalid_utf8_in_names_and_values() -> None:
    [event] = SSEParser().feed(b"event: \xff\xfe\nid: \xc3\ndat\xffa: z\ndata: \xff\n\n")
    assert event.event == "\ufffd\ufffd"
    assert event.id == "\ufffd"
    assert event.data == b"\xff"


def test_done() -> None:
    events = SSEParser().feed(b"data: [DONE]\n\ndata: [DONE] \n\ndata:[DONE]\n\n")
    assert [e.is_done for e in events] == [True, False, True]


# --- BOM ----------------------------------------------------------------------------------------


def test_bom_at_stream_start_ignored_but_kept_in_raw() -> None:
    [event] = SSEParser().feed(b"\xef\xbb\xbfdata: x\n\n")
    assert event.data == b"x"
    assert event.raw == b"\xef\xbb\xbfdata: x\n\n"


def test_bom_split_across_chunks() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.pending == b"\xef\xbb"
    [event] = parser.feed(b"\xbfdata: x\n\n")
    assert event.data == b"x"


def test_bom_prefix_that_is_not_a_bom() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    [event] = parser.feed(b"x\ndata: y\n\n")
    assert event.data == b"y"
    assert event.raw == b"\xefx\ndata: y\n\n"


def test_bom_only_stripped_at_stream_start() -> None:
    first, second = SSEParser().feed(b"data: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert first.data == b"a"
    assert second.data is None  # the field name is "\ufeffdata", which is unknown


# --- flush / pending ----------------------------------------------------------------------------


def test_flush_returns_unterminated_block_with_fields() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\nevent: e\ndata: [DONE]") != []
    assert parser.pending == b"event: e\ndata: [DONE]"
    [tail] = parser.flush()
    assert tail.is_done
    assert tail.event == "e"
    assert tail.raw == b"event: e\ndata: [DONE]"
    assert parser.pending == b""


def test_flush_block_missing_only_the_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\n") == []
    [tail] = parser.flush()
    assert (tail.data, tail.raw) == (b"x", b"data: x\n")


def test_parser_is_reusable_after_flush() -> None:
    parser = SSEParser()
    parser.feed(b"\xef\xbb\xbfdata: a")
    parser.flush()
    [event] = parser.feed(b"\xef\xbb\xbfdata: b\n\n")
    assert event.data == b"b"


def test_stray_blank_lines_returned_as_empty_blocks() -> None:
    events = SSEParser().feed(b"\n\ndata: a\n\n\n")
    assert [e.raw for e in events] == [b"\n", b"\n", b"data: a\n\n", b"\n"]
    assert datas(events) == [None, None, b"a", None]


# --- real captures ------------------------------------------------------------------------------


def stream_captures() -> list[Capture]:
    caps = [c for c in openai_captures() if c.is_stream]
    caps += [llamacpp_capture(n) for n in llamacpp_capture_names() if llamacpp_capture(n).is_stream]
    return caps


STREAMS = stream_captures()
STREAM_IDS = [c.name for c in STREAMS]


def test_stream_captures_found() -> None:
    names = set(STREAM_IDS)
    assert {"chat-streaming", "chat-streaming-detailed-usage", "completion-streaming"} <= names
    assert "post_v1_chat_completions_stream_include_usage" in names
    assert len(STREAMS) >= 8


@pytest.mark.parametrize("cap", STREAMS, ids=STREAM_IDS)
def test_real_stream_parses(cap: Capture) -> None:
    events = parse_all([cap.body])
    assert b"".join(e.raw for e in events) == cap.body
    assert events[-1].is_done
    assert sum(1 for e in events if e.data is not None) == cap.body.count(b"data: ")
    for event in events[:-1]:
        assert event.data is not None
        assert isinstance(json.loads(event.data), dict)
        assert event.raw.endswith(b"\n\n")


@pytest.mark.parametrize("cap", STREAMS, ids=STREAM_IDS)
def test_real_stream_one_byte_chunks(cap: Capture) -> None:
    whole = parse_all([cap.body])
    body = cap.body
    assert parse_all([body[i : i + 1] for i in range(len(body))]) == whole


@pytest.mark.parametrize("cap", STREAMS, ids=STREAM_IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_real_stream_any_rechunking(cap: Capture, data: st.DataObject) -> None:
    body = cap.body
    points = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=80))
    whole = parse_all([body])
    chunked = parse_all(split_at(body, points))
    # No CR in these captures, so even `raw` must match event for event.
    assert chunked == whole
    assert b"".join(e.raw for e in chunked) == body


# --- arbitrary input ----------------------------------------------------------------------------

_TOKENS = [
    b"data", b"data:", b"data: ", b"event:", b"event: x", b"id:", b"id: 7", b"retry: ", b"12",
    b"[DONE]", b":", b" ", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\r", b"\xef\xbb\xbf", b"\xef",
    b"\xff", b"\x00", b"{}", b"x",
]
sse_like = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=40).map(b"".join),
    st.binary(max_size=200),
)


def normalized(events: list[SSEEvent]) -> list[Fields]:
    out = fields(events)
    # A CR-then-LF split at the very end leaves the LF to flush() as an empty block of its own.
    if (
        len(events) >= 2
        and events[-1].raw == b"\n"
        and out[-1] == (None, None, None, None)
        and events[-2].raw.endswith(b"\r")
    ):
        out.pop()
    return out


@settings(max_examples=300, deadline=None)
@given(stream=sse_like, data=st.data())
def test_arbitrary_bytes_never_raise_and_rechunking_is_invisible(
    stream: bytes, data: st.DataObject
) -> None:
    whole = parse_all([stream])
    assert b"".join(e.raw for e in whole) == stream
    points = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=30))
    chunked = parse_all(split_at(stream, points))
    assert b"".join(e.raw for e in chunked) == stream
    assert normalized(chunked) == normalized(whole)


@settings(max_examples=200, deadline=None)
@given(stream=sse_like)
def test_arbitrary_bytes_one_byte_chunks(stream: bytes) -> None:
    chunked = parse_all([stream[i : i + 1] for i in range(len(stream))])
    assert b"".join(e.raw for e in chunked) == stream
    assert normalized(chunked) == normalized(parse_all([stream]))


@settings(max_examples=200, deadline=None)
@given(stream=sse_like)
def test_pending_plus_returned_raw_is_the_input_so_far(stream: bytes) -> None:
    parser = SSEParser()
    seen = b""
    returned = b""
    for i in range(0, len(stream), 3):
        seen += stream[i : i + 3]
        returned += b"".join(e.raw for e in parser.feed(stream[i : i + 3]))
        assert returned + parser.pending == seen
