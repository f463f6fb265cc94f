"""`usage.cost` in a stream's usage event (proxy.client_cost.UsageCoster), wired as
forward.relay wires it: StreamTap.strip with the coster, every upstream read in turn, then
the parser's tail. The stream the client gets is the upstream's, event for event and byte
for byte, except the one usage event, whose `usage` gains the cost; whatever goes wrong, the
upstream's bytes go through."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.client_cost import UsageCoster, stream_wants_cost
from proxy.exchange import Exchange
from proxy.measure import StreamTap
from proxy.pricing import Price
from proxy.sse import SSEEvent, SSEParser
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import StreamDialect, dialect_stream, openai_stream_with_usage

PRICE = Price(input=Decimal("2.50"), output=Decimal("10.00"), cached_input=Decimal("1.25"))
USAGE: dict[str, Any] = {
    "prompt_tokens": 1000,
    "completion_tokens": 200,
    "total_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
# (600 uncached * 2.50 + 400 cached * 1.25 + 200 * 10.00) per 1M tokens
COST = {"total_usd": 0.004, "input_usd": 0.0015, "cached_input_usd": 0.0005, "output_usd": 0.002}
SPACED = (", ", ": ")
DIALECTS = {
    "openai-bytes": StreamDialect(),
    "spaces": StreamDialect(separators=SPACED),
    "key-order": StreamDialect(usage_first=True),
    "no-usage-null": StreamDialect(separators=SPACED, usage_null=False),
    "crlf": StreamDialect(separators=SPACED, eol="\r\n"),
    "cr": StreamDialect(eol="\r"),
    "data-no-space": StreamDialect(data_prefix="data:"),
    "comments-retry": StreamDialect(separators=SPACED, comments=True, retry=True),
    "multi-line": StreamDialect(indent=2),
    "multi-line-usage-first": StreamDialect(indent=2, separators=(",", ": "), usage_first=True),
    "everything": StreamDialect(
        separators=SPACED, indent=1, usage_first=True, eol="\r\n", data_prefix="data:", comments=True, retry=True
    ),
}


def exchange(endpoint: str = "chat.completions") -> Exchange:
    return Exchange(request_id="tg-cost", endpoint=endpoint, method="POST", path="/v1/x", t0_ns=0)  # type: ignore[arg-type]


def relay(chunks: list[bytes], coster: UsageCoster, endpoint: str = "chat.completions") -> tuple[bytes, Exchange]:
    """What forward.relay writes for these upstream reads with the coster on."""
    ex = exchange(endpoint)
    tap = StreamTap(ex, lambda _: None)
    out = [tap.strip(chunk, 1_000 * i, coster) for i, chunk in enumerate(chunks, 1)]
    out += [coster.rewrite(ev) for ev in tap.finish(1_000 * (len(chunks) + 1))]
    return b"".join(out), ex


def events(stream: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(stream) + parser.flush()


def rechunk(data: bytes, size: int | None) -> list[bytes]:
    if size is None:
        return [e.raw for e in events(data)]
    return [data[i : i + size] for i in range(0, len(data), size)]


def priced() -> UsageCoster:
    return UsageCoster("chat.completions", lambda: PRICE)


def the_one_changed_event(sent: bytes, got: bytes) -> tuple[Any, Any]:
    """Event for event the same but for exactly one, whose type, id and retry are kept: its
    data as JSON, before and after."""
    before, after = events(sent), events(got)
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a.raw != b.raw]
    assert len(changed) == 1
    a, b = changed[0]
    assert (a.event, a.id, a.retry) == (b.event, b.id, b.retry)
    return orjson.loads(a.data or b""), orjson.loads(b.data or b"")


def assert_only_usage_gained_cost(sent: bytes, got: bytes, cost: dict[str, Any] | None) -> None:
    """Event for event the same, but for one usage event whose JSON gained exactly the cost."""
    old, new = the_one_changed_event(sent, got)
    extra = {"cost_source": "none"} if cost is None else {"cost": cost, "cost_source": "price_table"}
    assert new == {**old, "usage": {**old["usage"], **extra}}


@pytest.mark.parametrize("read", [None, 1, 7, 64], ids=lambda r: f"reads-{r}")
@pytest.mark.parametrize("name", list(DIALECTS))
def test_every_dialect_gets_the_cost_in_its_usage_event_only(name: str, read: int | None) -> None:
    sent = dialect_stream(openai_capture("chat-streaming"), DIALECTS[name], USAGE)
    coster = priced()
    got, ex = relay(rechunk(sent, read), coster)
    assert coster.done
    assert_only_usage_gained_cost(sent, got, COST)
    # The tap read the usage as before: what finish prices is what the client was shown.
    assert ex.usage is not None and ex.usage.input_tokens == 1000 and ex.usage.cached_input_tokens == 400


def test_openai_bytes_stay_the_upstreams_around_the_usage() -> None:
    sent = openai_stream_with_usage(openai_capture("chat-streaming").body, USAGE)
    got, _ = relay(rechunk(sent, None), priced())
    at = sent.index(b'"usage":{')
    assert got[:at] == sent[:at]  # every content chunk, `"usage":null` included
    assert sent.endswith(b'}},"obfuscation":"t9"}\n\ndata: [DONE]\n\n')
    assert got.endswith(b'"cost":{"total_usd":0.004,"input_usd":0.0015,"cached_input_usd":0.0005,'
                        b'"output_usd":0.002},"cost_source":"price_table"},"obfuscation":"t9"}\n\ndata: [DONE]\n\n')


def test_unpriced_says_none_and_never_zero() -> None:
    sent = dialect_stream(openai_capture("chat-streaming"), StreamDialect(), USAGE)
    got, _ = relay(rechunk(sent, None), UsageCoster("chat.completions", lambda: None))
    assert_only_usage_gained_cost(sent, got, None)
    assert b'"cost":' not in got


def test_responses_stream_gets_cost_in_the_completed_response() -> None:
    completed = {
        "type": "response.completed",
        "sequence_number": 9,
        "response": {
            "id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "the \"usage\": {} word"}]}],
            "usage": {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 400},
                      "output_tokens": 200, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1200},
            "user": None, "metadata": {},
        },
    }
    delta = {"type": "response.output_text.delta", "sequence_number": 4, "delta": "usage"}
    sent = (
        b"event: response.output_text.delta\ndata: " + orjson.dumps(delta) + b"\n\n"
        + b"event: response.completed\ndata: " + orjson.dumps(completed) + b"\n\n"
    )
    got, _ = relay(rechunk(sent, 5), UsageCoster("responses", lambda: PRICE), "responses")
    before, after = events(sent), events(got)
    assert after[0] == before[0]
    assert after[1].event == "response.completed"
    new = orjson.loads(after[1].data or b"")
    assert new["response"]["usage"] == {**completed["response"]["usage"], "cost": COST,  # type: ignore[index]
                                        "cost_source": "price_table"}
    assert {**new, "response": {**new["response"], "usage": None}} == {
        **completed, "response": {**completed["response"], "usage": None}  # type: ignore[dict-item]
    }


def test_a_failing_price_lookup_relays_the_upstreams_bytes() -> None:
    def broken() -> Price:
        raise RuntimeError("price table gone")

    sent = dialect_stream(openai_capture("chat-streaming"), StreamDialect(), USAGE)
    coster = UsageCoster("chat.completions", broken)
    got, _ = relay(rechunk(sent, 3), coster)
    assert got == sent and not coster.done


def test_streams_without_a_usage_object_pass_unchanged() -> None:
    sent = dialect_stream(openai_capture("chat-streaming"), StreamDialect(separators=SPACED), None)
    got, _ = relay(rechunk(sent, 11), priced())
    assert got == sent
    # A content chunk with a real usage of its own is relayed as it is after the first.
    usage_chunk = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    coster = priced()
    got, _ = relay([usage_chunk, usage_chunk], coster)
    assert got.endswith(usage_chunk) and got != usage_chunk * 2


@pytest.mark.parametrize(
    ("endpoint", "body", "injected", "wants"),
    [
        ("chat.completions", {"stream": True, "stream_options": {"include_usage": True}}, False, True),
        ("completions", {"stream": True, "stream_options": {"include_usage": True}}, False, True),
        ("chat.completions", {"stream": True}, False, False),
        ("chat.completions", {"stream": True, "stream_options": {"include_usage": False}}, False, False),
        # Tollgate asked for itself: the client never sees the usage event.
        ("chat.completions", {"stream": True, "stream_options": {"include_usage": True}}, True, False),
        ("responses", {"stream": True}, False, True),
        ("embeddings", {}, False, False),
    ],
)
def test_which_streams_get_the_cost(endpoint: str, body: dict[str, Any], injected: bool, wants: bool) -> None:
    ex = exchange(endpoint)
    ex.body, ex.usage_injected, ex.include_cost = body, injected, True
    assert stream_wants_cost(ex) is wants
    ex.include_cost = False
    assert not stream_wants_cost(ex)


_BITS = [
    b"data: ", b"data:", b"event: x\n", b"id: 1\n", b"retry: 5\n", b": ping\n\n", b"\n", b"\r\n", b"\r", b"\n\n",
    b"[DONE]", b"{", b"}", b'"choices":[]', b'"usage":null', b'"usage":{"prompt_tokens":1}', b"\xef\xbb\xbf",
]
_usage_objects = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(-5, 10**6), "completion_tokens": st.integers(-5, 10**6)},
    optional={"prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 10**6)}),
              "cost": st.just(1), "note": st.just('"usage": {}')},
)


@st.composite
def usage_streams(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 3))
        eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        if kind == 0:
            chunk = {"id": "x", "choices": draw(st.sampled_from([[], [{"delta": {"content": "usage"}}]])),
                     "usage": draw(st.none() | _usage_objects)}
            head = draw(st.sampled_from([b"", b": c" + eol, b"event: e" + eol, b"id: 2" + eol]))
            parts.append(head + draw(st.sampled_from([b"data: ", b"data:"])) + orjson.dumps(chunk) + eol + eol)
        elif kind == 1:
            parts.append(draw(st.sampled_from(_BITS)))
        elif kind == 2:
            parts.append(draw(st.binary(max_size=20)))
        else:
            text = orjson.dumps({"usage": draw(_usage_objects), "choices": []}, option=orjson.OPT_INDENT_2)
            parts.append(b"".join(b"data: " + line + eol for line in text.split(b"\n")) + eol)
    return b"".join(parts)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(stream=usage_streams(), cuts=st.lists(st.integers(0, 600), max_size=20), unpriced=st.booleans())
def test_any_stream_changes_at_most_its_first_usage_event_and_only_by_the_cost(
    stream: bytes, cuts: list[int], unpriced: bool
) -> None:
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise([0, *points, len(stream)]) if b > a]
    coster = UsageCoster("chat.completions", lambda: None if unpriced else PRICE)
    got, _ = relay(chunks, coster)
    if not coster.done:
        assert got == stream
        return
    old, new = the_one_changed_event(stream, got)
    assert new["usage"]["cost_source"] == ("none" if unpriced else "price_table")
    usage = {k: v for k, v in new["usage"].items() if k not in ("cost", "cost_source")}
    assert {**new, "usage": usage} == {**old, "usage": {k: v for k, v in old["usage"].items() if k != "cost"}}
    assert ("cost" in new["usage"]) is not unpriced
