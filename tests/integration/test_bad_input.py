"""A table of hostile and broken requests, over real sockets: the proxy answers every one with
a 4xx in the OpenAI error shape (or relays the upstream's own answer where only the upstream
can judge), never a 5xx of its own, never a traceback, and never grows a metric label from
what a client sent.

Two kinds of case: well-formed HTTP with a bad body/path/method (sent with aiohttp), and
malformed HTTP (sent as raw bytes over an asyncio stream, because aiohttp's client refuses
to produce it). Each case states who decides: `proxy` (the proxy must refuse, nothing goes
upstream) or `upstream` (the proxy cannot know the upstream's validation rules, so it
forwards and relays the upstream's answer unchanged).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import accept
from tests.integration.conftest import Proxy, StartProxy, proxy_yaml
from tests.support.fake_upstream import (
    FakeUpstream,
    RecordedRequest,
    Reply,
    openai_error_body,
)

JSON = (("Content-Type", "application/json"),)
# A budget makes every admitted request walk the prompt estimate and the ledger too: the
# deepest path a body can take before it is sent.
BUDGET = """
budgets:
  - name: everything
    period: daily
    limit_usd: 1000
  - name: per-user
    scope: {user: "*"}
    period: daily
    limit_usd: 100
"""


def body(obj: object) -> bytes:
    return orjson.dumps(obj)


def chat(**fields: object) -> bytes:
    return body({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields})


def nested(depth: int) -> bytes:
    return b'{"model":"gpt-4o-mini","messages":' + b"[" * depth + b"]" * depth + b"}"


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes = b""
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: tuple[tuple[str, str], ...] = JSON
    status: int = 400
    # proxy: refused by the proxy, nothing sent upstream. upstream: forwarded, and the
    # client gets exactly what the upstream answered.
    decides: Literal["proxy", "upstream"] = "proxy"
    code: str | None = None
    param: str | None = None


# The fake upstream plays OpenAI's validator: 400 for anything the proxy forwarded that
# OpenAI would reject, 200 with a tiny completion otherwise. Its body is recognisable, so a
# pass-through is checked byte for byte.
UPSTREAM_400 = openai_error_body("upstream says no", "invalid_request_error", "upstream_validation")


def upstream_reply(req: RecordedRequest) -> Reply:
    payload = req.json if isinstance(req.json, dict) else {}
    ok = (
        isinstance(payload.get("messages"), list)
        and isinstance(payload.get("n", 1), int) and payload.get("n", 1) <= 128
        and isinstance(payload.get("temperature", 1), (int, float))
    )
    if not ok:
        return Reply(status=400, headers=JSON, chunks=[UPSTREAM_400])
    return Reply.json(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )


CASES: list[Case] = [
    # --- the body is not a JSON object ---------------------------------------------------------
    Case("empty body", b""),
    Case("whitespace only", b"  \n\t "),
    Case("not json", b"hello"),
    Case("truncated json", b'{"model": "gpt-4o-mini", "messages": ['),
    Case("trailing garbage", chat() + b" {}"),
    Case("json null", b"null"),
    Case("json array", b"[1, 2]"),
    Case("json string", b'"gpt-4o-mini"'),
    Case("json number", b"42"),
    Case("json true", b"true"),
    Case("single quotes", b"{'model': 'gpt-4o-mini'}"),
    Case("NaN literal", b'{"model": "gpt-4o-mini", "temperature": NaN}'),
    Case("comment in json", b'{"model": "gpt-4o-mini" /* hi */}'),
    Case("invalid utf-8 bytes", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    Case("overlong utf-8 encoding of '/'", b'{"model": "gpt\xc0\xaf4o"}'),
    Case("utf-8 BOM before the object", b"\xef\xbb\xbf" + chat()),
    Case("utf-16 body", chat().decode().encode("utf-16")),
    Case("lone high surrogate escape", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    Case("lone low surrogate escape", b'{"model": "gpt-4o-mini", "user": "\\udc00"}'),
    Case("deeply nested arrays (100k levels)", nested(100_000)),
    Case("deeply nested objects (100k levels)", b'{"model":"gpt-4o-mini","x":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}"),
    # 1000 levels is under orjson's parse limit (1024) but over what the prompt estimate
    # (Python recursion) and orjson.dumps (255) can handle: refused by the depth check.
    Case("nested just under the parser limit", nested(1000), code="invalid_value"),
    Case("nested 200 levels in a stream (body re-serialised)", chat(stream=True)[:-1] + b',"x":' + b"[" * 200 + b"]" * 200 + b"}",
         code="invalid_value"),
    Case("nested 100 levels in a stream (under the limit)", chat(stream=True, temperature="x")[:-1] + b',"x":' + b"[" * 100 + b"]" * 100 + b"}",
         decides="upstream"),
    # --- model ---------------------------------------------------------------------------------
    Case("missing model", body({"messages": []}), code="missing_required_parameter", param="model"),
    Case("model null", body({"model": None}), code="missing_required_parameter", param="model"),
    Case("model number", body({"model": 42}), code="invalid_type", param="model"),
    Case("model object", body({"model": {"name": "gpt-4o"}}), code="invalid_type", param="model"),
    Case("model list", body({"model": ["gpt-4o"]}), code="invalid_type", param="model"),
    Case("model empty string", body({"model": ""}), code="invalid_value", param="model"),
    Case("model with NUL", body({"model": "gpt-4o\u0000"}), code="invalid_value", param="model"),
    Case("model with newline (log/header injection)", body({"model": "gpt-4o\r\nX-Evil: 1"}), code="invalid_value", param="model"),
    Case("model with DEL", body({"model": "gpt-4o\u007f"}), code="invalid_value", param="model"),
    Case("model with a C1 control (CSI)", body({"model": "gpt-4o\u009b31m"}), code="invalid_value", param="model"),
    Case("model with an ANSI escape", body({"model": "\u001b[2Jgpt-4o"}), code="invalid_value", param="model"),
    Case("model 10 KB long", body({"model": "gpt-" + "x" * 10_240}), code="invalid_value", param="model"),
    Case("model unknown", body({"model": "no-such-model"}), status=404, code="model_not_found", param="model"),
    Case("model unknown, unicode", body({"model": "модель-💥"}), status=404, code="model_not_found", param="model"),
    Case("model glob characters", body({"model": "gpt-*"}), status=400, decides="upstream"),
    # --- wrong types the proxy reads itself ------------------------------------------------------
    Case("stream as string", chat(stream="yes"), code="invalid_type", param="stream"),
    Case("stream as number", chat(stream=1), code="invalid_type", param="stream"),
    Case("max_tokens negative", chat(max_tokens=-1), code="integer_below_min_value", param="max_tokens"),
    Case("max_tokens 1e30", b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 1e30}', code="invalid_type", param="max_tokens"),
    Case("max_tokens as string", chat(max_tokens="100"), code="invalid_type", param="max_tokens"),
    Case("max_tokens as bool", chat(max_tokens=True), code="invalid_type", param="max_tokens"),
    Case("max_completion_tokens float", chat(max_completion_tokens=1.5), code="invalid_type", param="max_completion_tokens"),
    Case("max_tokens beyond 64 bits", b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": 100000000000000000000000000}'),
    # Caps beyond int32 are refused before admission: reserved as tokens they would overflow
    # the ledger's integers (an unpriced model admits any cap, so the budget cannot refuse it).
    Case("max_tokens at int64 max", chat(max_tokens=2**63 - 1), code="integer_above_max_value", param="max_tokens"),
    Case("max_output_tokens 1e15", body({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 10**15}),
         path="/v1/responses", code="integer_above_max_value", param="max_output_tokens"),
    Case("unpriced model, max_tokens at int64 max", chat(model="o-unpriced", max_tokens=2**63 - 1),
         code="integer_above_max_value", param="max_tokens"),
    Case("max_tokens at int32 max, unpriced model", chat(model="o-unpriced", max_tokens=2**31 - 1, temperature="x"), decides="upstream"),
    # Priced, the same cap's worst case is more than the budget: refused at admission.
    Case("max_tokens at int32 max, priced model", chat(max_tokens=2**31 - 1), status=429, code="budget_exceeded"),
    # --- wrong types only the upstream judges (the proxy does not re-implement OpenAI's schema) --
    Case("messages as string", chat(messages="x"), decides="upstream"),
    Case("messages as object", chat(messages={"role": "user"}), decides="upstream"),
    # --- out of what OpenAI documents for choices: refused before a reservation is spent ---------
    Case("huge n", chat(n=10**9), code="integer_above_max_value", param="n"),
    Case("n 1000", chat(n=1000), code="integer_above_max_value", param="n"),
    Case("n 0", chat(n=0), code="integer_below_min_value", param="n"),
    Case("negative n", chat(n=-3), code="integer_below_min_value", param="n"),
    Case("n as string", chat(n="2"), code="invalid_type", param="n"),
    Case("n as float", chat(n=0.5), code="invalid_type", param="n"),
    Case("completions best_of 21", body({"model": "gpt-3.5-turbo-instruct", "prompt": "x", "best_of": 21}),
         path="/v1/completions", code="integer_above_max_value", param="best_of"),
    Case("completions best_of below n", body({"model": "gpt-3.5-turbo-instruct", "prompt": "x", "n": 3, "best_of": 2}),
         path="/v1/completions", code="invalid_value", param="best_of"),
    Case("negative max_tokens", chat(max_tokens=-1), code="integer_below_min_value", param="max_tokens"),
    Case("temperature as string", chat(temperature="hot", messages="x"), decides="upstream"),
    Case("user as object", chat(user={"id": 1}, messages="x"), decides="upstream"),
    Case("user 1 MB long", chat(user="u" * (1 << 20), messages="x"), decides="upstream"),
    Case("stream_options not an object", chat(stream=True, stream_options="yes", messages="x"), decides="upstream"),
    Case("NUL in message content", chat(messages=[{"role": "user", "content": "a\u0000b"}], temperature="x"), decides="upstream"),
    Case("unicode edge cases in content", chat(messages=[{"role": "user", "content": "\u202e\ufeff\U0010ffff\u0301"}], temperature="x"),
         decides="upstream"),
    Case("numbers as strings everywhere", b'{"model": "gpt-4o-mini", "messages": "1", "top_p": "0.5", "seed": "7"}',
         decides="upstream"),
    # Duplicate keys: orjson keeps the last, so does OpenAI's parser; the proxy must not
    # route by one and forward the other. Here the last model is unknown: refused.
    Case("duplicate model keys, last unknown", b'{"model": "gpt-4o-mini", "model": "nope", "messages": []}',
         status=404, code="model_not_found"),
    Case("duplicate model keys, last bad type", b'{"model": "gpt-4o-mini", "model": 7, "messages": []}',
         code="invalid_type", param="model"),
    Case("duplicate stream keys", b'{"model": "gpt-4o-mini", "stream": false, "stream": "x", "messages": []}',
         code="invalid_type", param="stream"),
    # --- content type / framing the client chose -------------------------------------------------
    Case("form-encoded body", b"model=gpt-4o-mini", headers=(("Content-Type", "application/x-www-form-urlencoded"),)),
    Case("no content type, not json", b"model", headers=()),
    # --- paths and methods -------------------------------------------------------------------------
    Case("unknown /v1 path (no default upstream)", b"{}", path="/v1/nope", status=404, code="not_found"),
    Case("unknown root path", b"", method="GET", path="/admin", status=404, code="not_found"),
    Case("root", b"", method="GET", path="/", status=404, code="not_found"),
    Case("path with encoded NUL", b"", method="GET", path="/v1/%00", status=404, code="not_found"),
    Case("very long path", b"", method="GET", path="/" + "a" * 4000, status=404, code="not_found"),
    Case("GET on chat completions", b"", method="GET", status=405, code="method_not_allowed"),
    Case("PUT on chat completions", chat(), method="PUT", status=405, code="method_not_allowed"),
    Case("DELETE on embeddings", b"", method="DELETE", path="/v1/embeddings", status=405, code="method_not_allowed"),
    Case("PATCH on responses", b"{}", method="PATCH", path="/v1/responses", status=405, code="method_not_allowed"),
    Case("POST on /v1/models", b"{}", path="/v1/models", status=404, code="not_found"),
    Case("POST to the summary", b"{}", path="/v1/tollgate/summary", status=404, code="not_found"),
    # A model endpoint under another spelling is metered as that endpoint, not passed through.
    Case("chat path with trailing slash", chat(), path="/v1/chat/completions/", status=200, decides="upstream"),
    Case("chat path, wrong case", chat(), path="/V1/Chat/Completions", status=404, code="not_found"),
    # --- headers -------------------------------------------------------------------------------------
    Case("hostile x-request-id is replaced", chat(model="nope"), headers=JSON + (("x-request-id", "a\tb" + "c" * 500),),
         status=404, code="model_not_found"),
    Case("many headers (100)", chat(model="nope"), headers=JSON + tuple((f"x-h{i}", "v") for i in range(100)),
         status=404, code="model_not_found"),
]


def assert_openai_error(parsed: object) -> dict[str, object]:
    assert isinstance(parsed, dict) and set(parsed) == {"error"}, parsed
    err = parsed["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def no_traceback(raw: bytes) -> None:
    for marker in (b"Traceback", b'File "', b"proxy/", b"site-packages", b"Exception"):
        assert marker not in raw, raw[:300]


async def send(session: aiohttp.ClientSession, proxy: Proxy, case: Case) -> tuple[int, bytes]:
    async with session.request(
        case.method, proxy.url + case.path, data=case.body, headers=dict(case.headers), skip_auto_headers=("Content-Type",)
    ) as r:
        return r.status, await r.read()


def check(case: Case, status: int, raw: bytes, forwarded: bool) -> None:
    assert status < 500, f"proxy answered {status}"
    no_traceback(raw)
    if case.decides == "upstream":
        # Relayed unchanged: the upstream's status and bytes.
        assert forwarded, "should have been forwarded"
        assert status in (200, 400)
        assert raw == UPSTREAM_400 if status == 400 else b'"ok"' in raw
        return
    assert not forwarded, "refused requests must not reach the upstream"
    assert status == case.status, f"status {status}, expected {case.status}: {raw[:300]!r}"
    err = assert_openai_error(orjson.loads(raw))
    if case.code is not None:
        assert err["code"] == case.code, err
    if case.param is not None:
        assert err["param"] == case.param, err


def scan_labels(text: str) -> dict[str, set[str]]:
    """Every label value in a scrape, by label name."""
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                values.setdefault(name, set()).add(value)
    return values


async def test_bad_input_corpus(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    assert len(CASES) >= 40
    fake_openai.route("POST", "/v1/chat/completions", upstream_reply)
    fake_openai.route("POST", "/v1/responses", upstream_reply)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=BUDGET))
    failures: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for case in CASES:
            before = len(fake_openai.requests)
            try:
                status, raw = await send(session, proxy, case)
                check(case, status, raw, len(fake_openai.requests) > before)
            except AssertionError as exc:
                failures.append(f"{case.name}: {exc}")
    assert not failures, "\n".join(failures)

    # The proxy still serves, and every label value came from the config.
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.base_url + "/chat/completions", data=chat()) as r:
            assert r.status == 200
        async with session.get(proxy.metrics_url) as r:
            labels = scan_labels(await r.text())
    settings = proxy.runtime.settings
    configured = {p for name in settings.upstreams for p in settings.models_for_upstream(name)}
    assert labels["model"] <= configured | {"other"}, labels["model"]
    assert labels.get("upstream", set()) <= {"openai", "none"}, labels["upstream"]
    assert labels.get("endpoint", set()) <= {"chat.completions", "completions", "embeddings", "responses", "other"}
    for name, values in labels.items():
        for value in values:
            assert len(value) <= 64 and not re.search(r"tg-[0-9a-f]{24}|nope|модель|x{100}|u{100}", value), (name, value)
    assert proxy.runtime.measure_failures == 0


# --- malformed HTTP: raw bytes ---------------------------------------------------------------------


async def raw_exchange(proxy: Proxy, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, half-close nothing, and read until the server closes or `timeout`."""
    host, port = proxy.server.host, proxy.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            if _complete(out):
                break
        return out
    finally:
        writer.close()


def _complete(resp: bytes) -> bool:
    head, sep, rest = resp.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if m:
        return len(rest) >= int(m.group(1))
    return rest.endswith(b"0\r\n\r\n")


def status_of(resp: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", resp)
    assert m, resp[:200]
    return int(m.group(1))


def body_of(resp: bytes) -> bytes:
    head, _, rest = resp.partition(b"\r\n\r\n")
    if re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
        out = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        return out
    return rest


def http(head: str, payload: bytes = b"", /, **headers: str) -> bytes:
    lines = [head, "Host: 127.0.0.1"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@dataclass(frozen=True)
class RawCase:
    name: str
    request: Callable[[], bytes]
    status: int
    by_parser: bool = False  # refused by aiohttp's HTTP parser, before any handler runs
    forwarded: bool = False
    extra_checks: tuple[str, ...] = field(default=())


CHAT = chat()
RAW_CASES: list[RawCase] = [
    # Content-Length shorter than the body: aiohttp's parser reads the leftover bytes as a
    # pipelined second request, fails on them, and answers 400 for the connection. Either
    # way the truncated body never reaches the upstream.
    RawCase("content-length shorter than body",
            lambda: http("POST /v1/chat/completions HTTP/1.1", CHAT, Content_Type="application/json",
                         Content_Length=str(len(CHAT) - 5)), 400, by_parser=True),
    RawCase("content-length 0 with a body",
            lambda: http("POST /v1/chat/completions HTTP/1.1", CHAT, Content_Length="0"), 400, by_parser=True),
    RawCase("negative content-length",
            lambda: http("POST /v1/chat/completions HTTP/1.1", CHAT, Content_Length="-1"), 400, by_parser=True),
    RawCase("non-numeric content-length",
            lambda: http("POST /v1/chat/completions HTTP/1.1", CHAT, Content_Length="abc"), 400, by_parser=True),
    RawCase("two different content-lengths",
            lambda: (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n") + CHAT,
            400, by_parser=True),
    RawCase("content-length and chunked together (smuggling)",
            lambda: http("POST /v1/chat/completions HTTP/1.1", b"0\r\n\r\n", Content_Length="5", Transfer_Encoding="chunked"),
            400, by_parser=True),
    RawCase("chunked body, well formed, unknown model",
            lambda: http("POST /v1/chat/completions HTTP/1.1",
                         b"%x\r\n" % len(chat(model="nope")) + chat(model="nope") + b"\r\n0\r\n\r\n",
                         Content_Type="application/json", Transfer_Encoding="chunked"), 404),
    RawCase("chunked body split in many chunks, bad json",
            lambda: http("POST /v1/chat/completions HTTP/1.1", b"1\r\n{\r\n1\r\n[\r\n0\r\n\r\n", Transfer_Encoding="chunked"), 400),
    RawCase("chunked body with a bad chunk size",
            lambda: http("POST /v1/chat/completions HTTP/1.1", b"zz\r\n{}\r\n0\r\n\r\n", Transfer_Encoding="chunked"),
            400, by_parser=True),
    RawCase("unknown transfer-encoding",
            lambda: http("POST /v1/chat/completions HTTP/1.1", CHAT, Transfer_Encoding="gzip"), 400, by_parser=True),
    RawCase("header line over 8 KB",
            lambda: http("POST /v1/chat/completions HTTP/1.1", CHAT, Content_Length=str(len(CHAT)), X_Big="a" * 9000),
            400, by_parser=True),
    RawCase("200 headers",
            lambda: ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(200))
                     + f"Content-Length: {len(CHAT)}\r\n\r\n").encode() + CHAT,
            400, by_parser=True),
    RawCase("request line over 8 KB",
            lambda: http("GET /v1/" + "a" * 9000 + " HTTP/1.1"), 400, by_parser=True),
    RawCase("header without colon",
            lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n", 400, by_parser=True),
    RawCase("NUL in a header value",
            lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, by_parser=True),
    RawCase("bare LF line endings",
            lambda: b"GET /nope HTTP/1.1\nHost: x\n\n", 400, by_parser=True),
    RawCase("HTTP/2 preface on an HTTP/1 port",
            lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, by_parser=True),
    RawCase("unknown method (aiohttp's parser knows only registered ones)",
            lambda: http("BREW /v1/chat/completions HTTP/1.1"), 400, by_parser=True),
    RawCase("unsupported HTTP version",
            lambda: http("GET /healthz HTTP/3.0"), 400, by_parser=True),
]


@pytest.mark.parametrize("case", RAW_CASES, ids=[c.name for c in RAW_CASES])
async def test_malformed_http(start_proxy: StartProxy, fake_openai: FakeUpstream, case: RawCase) -> None:
    fake_openai.route("POST", "/v1/chat/completions", upstream_reply)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    resp = await raw_exchange(proxy, case.request())
    assert resp, "no answer (hang or silent close)"
    status = status_of(resp)
    assert status == case.status, resp[:400]
    payload = body_of(resp)
    no_traceback(payload)
    # Refused by aiohttp's HTTP parser before any handler runs, too: still OpenAI-shaped.
    err = assert_openai_error(orjson.loads(payload))
    if case.by_parser:
        assert err["code"] == "malformed_request" and err["type"] == "invalid_request_error"
    assert (len(fake_openai.requests) > 0) == case.forwarded


async def test_content_length_longer_than_body_times_out(
    start_proxy: StartProxy, fake_openai: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that promises more body than it sends is answered 408 once the body read
    deadline passes, instead of holding the handler until the client gives up."""
    monkeypatch.setattr(accept, "BODY_READ_TIMEOUT_S", 0.5)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    request = http("POST /v1/chat/completions HTTP/1.1", CHAT, Content_Type="application/json", Content_Length=str(len(CHAT) + 100))
    t = time.monotonic()
    resp = await raw_exchange(proxy, request, timeout=5)
    took = time.monotonic() - t
    assert status_of(resp) == 408, resp[:300]
    assert assert_openai_error(orjson.loads(body_of(resp)))["code"] == "request_timeout"
    assert 0.4 < took < 3, took
    assert fake_openai.requests == []


async def test_body_trickled_past_the_deadline_times_out(
    start_proxy: StartProxy, fake_openai: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is for the whole body, so a client sending a byte now and then cannot
    keep re-arming it."""
    monkeypatch.setattr(accept, "BODY_READ_TIMEOUT_S", 0.6)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(http("POST /v1/chat/completions HTTP/1.1", Content_Type="application/json", Content_Length=str(len(CHAT))))
        t = time.monotonic()
        got = b""
        for byte in CHAT[:-1]:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                got += await asyncio.wait_for(reader.read(65536), 0.1)
            except TimeoutError:
                continue
            if got:
                break
        assert status_of(got) == 408, got[:200]
        assert time.monotonic() - t < 3
    finally:
        writer.close()
    assert fake_openai.requests == []
