"""Drop-in transparency with the official SDK: OpenAI's own request id (`req_...`, what
OpenAI support asks for) reaches `response._request_id` unchanged, Tollgate's id travels in
`x-tollgate-request-id` and names the log line; the upstream's headers come back as sent."""

from __future__ import annotations

import json

import openai

from tests.integration.conftest import StartProxy, proxy_yaml
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.recorder import Recorder


async def test_sdk_sees_the_upstream_request_id(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("chat-basic")
    fake_openai.replay(cap)
    rec = Recorder()
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base), observers=[rec])
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=10)
    raw = await client.chat.completions.with_raw_response.create(**cap.request_json)
    completion = raw.parse()
    assert completion._request_id == "req_ff7b0a8af7a14d1bbe00df50025271ca" == cap.header("x-request-id")
    ex = await rec.wait()
    assert raw.headers["x-tollgate-request-id"] == ex.request_id != completion._request_id
    assert json.loads(proxy.log_lines()[-1])["request_id"] == ex.request_id
    # Every upstream header but hop-by-hop and framing ones comes back unchanged.
    skipped = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}
    for name, value in cap.headers:
        if name.lower() not in skipped:
            assert raw.headers.get(name) == value, name


async def test_upstream_cookies_stay_with_the_client_they_were_set_for(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    """One pooled session serves every client: a cookie the upstream sets (OpenAI sends
    Cloudflare's `__cf_bm`) goes back to the client that got it, never up with another
    client's request. Reached by host name: aiohttp keeps no cookies of an IP address."""
    cap = openai_capture("chat-basic")
    reply = Reply.from_capture(cap)
    fake_openai.route(
        "POST", "/v1/chat/completions",
        Reply(reply.status, [*reply.headers, ("Set-Cookie", "__cf_bm=one-client; path=/; HttpOnly")], reply.chunks),
    )
    api_base = fake_openai.api_base.replace("127.0.0.1", "localhost")
    proxy = await start_proxy(proxy_yaml(api_base))
    first = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=10)
    raw = await first.chat.completions.with_raw_response.create(**cap.request_json)
    assert raw.headers.get("set-cookie") == "__cf_bm=one-client; path=/; HttpOnly"
    other = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-other", max_retries=0, timeout=10)
    await other.chat.completions.create(**cap.request_json)
    assert "Cookie" not in (await fake_openai.wait_request(2)).headers
    # A client's own Cookie header goes up as sent, with nothing added to it.
    await other.chat.completions.create(**cap.request_json, extra_headers={"Cookie": "mine=1"})
    assert (await fake_openai.wait_request(3)).headers.getall("Cookie") == ["mine=1"]
