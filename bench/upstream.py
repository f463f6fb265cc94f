"""A fake OpenAI upstream for the benchmark, run as its own process.

It answers `POST /v1/chat/completions` like api.openai.com does (the chunk and body shapes
of the captures in tests/fixtures/openai): a JSON completion, or an SSE stream of a role-only
chunk, `chunks` content chunks, a finish chunk and `[DONE]`, plus the usage chunk (and
`"usage":null` on every chunk) when the request sets `stream_options.include_usage`.

Every byte string is built once at start-up, so the upstream spends as little CPU per request
as possible: on a 2-core machine it shares the cores with the proxy under test.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass

import orjson
from aiohttp import web

# Words of a realistic completion; each content chunk carries one (a token, roughly).
_WORDS = (
    "Sure", "!", " Here", " is", " a", " short", " answer", " to", " your", " question", ":",
    " the", " proxy", " measures", " every", " token", " as", " it", " forwards", " it", ",",
    " and", " the", " client", " sees", " the", " same", " bytes", " it", " would", " see",
    " directly", ".",
)  # fmt: skip
_ID = "chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY"
_CREATED = 1755137921
_MODEL = "gpt-4o-mini-2024-07-18"
_FINGERPRINT = "fp_560af6e559"
_HEADERS_SSE = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Openai-Processing-Ms": "180",
    "Openai-Version": "2020-10-01",
    "X-Request-Id": "req_0b2a28d2d6414b5a94c1c7933cf7c1a6",
    "X-Ratelimit-Remaining-Requests": "499",
}
_HEADERS_JSON = {**_HEADERS_SSE, "Content-Type": "application/json"}
PROMPT_TOKENS = 19


@dataclass(frozen=True)
class Timing:
    """Seconds: before the first content chunk, and between chunks; non-stream: before the body."""

    ttft: float = 0.0
    gap: float = 0.001
    latency: float = 0.0


def _event(choices: list[dict[str, object]], usage: object, obfuscation: str) -> bytes:
    """One chunk event as OpenAI writes it: these keys in this order, no spaces; `usage` is
    left out when it is `...` (the client did not ask for usage)."""
    obj: dict[str, object] = {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": _MODEL,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": choices,
    }
    if usage is not ...:
        obj["usage"] = usage
    obj["obfuscation"] = obfuscation
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(delta: dict[str, object], finish: str | None, with_usage: bool, obfuscation: str) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _event([choice], None if with_usage else ..., obfuscation)


def _usage(completion_tokens: int) -> dict[str, object]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def stream_chunks(n: int, with_usage: bool) -> list[bytes]:
    """The whole stream, one element per chunk the upstream writes."""
    out = [_chunk({"role": "assistant", "content": "", "refusal": None}, None, with_usage, "WuQNX")]
    for i in range(n):
        out.append(_chunk({"content": _WORDS[i % len(_WORDS)]}, None, with_usage, "x" * (1 + i % 9)))
    out.append(_chunk({}, "stop", with_usage, "IPio8PDeczEmdPr"))
    if with_usage:
        out.append(_event([], _usage(n), "t9"))
    out.append(b"data: [DONE]\n\n")
    return out


def completion_body(n: int) -> bytes:
    text = "".join(_WORDS[i % len(_WORDS)] for i in range(n))
    obj = {
        "id": _ID,
        "object": "chat.completion",
        "created": _CREATED,
        "model": _MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(n),
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
    }
    return json.dumps(obj, indent=2).encode() + b"\n"


def make_app(chunks: int, timing: Timing) -> web.Application:
    plain = stream_chunks(chunks, with_usage=False)
    usage = stream_chunks(chunks, with_usage=True)
    body = completion_body(chunks)
    sleep = asyncio.sleep

    async def chat(request: web.Request) -> web.StreamResponse:
        payload = orjson.loads(await request.read())
        if not payload.get("stream"):
            if timing.latency:
                await sleep(timing.latency)
            return web.Response(body=body, headers=_HEADERS_JSON)
        opts = payload.get("stream_options") or {}
        parts = usage if opts.get("include_usage") else plain
        resp = web.StreamResponse(headers=_HEADERS_SSE)
        await resp.prepare(request)
        await resp.write(parts[0])  # role-only chunk: headers and first byte right away
        if timing.ttft:
            await sleep(timing.ttft)
        last = len(parts) - 1
        for i in range(1, len(parts)):
            await resp.write(parts[i])
            if timing.gap and i < last:
                await sleep(timing.gap)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve(port: int, chunks: int, timing: Timing) -> None:
    runner = web.AppRunner(make_app(chunks, timing), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print(f"READY {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    import argparse

    import uvloop

    p = argparse.ArgumentParser(prog="python -m bench upstream")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chunks", type=int, default=64, help="content chunks per stream")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--gap-ms", type=float, default=1.0)
    p.add_argument("--latency-ms", type=float, default=0.0, help="non-stream: delay before the body")
    a = p.parse_args(argv)
    timing = Timing(ttft=a.ttft_ms / 1000, gap=a.gap_ms / 1000, latency=a.latency_ms / 1000)
    uvloop.run(serve(a.port, a.chunks, timing))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
