"""Upstream faults the earlier suites do not script (see test_failures.py for refused
connections, mid-stream resets, first-byte and idle timeouts): each ends with an
OpenAI-shaped error or a correctly closed stream, recorded in the access log and the
ledger, with no task left behind."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import orjson
import pytest

from tests.integration.conftest import StartProxy, proxy_yaml
from tests.integration.faults_common import recorded, sample, sse_events
from tests.integration.test_failures import (
    CHAT,
    SSE,
    assert_openai_error,
    chunk,
    post,
)
from tests.support.fake_upstream import FakeUpstream, RecordedRequest, Reply, openai_error_body
from tests.support.recorder import Recorder

USAGE = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


def usage_chunk(usage: dict[str, int] = USAGE) -> bytes:
    payload = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(handle: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


async def stream(url: str, body: dict[str, object]) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read(), r.headers["X-Request-Id"]


async def test_reset_before_headers_is_502_and_recorded(start_proxy: StartProxy) -> None:
    attempts = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await read_request(reader)
        writer.transport.abort()  # RST, no status line

    server, base = await raw_server(handle)
    try:
        rec = Recorder()
        proxy = await start_proxy(proxy_yaml(base), observers=[rec])
        status, body, headers = await post(proxy.base_url + "/chat/completions", {**CHAT, "stream": True})
        assert status == 502
        assert_openai_error(body, code="upstream_unreachable")
        # A fresh connection that fails is not retried: the upstream may have acted on it.
        assert attempts == 1
        ex = await rec.wait()
        line, row = await recorded(proxy, headers["X-Request-Id"])
        assert (line["outcome"], line["status"], line["error_type"]) == ("proxy_error", 502, "upstream_unreachable")
        assert (row["outcome"], row["status"], row["cost_nanos"]) == ("proxy_error", 502, 0)
        assert sample(proxy, "tollgate_upstream_errors_total", upstream="openai", error_type="upstream_unreachable") == 1
        assert ex.t_first_byte_ns is None
    finally:
        server.close()


async def test_upstream_5xx_and_429_pass_through_unchanged(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    body_503 = openai_error_body("The engine is currently overloaded.", "server_error", "overloaded")
    fake_openai.route(
        "POST",
        "/v1/chat/completions",
        Reply(status=503, headers=[("Content-Type", "application/json"), ("retry-after", "7")], chunks=[body_503]),
    )
    body_429 = openai_error_body("Rate limit reached.", "requests", "rate_limit_exceeded")
    fake_openai.route(
        "POST",
        "/v1/completions",
        Reply(
            status=429,
            headers=[("Content-Type", "application/json"), ("retry-after", "2"), ("x-ratelimit-reset-requests", "2s")],
            chunks=[body_429],
        ),
    )
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    async with aiohttp.ClientSession() as s:
        for path, status, body, retry in (("/chat/completions", 503, body_503, "7"), ("/completions", 429, body_429, "2")):
            payload = {**CHAT, "stream": True} if path == "/chat/completions" else {"model": "gpt-4o-mini", "prompt": "x"}
            async with s.post(proxy.base_url + path, data=orjson.dumps(payload)) as r:
                assert r.status == status
                assert await r.read() == body  # byte for byte, not re-serialised
                assert r.headers["retry-after"] == retry
                rid = r.headers["X-Request-Id"]
            line, row = await recorded(proxy, rid)
            assert (line["outcome"], line["status"], row["status"]) == ("upstream_error", status, status)
            assert row["cost_nanos"] == 0
    # The SDK sees the status it would see from OpenAI (and its own retry logic applies).
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-x", max_retries=0)
    try:
        await client.completions.create(model="gpt-4o-mini", prompt="x")
    except openai.RateLimitError as err:
        assert err.response.headers["retry-after"] == "2"
    else:
        raise AssertionError("no RateLimitError")


async def test_stream_without_done_that_closes_cleanly_ends_normally(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    chunks = [chunk(0, "Hel"), chunk(1, "lo"), usage_chunk()]  # no `data: [DONE]`
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, chunks=chunks))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False))
    status, raw, rid = await stream(proxy.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and raw == b"".join(chunks)
    line, row = await recorded(proxy, rid)
    assert line["outcome"] == "ok" and line["error_type"] is None
    assert line["tokens"]["output"] == 2 and line["tokens"]["output_source"] == "upstream"
    assert row["output_tokens"] == 2 and row["cost_nanos"] > 0
    # The SDK ends its iteration on the closed stream, with the content it got.
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-x", max_retries=0)
    got = [c async for c in await client.chat.completions.create(**CHAT, stream=True)]  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello"


MALFORMED = [
    chunk(0, "Hel"),
    b"data: {not json at all\n\n",
    b'data: {"choices": "not a list"}\n\n',
    b'data: {"choices": [{"delta": {"content": 42}}]}\n\n',
    b"data: [1, 2, 3]\n\n",
    b"event: mystery\nid: 7\nretry: nope\n\n",
    b": a comment line\n\n",
    b"no colon on this line\n\n",
    b"data: \xff\xfe invalid utf-8\n\n",
    b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "lo"}}]}) + b"\r\n\r\n",
    b"data: [DONE]\n\n",
]


async def test_malformed_sse_and_invalid_json_are_relayed_unchanged_and_measured(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    # Split the events at awkward places too: the tap reassembles, the relay must not.
    body = b"".join(MALFORMED)
    pieces = [body[i : i + 37] for i in range(0, len(body), 37)]
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, chunks=pieces))
    for inject in (False, True):  # True: the usage stripper rewrites the stream event by event
        proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=inject))
        status, raw, rid = await stream(proxy.base_url + "/chat/completions", {**CHAT, "stream": True})
        assert status == 200
        assert raw == body, inject
        line, row = await recorded(proxy, rid)
        assert line["outcome"] == "ok", line
        assert line["ttft_s"] is not None
        # The text it could read ("Hel", "lo") is what the estimate counts.
        assert line["tokens"]["output_source"] == "estimated" and line["tokens"]["output"] >= 1
        assert row["cost_nanos"] > 0


async def test_huge_single_event_is_relayed_whole(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    text = "lorem ipsum dolor sit amet " * (8 * 1024 * 1024 // 27)
    huge = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"
    assert len(huge) > 8 * 1024 * 1024
    chunks = [huge, usage_chunk({"prompt_tokens": 8, "completion_tokens": 1_600_000, "total_tokens": 1_600_008}), b"data: [DONE]\n\n"]
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, chunks=chunks))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    status, raw, rid = await stream(proxy.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    # The injected usage chunk is stripped; the 8 MB event arrives intact.
    assert raw == huge + b"data: [DONE]\n\n"
    line, row = await recorded(proxy, rid)
    assert line["outcome"] == "ok" and row["output_tokens"] == 1_600_000


async def test_gzip_responses_reach_the_client_decoded(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    completion = {
        "id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
    plain = orjson.dumps(completion)
    packed = gzip.compress(plain)
    sse_plain = chunk(0, "Hel") + chunk(1, "lo") + usage_chunk() + b"data: [DONE]\n\n"
    # A gzip stream flushed per event, as a compressing upstream would send it.
    comp = zlib.compressobj(wbits=31)
    sse_parts = [comp.compress(e + b"\n\n") + comp.flush(zlib.Z_SYNC_FLUSH) for e in sse_events(sse_plain)]
    sse_parts.append(comp.flush())

    def reply(request: RecordedRequest) -> Reply:
        if request.json.get("stream"):
            return Reply(headers=[*SSE, ("Content-Encoding", "gzip")], chunks=sse_parts, delays=[0, 0.02, 0.02, 0.02, 0])
        return Reply(
            headers=[("Content-Type", "application/json"), ("Content-Encoding", "gzip"), ("Content-Length", str(len(packed)))],
            chunks=[packed],
        )

    fake_openai.route("POST", "/v1/chat/completions", reply)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False))
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(proxy.base_url + "/chat/completions", data=orjson.dumps(CHAT)) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            assert await r.read() == plain
            rid = r.headers["X-Request-Id"]
        line, row = await recorded(proxy, rid)
        assert line["outcome"] == "ok" and line["tokens"]["output_source"] == "upstream" and row["output_tokens"] == 2
        async with s.post(proxy.base_url + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True})) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            assert await r.read() == sse_plain
            rid = r.headers["X-Request-Id"]
        line, _ = await recorded(proxy, rid)
        assert line["outcome"] == "ok" and line["tokens"]["output"] == 2 and line["ttft_s"] is not None
    # The upstream was asked for no compression, whatever it then did.
    assert all(r.headers["Accept-Encoding"] == "identity" for r in fake_openai.requests)


async def test_keep_alive_closed_under_the_pools_feet_does_not_fail_the_client(start_proxy: StartProxy) -> None:
    """The upstream keeps the connection open after a response, then drops it when the
    next request arrives on it (an idle timeout racing the reuse): the proxy must send
    that request again on a fresh connection instead of failing it."""
    answered = 0
    dropped = 0
    ok = orjson.dumps({"id": "c", "object": "chat.completion", "choices": [], "usage": USAGE})

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered, dropped
        try:
            await read_request(reader)
            answered += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(ok)).encode() + b"\r\n\r\n" + ok
            )
            await writer.drain()
            # The next request on this connection is read and then dropped unanswered.
            await read_request(reader)
            dropped += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server, base = await raw_server(handle)
    try:
        proxy = await start_proxy(proxy_yaml(base))
        for _ in range(4):
            status, body, headers = await post(proxy.base_url + "/chat/completions", CHAT)
            assert status == 200, body
            line, row = await recorded(proxy, headers["X-Request-Id"])
            assert line["outcome"] == "ok" and row["input_tokens"] == 8
        assert answered == 4 and dropped >= 3
    finally:
        server.close()


def _compressors() -> dict[str, Callable[[bytes], bytes]]:
    import brotli
    from backports import zstd  # Python < 3.14; compression.zstd after

    return {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstd.compress,
    }


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
async def test_compressed_request_bodies_reach_the_upstream_consistently(
    start_proxy: StartProxy, fake_openai: FakeUpstream, encoding: str
) -> None:
    """A client that compresses its request body: Tollgate reads (and measures) the decoded
    body, so what it forwards is the decoded body without the client's Content-Encoding."""
    completion = {
        "id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
    fake_openai.route("POST", "/v1/chat/completions", Reply.json(completion))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False))
    plain = orjson.dumps(CHAT)
    packed = _compressors()[encoding](plain)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.base_url + "/chat/completions", data=packed,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        ) as r:
            assert r.status == 200, await r.text()
            rid = r.headers["X-Request-Id"]
    sent = fake_openai.requests[-1]
    assert "Content-Encoding" not in sent.headers
    assert sent.json == CHAT
    line, row = await recorded(proxy, rid)
    assert line["outcome"] == "ok" and row["input_tokens"] == 8


@pytest.mark.parametrize(
    ("encoding", "data", "status", "code"),
    [
        ("gzip", b"this is not gzip", 400, "invalid_body"),
        ("compress", orjson.dumps(CHAT), 415, "unsupported_content_encoding"),
    ],
    ids=["corrupt-gzip", "unknown-encoding"],
)
async def test_undecodable_request_bodies_are_refused_before_the_upstream(
    start_proxy: StartProxy, fake_openai: FakeUpstream, encoding: str, data: bytes, status: int, code: str
) -> None:
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False))
    got, body, _ = await post(
        proxy.base_url + "/chat/completions", data, {"Content-Type": "application/json", "Content-Encoding": encoding}
    )
    assert got == status
    assert_openai_error(body, "invalid_request_error", code)
    assert fake_openai.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_pooled_connection_never_times_out_for_time_no_request_spent(
    start_proxy: StartProxy, stream: bool
) -> None:
    """An upstream that sends a stray CRLF after each response (some servers do) wakes
    aiohttp's read timer on the idle pooled connection. Without care that timer fires
    while the connection sits in the pool, and the next request on it fails in
    milliseconds with a 504, never reaching the upstream."""
    ok = orjson.dumps({"id": "c", "object": "chat.completion", "choices": [], "usage": USAGE})
    event = chunk(0, "hi") + b"data: [DONE]\n\n"
    answered = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        try:
            while True:
                await read_request(reader)
                answered += 1
                if stream:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + f"{len(event):x}\r\n".encode() + event + b"\r\n0\r\n\r\n"
                    )
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(ok)).encode() + b"\r\n\r\n" + ok
                    )
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(b"\r\n")  # the stray bytes, after the response is complete
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server, base = await raw_server(handle)
    try:
        # Both timers short, and a pause between requests longer than either (and far
        # shorter than the pool's 30 s keep-alive, so the connection is reused).
        proxy = await start_proxy(proxy_yaml(base, idle=0.3, first_byte=0.3, inject=False))
        outcomes = []
        for _ in range(4):
            status, body, _ = await post(proxy.base_url + "/chat/completions", {**CHAT, "stream": stream})
            outcomes.append((status, body.get("error", {}).get("code") if "error" in body else None))
            await asyncio.sleep(0.6)
        assert outcomes == [(200, None)] * 4
        assert answered == 4
    finally:
        server.close()


async def test_a_body_over_the_parse_limit_is_billed_from_its_usage(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    """A 40 MB non-stream body (embeddings of many inputs run that large) is relayed whole,
    and its usage, at the end, is read from the tail Tollgate keeps: not estimated."""
    row_json = b'{"object":"embedding","index":0,"embedding":[' + b"0.0123456," * 200 + b"0.1]},"
    rows = 40_000_000 // len(row_json)
    usage = b'{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60}'
    body = b'{"object":"list","model":"gpt-4o-mini","data":[' + row_json * rows + b'{"index":1}],"usage":' + usage + b"}"
    assert len(body) > 32 << 20
    chunks = [body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)]
    fake_openai.route(
        "POST", "/v1/chat/completions",
        Reply(headers=[("Content-Type", "application/json"), ("Content-Length", str(len(body)))], chunks=chunks),
    )
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert await r.read() == body
            rid = r.headers["X-Request-Id"]
    line, row = await recorded(proxy, rid)
    assert (row["input_tokens"], row["output_tokens"]) == (10, 50)
    assert line["tokens"]["input_source"] == "upstream" and line["body_measured"] == "tail"


async def test_a_huge_stream_keeps_bounded_text_and_still_estimates_its_output(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    """A 20 MB stream with no usage: the relay holds a bounded beginning of its text and a
    count of the rest, and the output estimate still covers all of it."""
    rec = Recorder()
    n = 40_000
    word = " hello" * 80  # 480 characters, 80 tokens, per event
    chunks = [b"".join(chunk(i, word) for i in range(j, j + 100)) for j in range(0, n, 100)]
    chunks.append(b"data: [DONE]\n\n")
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, chunks=chunks))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False), observers=[rec])
    status, body, _ = await post(proxy.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and len(body["raw"]) > 20_000_000
    ex = await rec.wait()
    assert ex.output_text.chars == n * len(word)
    assert ex.output_text.kept <= 1 << 16
    assert ex.usage is not None and ex.usage.output_source == "estimated"
    assert abs(ex.usage.output_tokens - n * 80) <= n * 80 // 1000
