"""A synthetic OpenAI-compatible upstream with known tokens and known timing, for `tollgate demo`.

This is not part of the production path: nothing in the request path imports it (only
proxy/demo.py and tests do). It answers POST /v1/chat/completions, /v1/completions,
/v1/embeddings and GET /v1/models the way OpenAI does, including the stream-usage protocol
(`stream_options.include_usage`: `"usage":null` on every chunk, then one chunk with
`"choices":[]` and the usage before `[DONE]`).

Its output is exactly knowable: each emitted token is one word from `WORDS` with a leading
space, which is one o200k_base token, and words that each pre-tokenize on their own stay one
token each when concatenated. Reported usage agrees with that: completion tokens are the
words sent, prompt tokens are `proxy.estimate.estimate_prompt_tokens` of the request, so a
local estimate and the "upstream" count are the same truth.

Timing: a chat stream writes the role-only chunk at once, the first token `ttft_s` after the
request arrived, then one token every `gap_s` (never closer than half a gap when late). Every
write is timestamped with `time.perf_counter_ns()` after it returned, and kept per request
(keyed by the X-Request-Id the proxy sends), so a caller in the same process can compare what
the proxy measured with when the bytes actually left.

It is the one fake OpenAI generator of the project: `tollgate demo` runs it in process, and
the benchmark runs it as its own process (`python -m bench upstream`) with `record=False`:
no per-request record kept, and each stream's bytes built once and reused, so it spends as
little CPU as possible beside the proxy under test. (The tests' own fake upstream is a
player of real captures, byte for byte, not a second generator.)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.estimate import estimate_prompt_tokens
from proxy.synthetic_truth import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    WORDS,
    Truth,
    check_vocabulary,
    completion_words,
    embedding_inputs,
    vector,
)

__all__ = ["WORDS", "SyntheticUpstream", "Truth", "completion_words"]

_PAD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _obfuscation_pads() -> itertools.cycle[str]:
    """What OpenAI's `obfuscation` field holds: letters and digits, 0 to 15 of them, varying
    chunk by chunk. Fixed here (a stream built once is the same bytes every time)."""
    lengths = [2, 2, 14, 3, 0, 0, 2, 10, 11, 3, 2, 7, 15, 1, 5, 9]
    return itertools.cycle(
        [(_PAD_ALPHABET[i % 62 :] + _PAD_ALPHABET)[:n] for i, n in enumerate(lengths)]
    )


class SyntheticUpstream:
    """The server. Use as `async with SyntheticUpstream(...) as syn: syn.base_url ...`."""

    def __init__(
        self,
        *,
        ttft_s: float = 0.2,
        gap_s: float = 0.02,
        tokens: int = 16,
        models: tuple[str, ...] = ("demo-model", "demo-embedding"),
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        body_delay_s: float | None = None,
    ) -> None:
        """`record`: keep each request's `Truth` (the demo compares with it); off, memory
        stays flat under any load. `body_delay_s`: a non-stream answer comes this long after
        the request instead of when generation would have finished."""
        if ttft_s < 0 or gap_s < 0:
            raise ValueError("ttft_s and gap_s must be >= 0")
        if tokens < 1:
            raise ValueError("tokens must be >= 1")
        self.ttft_s = ttft_s
        self.gap_s = gap_s
        self.tokens = tokens
        self.models = models
        self.host = host
        self.port = port
        self.record = record
        self.body_delay_s = body_delay_s
        self.truths: dict[str, Truth] = {}
        # Without a record, every stream of one shape is the same bytes: built once.
        self._streams: dict[tuple[object, ...], list[bytes]] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        return app

    async def start(self) -> None:
        check_vocabulary(self.models[0])
        runner = web.AppRunner(self.make_app(), access_log=None)
        await runner.setup()
        # A deep backlog: the benchmark opens hundreds of connections at once.
        site = web.TCPSite(runner, self.host, self.port, backlog=4096)
        await site.start()
        self._runner = runner
        for addr in runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                self._bound_port = int(addr[1])
                break

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SyntheticUpstream:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """The API base as the OpenAI SDK takes it (ends in /v1)."""
        if self._bound_port is None:
            raise RuntimeError("synthetic upstream is not started")
        return f"http://{self.host}:{self._bound_port}/v1"

    def truth_for(self, request_id: str) -> Truth | None:
        return self.truths.get(request_id)

    async def wait_done(self, request_ids: list[str], timeout: float) -> bool:
        """Wait (bounded) until these requests are fully written; True if they all are.

        The client can see a response end a moment before the upstream's handler resumes
        to stamp its last write.
        """
        deadline = time.monotonic() + timeout
        while True:
            truths = [self.truths.get(rid) for rid in request_ids]
            if all(t is not None and (t.t_done_ns is not None or t.aborted) for t in truths):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ handlers

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tollgate-synthetic"} for m in self.models]
        return _json(200, {"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat.completions")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        t_received = time.perf_counter_ns()
        body = await _read_json(request)
        if isinstance(body, web.Response):
            return body
        field_name = "messages" if endpoint == "chat.completions" else "prompt"
        if field_name not in body:
            return _error(400, f"Missing required parameter: '{field_name}'.", field_name)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "Missing required parameter: 'model'.", "model")
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        n, finish = self._length(body)
        truth = Truth(
            request_id=self._request_id(request),
            endpoint=endpoint,
            model=model,
            stream=stream,
            include_usage=include_usage,
            t_received_ns=t_received,
            prompt_tokens=estimate_prompt_tokens(endpoint, body, model),
            completion_tokens=n,
            finish_reason=finish,
        )
        if self.record:
            self.truths[truth.request_id] = truth
        words = completion_words(n)
        truth.text = "".join(words)
        try:
            if stream:
                return await self._stream(request, truth, words)
            return await self._whole(request, truth)
        except (ConnectionError, asyncio.CancelledError):
            truth.aborted = True
            raise

    def _length(self, body: dict[str, Any]) -> tuple[int, str]:
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(cap, int) and not isinstance(cap, bool) and 0 < cap < self.tokens:
            return cap, "length"
        return self.tokens, "stop"

    def _request_id(self, request: web.Request) -> str:
        rid = request.headers.get("X-Request-Id")
        return rid if rid else f"syn-{next(self._ids)}"

    async def _sleep_until(self, t_ns: int) -> None:
        delay = (t_ns - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)

    def _target_ns(self, truth: Truth, index: int) -> int:
        return truth.t_received_ns + int((self.ttft_s + index * self.gap_s) * 1e9)

    async def _stream(self, request: web.Request, truth: Truth, words: list[str]) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
        role, tokens, tail = self._events(truth, words)
        if role is not None:
            await resp.write(role)
            truth.t_role_ns = time.perf_counter_ns()
        for i, event in enumerate(tokens):
            # On an absolute schedule (so timer granularity does not add up), but never less
            # than half a gap after the previous write when running late: two writes back to
            # back would reach the reader as one chunk, and the truth would hold a gap
            # nobody could have measured.
            delay = (self._target_ns(truth, i) - time.perf_counter_ns()) / 1e9
            await asyncio.sleep(delay if i == 0 else max(delay, self.gap_s / 2))
            await resp.write(event)
            if self.record:
                truth.token_times_ns.append(time.perf_counter_ns())
        for event in tail:
            await resp.write(event)
        await resp.write_eof()
        truth.t_done_ns = time.perf_counter_ns()
        return resp

    def _events(self, truth: Truth, words: list[str]) -> tuple[bytes | None, list[bytes], list[bytes]]:
        """The stream's events: the role-only chunk (chat), one per token, and the rest
        (finish, usage, [DONE]). Without a record they do not depend on the request's id,
        so each shape is built once."""
        chat = truth.endpoint == "chat.completions"
        key = (truth.endpoint, truth.model, truth.include_usage, len(words), truth.finish_reason, truth.prompt_tokens)
        if not self.record:
            cached = self._streams.get(key)
            if cached is not None:
                return (cached[0] if chat else None), cached[1 : 1 + len(words)], cached[1 + len(words) :]
        seed = truth.request_id if self.record else "synthetic"
        rid = ("chatcmpl-" if chat else "cmpl-") + hashlib.sha256(seed.encode()).hexdigest()[:24]
        created = int(time.time())

        pads = _obfuscation_pads()

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
            if chat:
                # The shape of OpenAI's chunks since 2025, key for key as captured in
                # tests/fixtures/openai/chat-streaming.yaml: a service tier, no logprobs, and
                # an `obfuscation` string of random length last on every chunk.
                payload: dict[str, Any] = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": truth.model,
                    "service_tier": "default",
                    "system_fingerprint": None,
                    "choices": choices,
                }
            else:
                payload = {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "choices": choices,
                    "model": truth.model,
                }
            if truth.include_usage:
                payload["usage"] = usage
            if chat:
                payload["obfuscation"] = next(pads)
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        role_delta = {"role": "assistant", "content": "", "refusal": None}
        role = chunk([{"index": 0, "delta": role_delta, "finish_reason": None}])
        tokens = []
        last = len(words) - 1
        for i, word in enumerate(words):
            if chat:
                choice = {"index": 0, "delta": {"content": word}, "finish_reason": None}
            else:
                # Completions carry the finish reason on the last text chunk, as OpenAI does.
                reason = truth.finish_reason if i == last else None
                choice = {"text": word, "index": 0, "logprobs": None, "finish_reason": reason}
            tokens.append(chunk([choice]))
        tail = []
        if chat:
            tail.append(chunk([{"index": 0, "delta": {}, "finish_reason": truth.finish_reason}]))
        if truth.include_usage:
            tail.append(chunk([], self._usage(truth)))
        tail.append(b"data: [DONE]\n\n")
        if not self.record and len(self._streams) < 64:
            self._streams[key] = [role, *tokens, *tail]
        return (role if chat else None), tokens, tail

    async def _whole(self, request: web.Request, truth: Truth) -> web.StreamResponse:
        # A non-stream answer arrives when generation would have finished (or after the
        # delay it was given).
        if self.body_delay_s is None:
            await self._sleep_until(self._target_ns(truth, truth.completion_tokens - 1))
        elif self.body_delay_s > 0:
            await self._sleep_until(truth.t_received_ns + int(self.body_delay_s * 1e9))
        rid_hash = hashlib.sha256(truth.request_id.encode()).hexdigest()[:24]
        created = int(time.time())
        if truth.endpoint == "chat.completions":
            message: dict[str, Any] = {"role": "assistant", "content": truth.text, "refusal": None, "annotations": []}
            payload: dict[str, Any] = {
                "id": "chatcmpl-" + rid_hash,
                "object": "chat.completion",
                "created": created,
                "model": truth.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": truth.finish_reason}
                ],
                "usage": self._usage(truth),
                "system_fingerprint": None,
            }
        else:
            payload = {
                "id": "cmpl-" + rid_hash,
                "object": "text_completion",
                "created": created,
                "model": truth.model,
                "choices": [
                    {"text": truth.text, "index": 0, "logprobs": None, "finish_reason": truth.finish_reason}
                ],
                "usage": self._usage(truth),
            }
        return await self._write_body(request, truth, orjson.dumps(payload))

    async def _write_body(self, request: web.Request, truth: Truth, body: bytes) -> web.StreamResponse:
        # A StreamResponse rather than web.Response, so the moment the body left is known.
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body)
        truth.t_body_ns = time.perf_counter_ns()
        await resp.write_eof()
        truth.t_done_ns = time.perf_counter_ns()
        return resp

    def _usage(self, truth: Truth) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": truth.prompt_tokens,
            "completion_tokens": truth.completion_tokens,
            "total_tokens": truth.prompt_tokens + truth.completion_tokens,
        }
        if truth.endpoint == "chat.completions":
            usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
            usage["completion_tokens_details"] = {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            }
        return usage

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        t_received = time.perf_counter_ns()
        body = await _read_json(request)
        if isinstance(body, web.Response):
            return body
        model = body.get("model")
        raw_input = body.get("input")
        if not isinstance(model, str) or not model:
            return _error(400, "Missing required parameter: 'model'.", "model")
        inputs = embedding_inputs(raw_input)
        if inputs is None:
            return _error(400, "'input' must be a string, a list of strings or token arrays.", "input")
        dims = body.get("dimensions")
        if not (isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims <= 4096):
            dims = DEFAULT_EMBEDDING_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        truth = Truth(
            request_id=self._request_id(request),
            endpoint="embeddings",
            model=model,
            stream=False,
            include_usage=False,
            t_received_ns=t_received,
            prompt_tokens=estimate_prompt_tokens("embeddings", body, model),
        )
        if self.record:
            self.truths[truth.request_id] = truth
        try:
            # Embedding is one forward pass: the answer comes after one "time to first token".
            await self._sleep_until(self._target_ns(truth, 0))
            data = []
            for index, item in enumerate(inputs):
                values = vector(item, dims)
                embedding: Any = (
                    base64.b64encode(struct.pack(f"<{dims}f", *values)).decode() if as_base64 else values
                )
                data.append({"object": "embedding", "index": index, "embedding": embedding})
            payload = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": truth.prompt_tokens, "total_tokens": truth.prompt_tokens},
            }
            return await self._write_body(request, truth, orjson.dumps(payload))
        except (ConnectionError, asyncio.CancelledError):
            truth.aborted = True
            raise


async def _read_json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "We could not parse the JSON body of your request.", None)
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.", None)
    return body


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _error(status: int, message: str, param: str | None) -> web.Response:
    return _json(
        status,
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}},
    )
