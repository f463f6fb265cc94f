"""Every failure a client can cause or meet: OpenAI-shaped, recorded once, nothing leaked."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest

from tests.integration.conftest import StartProxy, proxy_yaml
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.procs import free_port
from tests.support.recorder import Recorder

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
SSE = (("Content-Type", "text/event-stream; charset=utf-8"),)


def chunk(i: int, content: str) -> bytes:
    payload = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def post(url: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as r:
            raw = await r.read()
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = {"raw": raw}
            return r.status, parsed, r.headers  # type: ignore[return-value]


def assert_openai_error(body: dict, type_: str | None = None, code: str | None = None) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if type_ is not None:
        assert err["type"] == type_
    if code is not None:
        assert err["code"] == code
    return err


async def test_upstream_unreachable_is_502(start_proxy: StartProxy) -> None:
    rec = Recorder()
    port = free_port()
    proxy = await start_proxy(proxy_yaml(f"http://127.0.0.1:{port}/v1"), observers=[rec])
    status, body, headers = await post(proxy.base_url + "/chat/completions", CHAT)
    assert status == 502
    err = assert_openai_error(body, code="upstream_unreachable")
    ex = await rec.wait()
    assert (ex.outcome, ex.status, ex.error_type) == ("proxy_error", 502, "upstream_unreachable")
    assert headers["X-Request-Id"] == ex.request_id
    # The client learns which configured upstream failed and the id to quote, never the
    # upstream's address or the HTTP library's words; those go to the operator's log.
    assert err["message"] == f"Upstream 'openai' could not be reached. (request id: {ex.request_id})"
    assert str(port) not in err["message"] and "127.0.0.1" not in err["message"]
    line = orjson.loads(proxy.log_lines()[-1])
    assert f"127.0.0.1:{port}" in line["error_detail"]
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert info.value.status_code == 502


async def test_first_byte_timeout_is_504(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    rec = Recorder()
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers_delay=3.0, chunks=[b"{}"]))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, first_byte=0.3), observers=[rec])
    t = time.monotonic()
    status, body, _ = await post(proxy.base_url + "/chat/completions", CHAT)
    assert status == 504 and time.monotonic() - t < 2.0
    assert_openai_error(body, type_="timeout", code="upstream_timeout")
    assert (await rec.wait()).outcome == "proxy_error"


async def test_idle_timeout_mid_stream_ends_with_error_event(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    rec = Recorder()
    fake_openai.route(
        "POST", "/v1/chat/completions", Reply(headers=SSE, chunks=[chunk(0, "Hel"), chunk(1, "lo")], delays=[0, 3.0])
    )
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, idle=0.3), observers=[rec])
    status, body, headers = await post(proxy.base_url + "/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    raw = body["raw"]
    assert raw.startswith(chunk(0, "Hel"))
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ")
    assert_openai_error(orjson.loads(last[6:]), type_="timeout", code="upstream_timeout")
    ex = await rec.wait()
    assert ex.outcome == "proxy_error" and ex.error_type == "upstream_timeout"
    # The SDK raises on the in-stream error instead of ending quietly.
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-x", max_retries=0)
    stream = await client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_reset_mid_stream_is_reported_in_stream(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    rec = Recorder()

    # A raw server that sends headers and one chunk of a chunked body, then drops the socket.
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = chunk(0, "Hel")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode() + body + b"\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(proxy_yaml(f"http://127.0.0.1:{port}/v1"), observers=[rec])
        status, body, _ = await post(proxy.base_url + "/chat/completions", {**CHAT, "stream": True})
        assert status == 200
        last = body["raw"].rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        err = assert_openai_error(orjson.loads(last[6:]), code="upstream_broken")
        ex = await rec.wait()
        assert ex.outcome == "proxy_error" and ex.t_first_token_ns is not None
        assert err["message"] == f"Upstream 'openai' broke off the response. (request id: {ex.request_id})"
        assert ex.error_detail is not None and "Error" in ex.error_detail  # the library's words, kept
    finally:
        server.close()


async def test_body_over_limit_is_413_and_nothing_goes_upstream(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    config = proxy_yaml(fake_openai.api_base).replace("  port: 0\n", "  port: 0\n  max_body_bytes: 1000\n", 1)
    proxy = await start_proxy(config)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    status, body, _ = await post(proxy.base_url + "/chat/completions", big)
    assert status == 413
    assert_openai_error(body, code="request_too_large")
    # Chunked (no Content-Length) is bounded too.
    async def gen():  # type: ignore[no-untyped-def]
        yield orjson.dumps(big)

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", data=gen()) as r:
            assert r.status == 413
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 42}', "model"),
        (b'{"model": "gpt-4o", "stream": "yes"}', "stream"),
        (b'{"model": "gpt-4o", "max_tokens": -1}', "max_tokens"),
        (b'{"model": "gpt-4o", "max_tokens": 1e30}', "max_tokens"),
        (b'{"model": "gpt\\u0000x"}', "model"),
    ],
)
async def test_bad_requests_are_400(start_proxy: StartProxy, fake_openai: FakeUpstream, body: bytes, param: str | None) -> None:
    rec = Recorder()
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base), observers=[rec])
    status, parsed, headers = await post(proxy.base_url + "/chat/completions", body)
    assert status == 400
    err = assert_openai_error(parsed, type_="invalid_request_error")
    assert err["param"] == param
    assert "Traceback" not in err["message"]
    ex = await rec.wait()
    assert ex.outcome == "rejected" and headers["X-Request-Id"] == ex.request_id
    assert fake_openai.requests == []


async def _stream_then_hang_up(url: str, after_bytes: int) -> int:
    """Read the first bytes of a stream, then close the connection; returns perf_counter_ns."""
    session = aiohttp.ClientSession()
    resp = await session.post(url, data=orjson.dumps({**CHAT, "stream": True}), headers={"Content-Type": "application/json"})
    got = 0
    while got < after_bytes:
        got += len(await resp.content.readany())
    t = time.perf_counter_ns()
    resp.close()
    await session.close()
    return t


async def test_client_disconnect_mid_stream_cancels_upstream_within_100ms(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    rec = Recorder()
    fake_openai.route(
        "POST",
        "/v1/chat/completions",
        Reply(headers=SSE, chunks=[chunk(i, f"t{i}") for i in range(50)], delays=[0] + [0.2] * 49),
    )
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False), observers=[rec])
    t_close = await _stream_then_hang_up(proxy.base_url + "/chat/completions", 1)
    gone = await fake_openai.wait_disconnect(timeout=2)
    print(f"mid-stream disconnect: upstream saw it {(gone.t_ns - t_close) / 1e6:.1f} ms after the client closed ({gone.how})")
    assert (gone.t_ns - t_close) / 1e6 < 100
    assert gone.chunks_sent < 50
    ex = await rec.wait()
    assert ex.outcome == "client_gone"
    assert ex.usage is not None and ex.usage.output_source == "estimated"  # partial usage billed


async def test_client_disconnect_while_upstream_thinks_cancels_within_100ms(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    rec = Recorder()
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, headers_delay=5.0, chunks=[chunk(0, "x")]))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base), observers=[rec])
    session = aiohttp.ClientSession()
    task = asyncio.ensure_future(
        session.post(proxy.base_url + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True}))
    )
    await fake_openai.wait_request()
    await asyncio.sleep(0.1)
    t_close = time.perf_counter_ns()
    task.cancel()
    await session.close()
    gone = await fake_openai.wait_disconnect(timeout=2)
    assert (gone.t_ns - t_close) / 1e6 < 100
    ex = await rec.wait()
    assert ex.outcome == "client_gone" and ex.t_first_byte_ns is None


async def test_first_chunk_reaches_client_before_upstream_sends_the_second(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route(
        "POST",
        "/v1/chat/completions",
        Reply(headers=SSE, chunks=[chunk(0, "a"), chunk(1, "b"), b"data: [DONE]\n\n"], delays=[0, 0.3, 0]),
    )
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, inject=False))
    async with aiohttp.ClientSession() as s:
        t_start = time.perf_counter_ns()
        async with s.post(proxy.base_url + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True})) as r:
            first = await r.content.readany()
            t_first = time.perf_counter_ns()
            rest = await r.read()
            t_rest = time.perf_counter_ns()
    assert first == chunk(0, "a")  # one upstream chunk, one client chunk, unchanged
    assert rest.startswith(chunk(1, "b"))
    # The second chunk is only sent 300 ms after the first: the client held the first long before.
    assert (t_rest - t_first) / 1e6 > 250
    assert (t_first - t_start) / 1e6 < 250
    print(f"chunk timing: first chunk at {(t_first - t_start) / 1e6:.1f} ms, second {(t_rest - t_first) / 1e6:.1f} ms later")


async def test_credentials_come_from_config_or_pass_through(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.replay(openai_capture("chat-basic"))
    cap = openai_capture("chat-basic")
    with_key = await start_proxy(proxy_yaml(fake_openai.api_base, openai_key="sk-upstream-secret"))
    await post(with_key.base_url + "/chat/completions", cap.request_body, {"Authorization": "Bearer sk-client"})
    assert fake_openai.requests[-1].headers["Authorization"] == "Bearer sk-upstream-secret"
    without_key = await start_proxy(proxy_yaml(fake_openai.api_base, openai_key=None))
    await post(without_key.base_url + "/chat/completions", cap.request_body, {"Authorization": "Bearer sk-client"})
    assert fake_openai.requests[-1].headers["Authorization"] == "Bearer sk-client"


async def test_request_ids_and_headers(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    headers = (
        ("Content-Type", "application/json"),
        ("x-request-id", "req_upstream_1"),
        ("openai-processing-ms", "12"),
        ("x-ratelimit-remaining-requests", "99"),
        ("retry-after", "3"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
    )
    fake_openai.route("POST", "/v1/chat/completions", Reply(status=429, headers=headers, chunks=[b'{"error": {"message": "slow down", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}']))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    status, body, got = await post(
        proxy.base_url + "/chat/completions", CHAT, {"x-request-id": "my-trace-42", "Connection": "keep-alive", "TE": "trailers"}
    )
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"  # passed through unchanged
    # The upstream's id reaches the client unchanged (the SDK's response.request_id);
    # Tollgate's (here the client's own) is in its own header.
    assert got["X-Request-Id"] == "req_upstream_1"
    assert got["X-Tollgate-Request-Id"] == "my-trace-42"
    assert "X-Upstream-Request-Id" not in got
    assert got["openai-processing-ms"] == "12"
    assert got["x-ratelimit-remaining-requests"] == "99"
    assert got["retry-after"] == "3"
    assert "Proxy-Authenticate" not in got
    upstream_saw = fake_openai.requests[-1].headers
    assert upstream_saw["X-Request-Id"] == "my-trace-42"
    assert "TE" not in upstream_saw
    # Without an incoming id, one is made; a hostile one is replaced.
    _, _, got2 = await post(proxy.base_url + "/chat/completions", CHAT, {"x-request-id": "bad id\twith spaces"})
    assert got2["X-Tollgate-Request-Id"].startswith("tg-")
    assert fake_openai.requests[-1].headers["X-Request-Id"] == got2["X-Tollgate-Request-Id"]


async def test_passthrough_paths_models_and_probes(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    fake_openai.route("GET", "/v1/files", Reply.json({"object": "list", "data": []}))
    fake_openai.route(
        "GET",
        "/v1/models",
        Reply.json({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "system"},
            {"id": "whisper-1", "object": "model", "created": 1, "owned_by": "system"},
        ]}),
    )
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, default_upstream="openai"))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base_url + "/files?purpose=batch") as r:
            assert r.status == 200 and (await r.json())["object"] == "list"
        assert fake_openai.requests[-1].path == "/v1/files"
        assert fake_openai.requests[-1].query["purpose"] == "batch"
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/nope") as r:
            assert r.status == 404
            assert_openai_error(await r.json())
        async with s.get(proxy.base_url + "/chat/completions") as r:
            assert r.status == 405
            assert_openai_error(await r.json(), code="method_not_allowed")
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-x", max_retries=0)
    ids = [m.id async for m in client.models.list()]
    # whisper-1 would route to the default upstream, which is openai: listed; both come from it.
    assert "gpt-4o-mini" in ids

    no_default = await start_proxy(proxy_yaml(fake_openai.api_base))
    async with aiohttp.ClientSession() as s:
        async with s.get(no_default.base_url + "/files") as r:
            assert r.status == 404
            assert_openai_error(await r.json(), code="not_found")
    client = openai.AsyncOpenAI(base_url=no_default.base_url, api_key="sk-x", max_retries=0)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["gpt-4o-mini"]  # whisper-1 matches no route and there is no default


async def test_readyz_is_503_when_sessions_are_closed(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    for upstream in proxy.runtime.upstreams.values():
        await upstream.session.close()
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 503


async def test_models_retrieve_answers_for_every_listed_model(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    """Issue 15: `client.models.retrieve(id)` for an id `models.list()` shows. Aliases live
    only in Tollgate (the upstream would 404 on them), ids may hold '/', and an id the list
    does not show is an OpenAI-shaped 404 `model_not_found`, never forwarded."""
    fake_openai.route(
        "GET",
        "/v1/models",
        Reply.json({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "system"},
            {"id": "whisper-1", "object": "model", "created": 1, "owned_by": "system"},
        ]}),
    )
    aliases = "routes:\n  - models: [fast, team/smart]\n    upstream: openai\n    model: gpt-4o-mini\n"
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base).replace("routes:\n", aliases, 1))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-x", max_retries=0)
    listed = [m async for m in client.models.list()]
    assert [m.id for m in listed] == ["fast", "team/smart", "gpt-4o-mini"]
    upstream_calls = len(fake_openai.requests)
    for m in listed:
        got = await client.models.retrieve(m.id)
        assert got.id == m.id and got.object == "model" and got.owned_by == m.owned_by
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("whisper-1")  # the upstream has it, but no route reaches it
    assert missing.value.code == "model_not_found" and "whisper-1" in missing.value.message
    assert all(r.path == "/v1/models" for r in fake_openai.requests[upstream_calls:])
