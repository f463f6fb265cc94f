"""The test support code: capture loading is byte-faithful, the fake upstreams replay it exactly,
with the timing asked for, and notice disconnects promptly. (Uses real sockets on 127.0.0.1.)"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import openai
import pytest

from proxy.sse import SSEParser
from tests.support.cassettes import (
    LLAMACPP_DIR,
    Capture,
    llamacpp_capture,
    llamacpp_capture_names,
    openai_capture,
    openai_captures,
)
from tests.support.fake_upstream import (
    FakeLlamaServer,
    FakeUpstream,
    RecordedRequest,
    Reply,
    openai_stream_with_usage,
    openai_usage_aware,
    responses_body,
    responses_reply,
    responses_stream,
)

ALL_CAPTURES = openai_captures() + [llamacpp_capture(n) for n in llamacpp_capture_names()]


def sse_events(body: bytes) -> list:  # type: ignore[type-arg]
    parser = SSEParser()
    return parser.feed(body) + parser.flush()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- cassettes -------------------------------------------------------------------------------------


def test_openai_bodies_match_recorded_content_length() -> None:
    caps = openai_captures()
    assert len(caps) == 19
    for cap in caps:
        assert cap.header("Content-Encoding") is None, cap.name
        assert cap.content_length >= 0, cap.name
        assert len(cap.body) == cap.content_length, cap.name
        assert len(cap.request_body) == cap.request_content_length, cap.name
        declared = cap.header("Content-Length")
        if declared is not None:
            assert int(declared) == len(cap.body), cap.name


def test_yaml_block_scalar_chomping_preserved() -> None:
    # `|+` keeps every trailing newline, `|` keeps one, `|-` none; quoted scalars keep escapes.
    assert openai_capture("chat-streaming").body.endswith(b"data: [DONE]\n\n")
    assert openai_capture("chat-unknown-model").body.endswith(b"}\n")
    assert not openai_capture("chat-unknown-model").body.endswith(b"\n\n")
    assert openai_capture("chat-basic").body.endswith(b"}")
    assert openai_capture("completion-bad-request").body.startswith(b'{\n  "error": {')


def test_capture_metadata() -> None:
    cap = openai_capture("chat-streaming")
    assert (cap.method, cap.path, cap.status, cap.is_stream) == ("POST", "/v1/chat/completions", 200, True)
    assert cap.request_json["stream"] is True
    assert ("Content-Type", "text/event-stream; charset=utf-8") in cap.headers
    assert not openai_capture("embeddings-basic").is_stream
    assert openai_capture("completion-unknown-model").status == 404


def test_llamacpp_bodies_match_content_length_header() -> None:
    checked = 0
    for name in llamacpp_capture_names():
        cap = llamacpp_capture(name)
        if cap.content_length >= 0:
            assert len(cap.body) == cap.content_length, name
            checked += 1
        else:
            assert cap.header("Content-Length") is None or name == "get_slots_after"
    assert checked >= 20
    stream = llamacpp_capture("post_v1_chat_completions_stream")
    assert stream.is_stream and stream.header("Transfer-Encoding") == "chunked"
    assert llamacpp_capture("err_embeddings_not_enabled").status == 501
    assert llamacpp_capture("get_health_loading").status == 503


def test_llamacpp_request_bodies_follow_readme_table() -> None:
    readme = (LLAMACPP_DIR / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\w+) \| (.*) \|$", readme, flags=re.M))
    literal = 0
    for name in llamacpp_capture_names():
        cap = llamacpp_capture(name)
        assert name in rows, name
        row = rows[name]
        route = re.search(r"`(GET|POST) (/[^`]*)`", row)
        if route:
            assert (cap.method, cap.path) == (route.group(1), route.group(2)), name
        shown = re.search(r"`(\{[^`]*\})`", row)
        if shown and "same" not in row and name != "err_invalid_json":
            assert cap.request_json == json.loads(shown.group(1)), name
            literal += 1
    assert literal == 7
    plain = llamacpp_capture("post_v1_chat_completions_stream").request_json
    usage = llamacpp_capture("post_v1_chat_completions_stream_include_usage").request_json
    assert usage == {**plain, "stream_options": {"include_usage": True}}
    assert llamacpp_capture("err_invalid_json").request_body == b'{"messages": [oops'


# --- replay ------------------------------------------------------------------------------------------


def test_reply_from_capture_splits() -> None:
    cap = openai_capture("chat-streaming")
    events = Reply.from_capture(cap, first_delay=0.5, gap=0.1)
    assert events.body == cap.body
    assert len(events.chunks) == cap.body.count(b"data: ")
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in events.chunks)
    assert events.delays[0] == 0.5 and set(events.delays[1:]) == {0.1}
    assert len(events.delays) == len(events.chunks)
    assert Reply.from_capture(cap, split="whole").chunks == [cap.body]
    tiny = Reply.from_capture(cap, split="bytes")
    assert tiny.body == cap.body and max(map(len, tiny.chunks)) <= 5
    names = {k.lower() for k, _ in Reply.from_capture(openai_capture("embeddings-basic")).headers}
    assert "content-length" not in names and "content-type" in names
    llama = {k.lower() for k, _ in events.from_capture(llamacpp_capture("get_health")).headers}
    assert not llama & {"keep-alive", "content-length", "connection"}


@pytest.mark.parametrize("split", ["events", "whole", "bytes"])
@pytest.mark.parametrize("cap", ALL_CAPTURES, ids=[c.name for c in ALL_CAPTURES])
async def test_replay_is_byte_exact(cap: Capture, split: str, session: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as up:
        up.replay(cap, split=split)
        async with session.request(cap.method, up.url + cap.path, data=cap.request_body) as resp:
            body = await resp.read()
            assert resp.status == cap.status
            assert body == cap.body
            assert resp.headers.get("Content-Type") == cap.header("Content-Type")
            if cap.header("X-Request-Id"):
                assert resp.headers["X-Request-Id"] == cap.header("X-Request-Id")
        recorded = await up.wait_request()
        assert (recorded.method, recorded.path, recorded.body) == (cap.method, cap.path, cap.request_body)


async def test_stream_chunks_arrive_separately(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    cap = openai_capture("chat-streaming-detailed-usage")
    upstream.replay(cap, gap=0.05)
    seen: list[bytes] = []
    async with session.post(upstream.api_base + "/chat/completions", data=cap.request_body) as resp:
        async for chunk, _ in resp.content.iter_chunks():
            seen.append(chunk)
    assert b"".join(seen) == cap.body
    assert seen == [e.raw for e in sse_events(cap.body)]


async def test_first_chunk_delay_observed(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    cap = openai_capture("chat-streaming-detailed-usage")
    upstream.replay(cap, first_delay=0.3)
    t0 = time.perf_counter()
    async with session.post(upstream.api_base + "/chat/completions", data=cap.request_body) as resp:
        headers_at = time.perf_counter() - t0
        first = await resp.content.readany()
        first_at = time.perf_counter() - t0
        rest = await resp.read()
    assert headers_at < 0.2  # headers go out before the delay
    assert 0.29 <= first_at < 0.8
    assert first + rest == cap.body


async def test_headers_delay(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.route("GET", "/slow", Reply(headers_delay=0.2, chunks=[b"ok"]))
    t0 = time.perf_counter()
    async with session.get(upstream.url + "/slow") as resp:
        elapsed = time.perf_counter() - t0
        assert await resp.read() == b"ok"
    assert 0.19 <= elapsed < 0.7


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_disconnect_mid_delay_recorded_within_100ms(
    handler_cancellation: bool, session: aiohttp.ClientSession
) -> None:
    cap = openai_capture("chat-streaming")
    async with FakeUpstream(handler_cancellation=handler_cancellation) as up:
        up.replay(cap, gap=3.0)
        resp = await session.post(up.api_base + "/chat/completions", data=cap.request_body)
        first = await resp.content.readany()
        assert first.startswith(b"data: ")
        closed_ns = time.perf_counter_ns()
        resp.close()  # drops the connection, as a client that gives up does
        record = await up.wait_disconnect(timeout=2.0)
        assert record.path == "/v1/chat/completions"
        assert record.chunks_sent == 1
        assert 0 <= record.t_ns - closed_ns < 100_000_000
        assert record.how == ("cancelled" if handler_cancellation else "poll")
        assert len(up.disconnects) == 1


async def test_disconnect_while_held(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.hold = asyncio.Event()
    upstream.route("GET", "/x", Reply(chunks=[b"never"]))
    task = asyncio.ensure_future(session.get(upstream.url + "/x"))
    await upstream.wait_request()
    closed_ns = time.perf_counter_ns()
    task.cancel()
    record = await upstream.wait_disconnect(timeout=2.0)
    assert record.chunks_sent == 0
    assert record.t_ns - closed_ns < 100_000_000


async def test_completed_response_is_not_a_disconnect(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.replay(openai_capture("chat-streaming-detailed-usage"))
    async with session.post(upstream.api_base + "/chat/completions", data=b"{}") as resp:
        await resp.read()
    await asyncio.sleep(0.05)
    assert upstream.disconnects == []
    with pytest.raises(TimeoutError):
        await upstream.wait_disconnect(timeout=0.05)


async def test_hold_gate(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.hold = asyncio.Event()
    upstream.route("POST", "/v1/chat/completions", Reply(chunks=[b"done"]))
    task = asyncio.ensure_future(session.post(upstream.api_base + "/chat/completions", json={"a": 1}))
    recorded = await upstream.wait_request()
    assert recorded.json == {"a": 1}
    await asyncio.sleep(0.05)
    assert not task.done()
    upstream.hold.set()
    resp = await asyncio.wait_for(task, 2.0)
    assert await resp.read() == b"done"


async def test_recorded_request(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.route("POST", "/v1/embeddings", Reply(status=201, headers=[("X-A", "1"), ("X-A", "2")]))
    async with session.post(
        upstream.api_base + "/embeddings?x=1&x=2",
        data=b"not json",
        headers={"Authorization": "Bearer sk-test", "traceparent": "00-abc-def-01"},
    ) as resp:
        assert resp.status == 201
        assert resp.headers.getall("X-A") == ["1", "2"]
        assert await resp.read() == b""
    req = await upstream.wait_request()
    assert req.method == "POST" and req.path == "/v1/embeddings"
    assert req.query.getall("x") == ["1", "2"]
    assert req.headers["authorization"] == "Bearer sk-test"
    assert req.body == b"not json" and req.json is None
    with pytest.raises(TimeoutError):
        await upstream.wait_request(2, timeout=0.05)


async def test_callable_routes(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    def sync_route(req: RecordedRequest) -> Reply:
        return Reply(chunks=[req.body.upper()])

    async def async_route(req: RecordedRequest) -> Reply:
        await asyncio.sleep(0)
        return Reply(status=202, chunks=[b"async"])

    upstream.route("post", "/a", sync_route)
    upstream.route("POST", "/b", async_route)
    async with session.post(upstream.url + "/a", data=b"abc") as resp:
        assert await resp.read() == b"ABC"
    async with session.post(upstream.url + "/b") as resp:
        assert (resp.status, await resp.read()) == (202, b"async")


async def test_unknown_route_is_openai_404(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    async with session.post(upstream.api_base + "/nope") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == "Invalid URL (POST /v1/nope)"
    assert set(body["error"]) == {"message", "type", "param", "code"}


# --- usage injection helpers ---------------------------------------------------------------------------


def _strip_usage(body: bytes) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    """Undo include_usage on a real capture: drop the usage chunk and every "usage":null."""
    out: list[bytes] = []
    usage: dict = {}  # type: ignore[type-arg]
    for event in sse_events(body):
        if event.data is not None and not event.is_done:
            chunk = json.loads(event.data)
            if chunk["choices"] == [] and chunk["usage"]:
                usage = chunk["usage"]
                continue
            assert event.raw.count(b',"usage":null') == 1
            out.append(event.raw.replace(b',"usage":null', b""))
        else:
            out.append(event.raw)
    return b"".join(out), usage


def test_stream_with_usage_reproduces_real_capture_exactly() -> None:
    real = openai_capture("chat-streaming-detailed-usage").body
    without, usage = _strip_usage(real)
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 100
    assert b'"usage"' not in without
    assert openai_stream_with_usage(without, usage) == real


def test_stream_with_usage_structure_on_plain_capture() -> None:
    cap = openai_capture("chat-streaming")
    usage = {"prompt_tokens": 8, "completion_tokens": 11, "total_tokens": 19}
    out = openai_stream_with_usage(cap.body, usage)
    before = sse_events(cap.body)
    after = sse_events(out)
    assert len(after) == len(before) + 1
    assert after[-1].is_done and after[-2].data is not None
    for old, new in zip(before[:-1], after[:-2]):
        chunk = json.loads(new.data)
        keys = list(chunk)
        assert chunk["usage"] is None
        assert keys.index("usage") == keys.index("choices") + 1
        assert keys[-1] == "obfuscation"
        assert new.raw.replace(b',"usage":null', b"") == old.raw
    final = json.loads(after[-2].data)
    assert final["choices"] == [] and final["usage"] == usage
    assert list(final)[-2:] == ["usage", "obfuscation"]
    assert final["id"] == json.loads(before[0].data)["id"]
    assert final["object"] == "chat.completion.chunk"
    with pytest.raises(ValueError):
        openai_stream_with_usage(out, usage)


def test_stream_with_usage_on_completions_without_obfuscation() -> None:
    out = openai_stream_with_usage(openai_capture("completion-streaming").body, {"prompt_tokens": 1})
    chunks = [json.loads(e.data) for e in sse_events(out) if e.data and not e.is_done]
    assert all(list(c)[-1] == "usage" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["object"] == "text_completion"


async def test_usage_aware_route(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    cap = openai_capture("chat-streaming")
    usage = {"prompt_tokens": 8, "completion_tokens": 11, "total_tokens": 19}
    upstream.route(cap.method, cap.path, openai_usage_aware(cap, usage))
    url = upstream.url + cap.path
    async with session.post(url, json=cap.request_json) as resp:
        assert await resp.read() == cap.body
    asked = {**cap.request_json, "stream_options": {"include_usage": True}}
    async with session.post(url, json=asked) as resp:
        assert await resp.read() == openai_stream_with_usage(cap.body, usage)


# --- llama.cpp -----------------------------------------------------------------------------------------


async def test_fake_llama_server_routes(session: aiohttp.ClientSession) -> None:
    async with FakeLlamaServer() as llama:
        base = llama.url

        async def post(path: str, body: bytes) -> tuple[int, bytes]:
            async with session.post(base + path, data=body) as resp:
                return resp.status, await resp.read()

        for name in (
            "post_v1_chat_completions",
            "post_v1_chat_completions_stream",
            "post_v1_chat_completions_stream_include_usage",
            "post_v1_chat_completions_stream_timings_per_token",
            "post_v1_completions",
            "post_v1_completions_stream",
            "post_v1_completions_stream_include_usage",
            "err_embeddings_not_enabled",
            "err_invalid_json",
            "err_missing_messages",
        ):
            cap = llamacpp_capture(name)
            assert await post(cap.path, cap.request_body) == (cap.status, cap.body), name
        for name in ("get_props", "get_health", "get_v1_models", "get_metrics", "get_slots", "err_404"):
            cap = llamacpp_capture(name)
            async with session.get(base + cap.path) as resp:
                assert (resp.status, await resp.read()) == (cap.status, cap.body), name
                assert resp.headers["Content-Type"] == cap.header("Content-Type")
    async with FakeLlamaServer(embeddings=True) as llama:
        cap = llamacpp_capture("post_v1_embeddings")
        async with session.post(llama.url + cap.path, data=cap.request_body) as resp:
            assert (resp.status, await resp.read()) == (200, cap.body)


async def test_fake_llama_server_timing(session: aiohttp.ClientSession) -> None:
    async with FakeLlamaServer(first_delay=0.1, gap=0.02) as llama:
        cap = llamacpp_capture("post_v1_chat_completions_stream")
        t0 = time.perf_counter()
        async with session.post(llama.api_base + "/chat/completions", data=cap.request_body) as resp:
            first = await resp.content.readany()
            first_at = time.perf_counter() - t0
            rest = await resp.read()
        total = time.perf_counter() - t0
    assert first + rest == cap.body
    events = len(sse_events(cap.body))
    assert first_at >= 0.099
    assert total >= 0.1 + 0.02 * (events - 1) - 0.005


# --- openai SDK against the fakes ----------------------------------------------------------------------


def _client(up: FakeUpstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=up.api_base, api_key="sk-test", max_retries=0, timeout=5.0)


async def test_openai_sdk_reads_replayed_chat_stream(upstream: FakeUpstream) -> None:
    cap = openai_capture("chat-streaming")
    upstream.replay(cap, split="bytes")
    expected = "".join(
        (json.loads(e.data)["choices"][0]["delta"].get("content") or "")
        for e in sse_events(cap.body)
        if e.data and not e.is_done
    )
    async with _client(upstream) as client:
        stream = await client.chat.completions.create(
            model="gpt-5-nano", messages=[{"role": "user", "content": "Hello!"}], stream=True
        )
        text = ""
        finish = None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text == expected and len(text) > 20
    assert finish == "stop"
    assert (await upstream.wait_request()).json["stream"] is True


async def test_openai_sdk_reads_responses_stream(upstream: FakeUpstream) -> None:
    deltas = ["Hel", "lo", ", wor", "ld", "!"]
    usage = {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 17,
    }
    upstream.route("POST", "/v1/responses", responses_reply(responses_stream(deltas, usage), stream=True))
    async with _client(upstream) as client:
        stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
        types: list[str] = []
        got: list[str] = []
        completed = None
        async for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                got.append(event.delta)
            if event.type == "response.completed":
                completed = event.response
    assert got == deltas
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert completed is not None
    assert completed.output_text == "Hello, world!"
    assert completed.usage is not None
    assert completed.usage.input_tokens == 12
    assert completed.usage.input_tokens_details.cached_tokens == 4
    assert completed.usage.output_tokens_details.reasoning_tokens == 0
    assert completed.usage.total_tokens == 17


async def test_openai_sdk_reads_responses_body(upstream: FakeUpstream) -> None:
    usage = {"input_tokens": 9, "output_tokens": 3}
    upstream.route("POST", "/v1/responses", responses_reply(responses_body("Hi there", usage), stream=False))
    async with _client(upstream) as client:
        response = await client.responses.create(model="gpt-4o-mini", input="hi")
    assert response.output_text == "Hi there"
    assert response.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (9, 3, 12)


def test_responses_stream_format() -> None:
    body = responses_stream(["a", "b"], {"input_tokens": 1, "output_tokens": 2}, model="m")
    events = sse_events(body)
    assert not any(e.is_done for e in events)
    payloads = [json.loads(e.data) for e in events]
    assert [p["sequence_number"] for p in payloads] == list(range(len(events)))
    assert all(e.event == p["type"] for e, p in zip(events, payloads))
    assert all(e.raw.startswith(b"event: ") and e.raw.endswith(b"\n\n") for e in events)
    deltas = [p for p in payloads if p["type"] == "response.output_text.delta"]
    assert [d["delta"] for d in deltas] == ["a", "b"]
    assert {d["item_id"] for d in deltas} == {payloads[2]["item"]["id"]}
    final = payloads[-1]["response"]
    assert final["status"] == "completed" and final["model"] == "m"
    assert final["usage"] == {
        "input_tokens": 1,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 3,
    }
    assert payloads[0]["response"]["usage"] is None


def test_responses_reply_headers() -> None:
    reply = responses_reply(responses_stream(["x"], {"input_tokens": 1, "output_tokens": 1}), stream=True)
    assert ("Content-Type", "text/event-stream; charset=utf-8") in reply.headers
    assert len(reply.chunks) == 9
    cap = replace(openai_capture("chat-basic"), body=b"")
    assert Reply.from_capture(cap).chunks == []
