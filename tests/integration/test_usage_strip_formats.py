"""The injected usage chunk never reaches a client that did not ask for usage, whatever the
upstream's JSON and SSE formatting (issue 14, item 1).

The upstream is the fake replaying the real chat-streaming capture, re-written the way other
OpenAI-compatible servers write the same chunks (`StreamDialect`): Python's json.dumps spacing,
another key order, no `"usage": null` in content chunks, CRLF or CR line endings, `data:` without
a space, `: ping` comments and `retry:` lines, pretty-printed chunks over several `data:` lines.
The client is the official `openai` SDK: its chunk loop must never see `choices: []` (the
`chunk.choices[0]` loop breaks on it), while Tollgate still reads the usage the upstream sent.
The raw bytes must equal what the upstream sends a client that did not ask for usage.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.integration.conftest import StartProxy, proxy_yaml
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import FakeUpstream, StreamDialect, dialect_stream, dialect_usage_aware
from tests.support.recorder import Recorder

USAGE: dict[str, Any] = {
    "prompt_tokens": 8,
    "completion_tokens": 26,
    "total_tokens": 34,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
SPACED = (", ", ": ")  # json.dumps' default

DIALECTS: dict[str, tuple[StreamDialect, int | None]] = {
    "openai-bytes": (StreamDialect(), None),
    "spaces": (StreamDialect(separators=SPACED), None),
    "key-order": (StreamDialect(usage_first=True), None),
    "spaces-key-order": (StreamDialect(separators=SPACED, usage_first=True), None),
    "no-usage-null": (StreamDialect(separators=SPACED, usage_null=False), None),
    "crlf": (StreamDialect(separators=SPACED, eol="\r\n"), None),
    "cr": (StreamDialect(eol="\r"), None),
    "data-no-space": (StreamDialect(separators=SPACED, data_prefix="data:"), None),
    "comments-retry": (StreamDialect(separators=SPACED, comments=True, retry=True), None),
    "multi-line": (StreamDialect(indent=2), None),
    "multi-line-usage-first": (StreamDialect(indent=2, separators=(",", ": "), usage_first=True), None),
    # Everything at once, cut into 7-byte reads (events and CRLFs split across reads).
    "all-in-7-byte-reads": (
        StreamDialect(
            separators=SPACED, indent=1, usage_first=True, eol="\r\n", data_prefix="data:", comments=True, retry=True
        ),
        7,
    ),
}


async def _raw(url: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200
        return await r.read()


@pytest.mark.parametrize("name", list(DIALECTS))
async def test_sdk_never_sees_the_injected_usage_chunk(
    start_proxy: StartProxy, fake_openai: FakeUpstream, name: str
) -> None:
    dialect, byte_chunk = DIALECTS[name]
    cap = openai_capture("chat-streaming")
    fake_openai.route("POST", cap.path, dialect_usage_aware(cap, dialect, USAGE, byte_chunk=byte_chunk))
    rec = Recorder()
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base), observers=[rec])
    body = cap.request_json
    assert "stream_options" not in body

    contents: dict[str, str] = {}
    for label, base in (("direct", fake_openai.api_base), ("proxy", proxy.base_url)):
        client = openai.AsyncOpenAI(base_url=base, api_key="sk-client", max_retries=0, timeout=10)
        text: list[str] = []
        n = 0
        async for chunk in await client.chat.completions.create(**body):
            n += 1
            # The loop every quickstart writes: it breaks on a usage-only chunk.
            assert chunk.choices, f"{label}: the SDK saw a chunk with choices: [] ({chunk!r})"
            assert chunk.usage is None
            text.append(chunk.choices[0].delta.content or "")
        assert n > 2
        contents[label] = "".join(text)
        await client.close()
    assert contents["proxy"] == contents["direct"] and contents["proxy"]

    # The upstream was asked for usage, and Tollgate read it.
    assert fake_openai.requests[-1].json["stream_options"] == {"include_usage": True}
    ex = await rec.wait()
    assert ex.usage_injected
    u = ex.usage
    assert u is not None
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens) == (8, 3, 26)
    assert (u.input_source, u.output_source) == ("upstream", "upstream")
    assert ex.output_text.text() == contents["direct"]
    assert not ex.measure_failed

    # Byte for byte what the upstream sends when usage is not asked for.
    raw = await _raw(proxy.base_url + "/chat/completions", body)
    assert raw == dialect_stream(cap, dialect)


async def test_client_that_asks_for_usage_still_gets_it_in_any_dialect(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    dialect = StreamDialect(separators=SPACED, usage_first=True, eol="\r\n")
    cap = openai_capture("chat-streaming")
    fake_openai.route("POST", cap.path, dialect_usage_aware(cap, dialect, USAGE))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    body = {**cap.request_json, "stream_options": {"include_usage": True}}
    raw = await _raw(proxy.base_url + "/chat/completions", body)
    assert raw == dialect_stream(cap, dialect, USAGE)  # nothing stripped: it was the client's own
