"""Fake OpenAI-compatible upstreams for integration tests.

`FakeUpstream` is a real aiohttp server on 127.0.0.1 (ephemeral port) that replays recorded
responses byte for byte, with controllable timing, and records what it received and when a
client went away. `FakeLlamaServer` serves the llama.cpp fixtures on llama-server's routes.

Disconnects are detected three ways, so they are recorded whether or not aiohttp cancels the
handler: every wait (delays, `hold`) polls the transport every `POLL_S`; a write to a closed
transport raises ConnectionResetError; and with handler_cancellation=True the CancelledError is
caught. The first of these records the time with `perf_counter_ns`.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict, MultiDict

from proxy.sse import SSEParser
from tests.support.cassettes import Capture, llamacpp_capture

# How often a waiting handler checks whether its client is still there.
POLL_S = 0.002

# Framing and per-connection headers: aiohttp writes its own.
_DROP_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: MultiDict[str]
    headers: CIMultiDict[str]
    body: bytes
    json: Any
    t_ns: int  # perf_counter_ns when the body had been read


@dataclass(frozen=True)
class DisconnectRecord:
    path: str
    t_ns: int  # perf_counter_ns when the server noticed the client had gone
    chunks_sent: int
    how: Literal["poll", "write", "cancelled"]


@dataclass(frozen=True)
class ChunkWrite:
    path: str
    index: int  # position of the chunk in its Reply
    t_ns: int  # perf_counter_ns just before the chunk was handed to the transport
    data: bytes
    request_no: int = -1  # which request it answers: its position in FakeUpstream.requests


@dataclass
class Reply:
    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    chunks: Sequence[bytes] = ()
    delays: Sequence[float] = ()  # seconds before each chunk; missing entries mean 0
    headers_delay: float = 0.0

    @classmethod
    def from_capture(
        cls,
        cap: Capture,
        *,
        split: Literal["events", "whole", "bytes"] = "events",
        first_delay: float = 0.0,
        gap: float = 0.0,
        byte_chunk: int = 5,
    ) -> Reply:
        body = cap.body
        if split == "whole" or not body:
            chunks = [body] if body else []
        elif split == "events":
            if cap.is_stream:
                parser = SSEParser()
                chunks = [e.raw for e in parser.feed(body) + parser.flush()]
            else:
                chunks = [body]
        elif split == "bytes":
            chunks = [body[i : i + byte_chunk] for i in range(0, len(body), byte_chunk)]
        else:
            raise ValueError(f"unknown split {split!r}")
        delays = [first_delay] + [gap] * (len(chunks) - 1) if chunks else []
        return cls(
            status=cap.status,
            headers=strip_framing_headers(cap.headers),
            chunks=chunks,
            delays=delays,
        )

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Reply:
        return cls(
            status=status,
            headers=[("Content-Type", "application/json"), *headers],
            chunks=[json.dumps(obj).encode()],
        )

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def strip_framing_headers(headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers if k.lower() not in _DROP_HEADERS)


ReplySource = Reply | Callable[[RecordedRequest], Reply | Awaitable[Reply]]


def openai_error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, indent=2
    ).encode() + b"\n"


class FakeUpstream:
    def __init__(self, *, handler_cancellation: bool = False) -> None:
        self._handler_cancellation = handler_cancellation
        self._routes: dict[tuple[str, str], ReplySource] = {}
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[DisconnectRecord] = []
        # Every response chunk written, in order: the timing truth fidelity tests compare to.
        self.writes: list[ChunkWrite] = []
        self.hold: asyncio.Event | None = None
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # shutdown_timeout bounds close() even if a test leaves a handler mid-stream.
        runner = web.AppRunner(
            app,
            handler_cancellation=self._handler_cancellation,
            access_log=None,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + "/v1"

    # --- configuration --------------------------------------------------------------------------

    def route(self, method: str, path: str, reply: ReplySource) -> None:
        self._routes[(method.upper(), path)] = reply

    def replay(self, cap: Capture, **from_capture_kwargs: Any) -> None:
        self.route(cap.method, cap.path, Reply.from_capture(cap, **from_capture_kwargs))

    def not_found(self, request: RecordedRequest) -> Reply:
        # What api.openai.com answers for a URL it does not serve.
        body = openai_error_body(
            f"Invalid URL ({request.method} {request.path})", "invalid_request_error"
        )
        return Reply(status=404, headers=[("Content-Type", "application/json")], chunks=[body])

    # --- waiting --------------------------------------------------------------------------------

    async def wait_request(self, n: int = 1, timeout: float = 5.0) -> RecordedRequest:
        """The n-th request received (1-based), waiting up to `timeout` for it."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.requests) >= n), timeout)
            return self.requests[n - 1]

    async def wait_disconnect(self, timeout: float = 5.0, *, n: int = 1) -> DisconnectRecord:
        """The n-th client disconnect seen mid-response (1-based)."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.disconnects) >= n), timeout
            )
            return self.disconnects[n - 1]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- serving --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=MultiDict(request.query),
            headers=CIMultiDict(request.headers),
            body=body,
            json=parsed,
            t_ns=time.perf_counter_ns(),
        )
        state = _Progress(request_no=len(self.requests))
        self.requests.append(recorded)
        await self._notify()
        try:
            return await self._respond(request, recorded, state)
        except asyncio.CancelledError:
            if not state.finished and not self._closing.is_set():
                self._record(recorded.path, state.chunks_sent, "cancelled")
            raise

    async def _respond(
        self, request: web.Request, recorded: RecordedRequest, state: _Progress
    ) -> web.StreamResponse:
        if self.hold is not None and not await self._wait_gate(request, self.hold):
            return self._gone(recorded, state, "poll")
        source = self._routes.get((recorded.method, recorded.path))
        if source is None:
            reply = self.not_found(recorded)
        elif isinstance(source, Reply):
            reply = source
        else:
            produced = source(recorded)
            reply = await produced if inspect.isawaitable(produced) else produced
        if reply.headers_delay > 0 and not await self._sleep(request, reply.headers_delay):
            return self._gone(recorded, state, "poll")
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in reply.headers:
            headers.add(key, value)
        response = web.StreamResponse(status=reply.status, headers=headers)
        try:
            await response.prepare(request)
            for i, chunk in enumerate(reply.chunks):
                delay = reply.delays[i] if i < len(reply.delays) else 0.0
                if delay > 0 and not await self._sleep(request, delay):
                    self._gone(recorded, state, "poll")
                    return response
                self.writes.append(ChunkWrite(recorded.path, i, time.perf_counter_ns(), chunk, state.request_no))
                await response.write(chunk)
                state.chunks_sent += 1
            await response.write_eof()
        except ConnectionResetError:
            self._gone(recorded, state, "write")
            return response
        state.finished = True
        return response

    def _gone(
        self, recorded: RecordedRequest, state: _Progress, how: Literal["poll", "write", "cancelled"]
    ) -> web.Response:
        state.finished = True
        if not self._closing.is_set():  # a server shutting down is not a client leaving
            self._record(recorded.path, state.chunks_sent, how)
        return web.Response(status=499)

    def _record(self, path: str, chunks_sent: int, how: Literal["poll", "write", "cancelled"]) -> None:
        self.disconnects.append(
            DisconnectRecord(path=path, t_ns=time.perf_counter_ns(), chunks_sent=chunks_sent, how=how)
        )
        # Waiters are woken from a task: a cancelled handler cannot await the condition.
        task = asyncio.get_running_loop().create_task(self._notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sleep(self, request: web.Request, seconds: float) -> bool:
        """Sleep, returning False as soon as the client disconnects (or the server closes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if _client_gone(request) or self._closing.is_set():
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(POLL_S, remaining))

    async def _wait_gate(self, request: web.Request, gate: asyncio.Event) -> bool:
        while not gate.is_set():
            if _client_gone(request) or self._closing.is_set():
                return False
            try:
                await asyncio.wait_for(gate.wait(), POLL_S)
            except TimeoutError:
                pass
        return True


@dataclass
class _Progress:
    chunks_sent: int = 0
    finished: bool = False
    request_no: int = -1


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    # aiohttp pauses reading while a handler runs, so a client's FIN is not seen until a
    # write fails; peeking at the socket sees it at once, as a real front end would.
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    sock = getattr(sock, "_sock", sock)  # asyncio's TransportSocket wrapper hides recv()
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


# --- usage injection helpers ----------------------------------------------------------------------

_OBFUSCATION_KEY = b',"obfuscation":'


def _with_usage_null(data: bytes) -> bytes:
    # OpenAI puts "usage" after "choices" and before "obfuscation" (see
    # chat-streaming-detailed-usage.yaml); streams without obfuscation get it last.
    at = data.rfind(_OBFUSCATION_KEY)
    if at < 0:
        at = data.rstrip().rfind(b"}")
        if at < 0:
            raise ValueError(f"not a JSON object: {data[:80]!r}")
    return data[:at] + b',"usage":null' + data[at:]


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def openai_stream_with_usage(body: bytes, usage: dict[str, Any], *, obfuscation: str = "t9") -> bytes:
    """What OpenAI sends for `body`'s request had it asked stream_options.include_usage=true.

    Each chunk gets `"usage":null`, and a chunk with `"choices":[]` and the usage goes before
    `data: [DONE]`. Original chunk bytes are kept; only the added chunk is serialised here.
    `obfuscation` pads the added chunk (OpenAI sends random characters there).
    """
    parser = SSEParser()
    out: list[bytes] = []
    last: dict[str, Any] | None = None
    for event in parser.feed(body) + parser.flush():
        if event.data is None or event.is_done:
            if event.is_done:
                if last is None:
                    raise ValueError("stream has no chunks before [DONE]")
                out.append(b"data: " + _compact(_usage_chunk(last, usage, obfuscation)) + b"\n\n")
            out.append(event.raw)
            continue
        chunk = json.loads(event.data)
        if "usage" in chunk:
            raise ValueError("stream already carries usage")
        out.append(event.raw.replace(event.data, _with_usage_null(event.data), 1))
        last = chunk
    return b"".join(out)


def _usage_chunk(last: dict[str, Any], usage: dict[str, Any], obfuscation: str) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for key, value in last.items():
        if key == "obfuscation":
            final["usage"] = usage
            final["obfuscation"] = obfuscation
        elif key == "choices":
            final["choices"] = []
        else:
            final[key] = value
    final.setdefault("usage", usage)
    return final


def include_usage_requested(request: RecordedRequest) -> bool:
    body = request.json if isinstance(request.json, dict) else {}
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_usage_aware(
    cap: Capture, usage: dict[str, Any], **kw: Any
) -> Callable[[RecordedRequest], Reply]:
    """Route handler: the with-usage variant of `cap` when the request asked for it."""
    plain = Reply.from_capture(cap, **kw)
    with_usage = Reply.from_capture(replace(cap, body=openai_stream_with_usage(cap.body, usage)), **kw)

    def handler(request: RecordedRequest) -> Reply:
        return with_usage if include_usage_requested(request) else plain

    return handler


# --- OpenAI-compatible servers that format their streams their own way ------------------------------


@dataclass(frozen=True)
class StreamDialect:
    """How an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, LM Studio, Azure...) may
    write the same chat stream: the chunks mean what OpenAI's mean, the bytes differ."""

    separators: tuple[str, str] = (",", ":")  # json.dumps default is (", ", ": ")
    indent: int | None = None  # pretty-printed: one chunk over several `data:` lines
    usage_first: bool = False  # "usage" as the first key, the other keys reversed
    usage_null: bool = True  # "usage": null in every chunk once usage is asked for
    eol: str = "\n"  # line ending: "\n", "\r\n" or "\r"
    data_prefix: str = "data: "  # or "data:" (the space is optional)
    comments: bool = False  # `: ping` keep-alive blocks, and a comment line in the usage block
    retry: bool = False  # a `retry:` line in the first block


def _dialect_json(obj: dict[str, Any], dialect: StreamDialect) -> str:
    if dialect.usage_first and "usage" in obj:
        obj = {"usage": obj["usage"], **dict(reversed([(k, v) for k, v in obj.items() if k != "usage"]))}
    elif dialect.usage_first:
        obj = dict(reversed(list(obj.items())))
    return json.dumps(obj, separators=dialect.separators, indent=dialect.indent)


def _dialect_block(text: str, dialect: StreamDialect, head: str = "") -> bytes:
    eol = dialect.eol
    lines = head + "".join(dialect.data_prefix + line + eol for line in text.split("\n"))
    return (lines + eol).encode()


def dialect_stream(
    cap: Capture, dialect: StreamDialect, usage: dict[str, Any] | None = None
) -> bytes:
    """`cap`'s chat stream as a server of `dialect` writes it; with `usage`, as it writes it
    when asked for stream_options.include_usage (the usage chunk before [DONE], and
    `"usage": null` in every chunk if the dialect does that)."""
    parser = SSEParser()
    chunks = [json.loads(e.data) for e in parser.feed(cap.body) + parser.flush() if e.data and not e.is_done]
    eol = dialect.eol
    ping = f": ping{eol}{eol}".encode() if dialect.comments else b""
    out: list[bytes] = []
    for i, chunk in enumerate(chunks):
        if usage is not None and dialect.usage_null:
            chunk = {**chunk, "usage": None}
        head = f"retry: 3000{eol}" if dialect.retry and i == 0 else ""
        out.append(_dialect_block(_dialect_json(chunk, dialect), dialect, head) + ping)
    if usage is not None:
        final = {**chunks[-1], "choices": [], "usage": usage}
        head = f": usage follows{eol}" if dialect.comments else ""
        out.append(_dialect_block(_dialect_json(final, dialect), dialect, head))
    out.append(_dialect_block("[DONE]", dialect))
    return b"".join(out)


def dialect_usage_aware(
    cap: Capture, dialect: StreamDialect, usage: dict[str, Any], *, byte_chunk: int | None = None
) -> Callable[[RecordedRequest], Reply]:
    """Route handler: `cap` in `dialect`, with usage when the request asked for it; whole
    events per write, or `byte_chunk` bytes per write."""

    def handler(request: RecordedRequest) -> Reply:
        body = dialect_stream(cap, dialect, usage if include_usage_requested(request) else None)
        if byte_chunk is None:
            parser = SSEParser()
            chunks = [e.raw for e in parser.feed(body) + parser.flush()]
        else:
            chunks = [body[i : i + byte_chunk] for i in range(0, len(body), byte_chunk)]
        return Reply(status=200, headers=strip_framing_headers(cap.headers), chunks=chunks)

    return handler


# --- llama.cpp --------------------------------------------------------------------------------------


class FakeLlamaServer(FakeUpstream):
    """llama-server's routes, answered with the captures in tests/fixtures/llamacpp."""

    def __init__(
        self,
        *,
        embeddings: bool = False,
        first_delay: float = 0.0,
        gap: float = 0.0,
        handler_cancellation: bool = False,
    ) -> None:
        super().__init__(handler_cancellation=handler_cancellation)
        self._timing = {"first_delay": first_delay, "gap": gap}
        self.route("POST", "/v1/chat/completions", self._chat)
        self.route("POST", "/v1/completions", self._completions)
        for path, name in (
            ("/props", "get_props"),
            ("/health", "get_health"),
            ("/v1/models", "get_v1_models"),
            ("/metrics", "get_metrics"),
            ("/slots", "get_slots"),
        ):
            self.route("GET", path, self._fixture(name))
        self.route(
            "POST",
            "/v1/embeddings",
            self._fixture("post_v1_embeddings" if embeddings else "err_embeddings_not_enabled"),
        )

    def _fixture(self, name: str) -> Reply:
        return Reply.from_capture(llamacpp_capture(name), **self._timing)

    def not_found(self, request: RecordedRequest) -> Reply:
        return self._fixture("err_404")

    def _invalid(self, request: RecordedRequest) -> Reply | None:
        if not isinstance(request.json, dict):
            return self._fixture("err_invalid_json")
        return None

    def _chat(self, request: RecordedRequest) -> Reply:
        invalid = self._invalid(request)
        if invalid is not None:
            return invalid
        if "messages" not in request.json:
            return self._fixture("err_missing_messages")
        if not request.json.get("stream"):
            return self._fixture("post_v1_chat_completions")
        if include_usage_requested(request):
            return self._fixture("post_v1_chat_completions_stream_include_usage")
        if request.json.get("timings_per_token"):
            return self._fixture("post_v1_chat_completions_stream_timings_per_token")
        return self._fixture("post_v1_chat_completions_stream")

    def _completions(self, request: RecordedRequest) -> Reply:
        invalid = self._invalid(request)
        if invalid is not None:
            return invalid
        if not request.json.get("stream"):
            return self._fixture("post_v1_completions")
        if include_usage_requested(request):
            return self._fixture("post_v1_completions_stream_include_usage")
        return self._fixture("post_v1_completions_stream")


# --- Responses API ------------------------------------------------------------------------------------


def _responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    inp = int(usage["input_tokens"])
    out = int(usage["output_tokens"])
    cached = int(usage.get("input_tokens_details", {}).get("cached_tokens", 0))
    reasoning = int(usage.get("output_tokens_details", {}).get("reasoning_tokens", 0))
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(usage.get("total_tokens", inp + out)),
    }


def _ids(seed: str) -> tuple[str, str]:
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return "resp_" + digest[:48], "msg_" + digest[16:64]


def _response_object(
    resp_id: str,
    model: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    max_output_tokens: int | None,
) -> dict[str, Any]:
    # Field set and order as in real api.openai.com Responses streams (mid 2025).
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default" if status == "completed" else "auto",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _message(msg_id: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
    return {"id": msg_id, "type": "message", "status": status, "content": content, "role": "assistant"}


def responses_stream(
    text_deltas: list[str],
    usage: dict[str, Any],
    model: str = "gpt-4o-mini",
    *,
    created_at: int = 1749761604,
    max_output_tokens: int | None = None,
) -> bytes:
    """A /v1/responses SSE stream (`event:` + `data:` blocks, no [DONE]) in OpenAI's format."""
    text = "".join(text_deltas)
    resp_id, msg_id = _ids(f"{model}|{created_at}|{text}")
    seq = 0
    out: list[bytes] = []

    def emit(event_type: str, payload: dict[str, Any]) -> None:
        nonlocal seq
        data = {"type": event_type, "sequence_number": seq, **payload}
        out.append(b"event: " + event_type.encode() + b"\ndata: " + _compact(data) + b"\n\n")
        seq += 1

    def response(status: str, output: list[dict[str, Any]], u: dict[str, Any] | None) -> dict[str, Any]:
        return _response_object(resp_id, model, created_at, status, output, u, max_output_tokens)

    part_loc = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    emit("response.created", {"response": response("in_progress", [], None)})
    emit("response.in_progress", {"response": response("in_progress", [], None)})
    emit("response.output_item.added", {"output_index": 0, "item": _message(msg_id, "in_progress", None)})
    emit(
        "response.content_part.added",
        {**part_loc, "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}},
    )
    for delta in text_deltas:
        emit("response.output_text.delta", {**part_loc, "delta": delta, "logprobs": []})
    emit("response.output_text.done", {**part_loc, "text": text, "logprobs": []})
    emit(
        "response.content_part.done",
        {**part_loc, "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": text}},
    )
    done_item = _message(msg_id, "completed", text)
    emit("response.output_item.done", {"output_index": 0, "item": done_item})
    emit("response.completed", {"response": response("completed", [done_item], _responses_usage(usage))})
    return b"".join(out)


def responses_body(
    text: str,
    usage: dict[str, Any],
    model: str = "gpt-4o-mini",
    *,
    created_at: int = 1749761604,
    max_output_tokens: int | None = None,
) -> bytes:
    """A non-streaming /v1/responses body (pretty-printed, as OpenAI sends JSON bodies)."""
    resp_id, msg_id = _ids(f"{model}|{created_at}|{text}")
    obj = _response_object(
        resp_id,
        model,
        created_at,
        "completed",
        [_message(msg_id, "completed", text)],
        _responses_usage(usage),
        max_output_tokens,
    )
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


def responses_reply(body: bytes, *, stream: bool, **timing: float) -> Reply:
    """Wrap a responses_stream / responses_body result as a Reply (one chunk per SSE block)."""
    content_type = "text/event-stream; charset=utf-8" if stream else "application/json"
    cap = Capture(
        name="responses",
        method="POST",
        path="/v1/responses",
        request_body=b"",
        status=200,
        headers=(("Content-Type", content_type),),
        body=body,
    )
    return Reply.from_capture(cap, **timing)


__all__ = [
    "ChunkWrite",
    "DisconnectRecord",
    "FakeLlamaServer",
    "FakeUpstream",
    "RecordedRequest",
    "Reply",
    "StreamDialect",
    "dialect_stream",
    "dialect_usage_aware",
    "include_usage_requested",
    "openai_error_body",
    "openai_stream_with_usage",
    "openai_usage_aware",
    "responses_body",
    "responses_reply",
    "responses_stream",
    "strip_framing_headers",
]

