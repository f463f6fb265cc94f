"""Let no one in, let nothing out.

* Secrets (the upstream key, a virtual key, the admin key, a wrong key a client presented)
  appear in no output channel after a full run of traffic: client responses, the access
  log, every log record, /metrics, spans, /v1/tollgate/* and the ledger file.
* Upstream targets come only from config: no request line, Host header or path makes the
  proxy call another host, or leave the upstream's API base on the configured one.
* Virtual keys are compared in constant time over all keys.
* Header size limits answer quickly; a client trickling headers is cut off by the server's
  keep-alive timeout (measured, bounded).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from proxy import keys as keys_module
from proxy.app import make_app
from proxy.config_file import parse_settings
from proxy.keys import KeyRing, VirtualKey, hash_key
from proxy.paths import escapes_api_base
from tests.integration.conftest import StartProxy, proxy_yaml
from tests.integration.test_bad_input import body_of, http, raw_exchange, status_of
from tests.integration.test_failures import assert_openai_error
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import (
    FakeUpstream,
    RecordedRequest,
    Reply,
    openai_error_body,
    openai_usage_aware,
)

# Random per run, so a hit can only be a leak of this run's secret.
UPSTREAM_KEY = "sk-upstream-" + os.urandom(16).hex()
VIRTUAL_KEY = "tg-virtual-" + os.urandom(16).hex()
ADMIN_KEY = "tg-admin-" + os.urandom(16).hex()
WRONG_KEY = "tg-wrong-" + os.urandom(16).hex()
SECRETS = {"upstream key": UPSTREAM_KEY, "virtual key": VIRTUAL_KEY, "admin key": ADMIN_KEY, "presented wrong key": WRONG_KEY}
USAGE = {"prompt_tokens": 8, "completion_tokens": 26, "total_tokens": 34}


def leaks(haystack: bytes, where: str) -> list[str]:
    """Each secret, whole or any 8-character piece of its random part (a masked or cut key
    still leaks), found in `haystack`."""
    found = []
    for name, secret in SECRETS.items():
        random_part = secret.rsplit("-", 1)[1]
        pieces = [secret.encode()] + [random_part[i : i + 8].encode() for i in range(len(random_part) - 7)]
        if any(p in haystack for p in pieces):
            found.append(f"{name} in {where}")
    return found


def security_yaml(openai_base: str, ledger: Path) -> str:
    extra = f"""
keys:
  - name: app
    key_sha256: {hash_key(VIRTUAL_KEY)}
admin:
  api_key: {ADMIN_KEY}
budgets:
  - name: app-daily
    scope: {{key: app}}
    period: daily
    limit_usd: 100
  - name: nothing-for-3.5
    scope: {{model: "gpt-3.5*"}}
    period: daily
    limit_usd: 0
ledger:
  path: {ledger}
passthrough:
  allow_unmetered: ["/v1/files*"]
"""
    return proxy_yaml(openai_base, openai_key=UPSTREAM_KEY, default_upstream="openai", extra=extra)


def upstream_401_echoing_a_masked_key(req: RecordedRequest) -> Reply:
    # What api.openai.com answers for a bad key: only the last 4 characters survive.
    presented = req.headers.get("Authorization", "").removeprefix("Bearer ")
    masked = presented[:3] + "*" * 20 + presented[-4:]
    body = openai_error_body(f"Incorrect API key provided: {masked}.", "invalid_request_error", "invalid_api_key")
    return Reply(status=401, headers=(("Content-Type", "application/json"),), chunks=[body])


async def test_no_secret_in_any_output_channel(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    chat_stream = openai_capture("chat-streaming")
    fake_openai.route("POST", chat_stream.path, openai_usage_aware(chat_stream, USAGE))
    fake_openai.replay(openai_capture("embeddings-basic"))
    fake_openai.route("POST", "/v1/completions", upstream_401_echoing_a_masked_key)
    fake_openai.route("GET", "/v1/files", Reply.json({"object": "list", "data": []}))
    fake_openai.route("GET", "/v1/models", Reply.json({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ledger = tmp_path / "ledger.db"
    config = security_yaml(fake_openai.api_base, ledger)
    assert VIRTUAL_KEY not in config and ADMIN_KEY in config  # only the hash of a virtual key
    proxy = await start_proxy(config, tracer_provider=provider)

    seen: list[bytes] = []  # every status line, header and body a client received

    async def call(method: str, path: str, *, key: str | None = VIRTUAL_KEY, body: object = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> int:
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        async with aiohttp.ClientSession() as s, s.request(method, proxy.url + path, data=data, headers=h) as r:
            seen.append(f"{r.status} {r.reason}".encode())
            seen.extend(f"{k}: {v}".encode() for k, v in r.headers.items())
            seen.append(await r.read())
            return r.status

    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=VIRTUAL_KEY, max_retries=0)
    async for _ in await client.chat.completions.create(**{**chat_stream.request_json, "stream": True}):  # type: ignore[call-overload]
        pass
    await client.embeddings.create(**openai_capture("embeddings-basic").request_json)
    statuses = {
        "stream": await call("POST", "/v1/chat/completions", body={**chat_stream.request_json, "stream": True}),
        "wrong key": await call("POST", "/v1/chat/completions", key=WRONG_KEY, body=chat),
        "no key": await call("POST", "/v1/chat/completions", key=None, body=chat),
        "admin key as virtual key": await call("POST", "/v1/chat/completions", key=ADMIN_KEY, body=chat),
        "basic auth": await call("POST", "/v1/chat/completions", key=None, body=chat,
                                 headers={"Authorization": f"Basic {VIRTUAL_KEY}"}),
        "key in x-api-key": await call("POST", "/v1/chat/completions", key=None, body=chat, headers={"x-api-key": VIRTUAL_KEY}),
        "bad json": await call("POST", "/v1/chat/completions", raw=b"{" + VIRTUAL_KEY.encode()),
        "budget": await call("POST", "/v1/chat/completions", body={**chat, "model": "gpt-3.5-turbo"}),
        "upstream 401": await call("POST", "/v1/completions", body={"model": "gpt-4o-mini", "prompt": "x"}),
        "passthrough": await call("GET", "/v1/files"),
        "unmetered, not allowed": await call("POST", "/v1/images/generations", body={"model": "dall-e-3"}),
        "models": await call("GET", "/v1/models"),
        "summary": await call("GET", "/v1/tollgate/summary"),
        "summary, admin key": await call("GET", "/v1/tollgate/summary", key=ADMIN_KEY),
        "summary, no key": await call("GET", "/v1/tollgate/summary", key=None),
        "summary, wrong key": await call("GET", "/v1/tollgate/summary", key=WRONG_KEY),
        "budgets, admin key": await call("GET", "/v1/tollgate/budgets", key=ADMIN_KEY),
        "budgets, virtual key": await call("GET", "/v1/tollgate/budgets"),
        "budgets, wrong key": await call("GET", "/v1/tollgate/budgets", key=WRONG_KEY),
    }
    assert statuses == {
        "stream": 200, "wrong key": 401, "no key": 401, "admin key as virtual key": 401, "basic auth": 401,
        "key in x-api-key": 401, "bad json": 400, "budget": 429, "upstream 401": 401,
        "passthrough": 200, "unmetered, not allowed": 403, "models": 200, "summary": 200, "summary, admin key": 200,
        "summary, no key": 401, "summary, wrong key": 401, "budgets, admin key": 200,
        "budgets, virtual key": 401, "budgets, wrong key": 401,
    }
    async with aiohttp.ClientSession() as s, s.get(proxy.metrics_url) as r:
        metrics = await r.read()
    await proxy.server.close()  # drain: settlements written, ledger closed
    provider.force_flush()

    spans = exporter.get_finished_spans()
    assert len(spans) >= 10
    log_records = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.stack_info or ''} {r.__dict__}" for r in caplog.records
    ).encode()
    ledger_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    assert ledger_bytes, "the ledger file was written"
    channels = {
        "client responses": b"\n".join(seen),
        "access log": b"\n".join(proxy.log_lines()),
        "log records": log_records + caplog.text.encode(),
        "metrics": metrics,
        "spans": b"\n".join(s.to_json().encode() for s in spans),
        "ledger file": ledger_bytes,
    }
    found = [hit for where, data in channels.items() for hit in leaks(data, where)]
    assert found == []
    # The channels are not empty by accident: they did record the run.
    assert len(proxy.log_lines()) >= 10 and b"tollgate_requests_total" in metrics
    assert b"app" in ledger_bytes and hash_key(VIRTUAL_KEY).encode() not in channels["access log"]
    # And the upstream saw its own key, never a client's.
    for req in fake_openai.requests:
        assert req.headers.get("Authorization") == f"Bearer {UPSTREAM_KEY}", req.path
        assert not leaks(repr([(k, v) for k, v in req.headers.items() if k != "Authorization"]).encode(), "upstream headers")


# --- upstream targets come only from config ---------------------------------------------------------


@pytest.fixture
async def evil() -> Any:
    async with FakeUpstream() as fake:
        fake.route("GET", "/v1/models", Reply.json({"object": "list", "data": [{"id": "evil", "object": "model"}]}))
        yield fake


TRAVERSALS = [
    "/v1/../props",
    "/v1/%2e%2e/props",
    "/v1/%2E%2E/slots?action=erase",
    "/v1/..%2Fprops",
    "/v1/..%2fprops",
    "/v1/a/..%2F..%2Fprops",
    "/v1/files/../../props",
    "/v1/./../slots",
    "/v1/.%2e/metrics",
    "/v1/%252e%252e/props",
    "/v1/..%5Cprops",
    "/v1/..\\props",
    "/v1/chat/completions/../../props",
    "/v1/files/%2e%2e/%2e%2e/health",
]


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_paths_cannot_leave_the_upstream_api_base(
    start_proxy: StartProxy, fake_openai: FakeUpstream, target: str
) -> None:
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, default_upstream="openai"))
    for method in ("GET", "POST"):
        resp = await raw_exchange(proxy, http(f"{method} {target} HTTP/1.1", b"{}", Content_Length="2"), timeout=3)
        assert status_of(resp) == 404, resp[:300]
        err = orjson.loads(body_of(resp))["error"]
        assert err["code"] == "not_found"
    assert fake_openai.requests == []


async def test_other_hosts_are_unreachable(start_proxy: StartProxy, fake_openai: FakeUpstream, evil: FakeUpstream) -> None:
    """Absolute-form request targets, Host and forwarding headers, scheme-relative and
    embedded URLs in the path, and a URL as the model: the request either goes to the
    configured upstream or nowhere, and the evil host sees nothing."""
    fake_openai.route("GET", "/v1/models", Reply.json({"object": "list", "data": []}))
    fake_openai.route("POST", "/v1/chat/completions", Reply.json({"ok": True}))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, default_upstream="openai"))
    e = f"127.0.0.1:{evil.port}"
    chat = orjson.dumps({"model": "gpt-4o-mini", "messages": []})
    attempts = [
        http(f"GET http://{e}/v1/models HTTP/1.1"),
        http(f"POST http://{e}/v1/chat/completions HTTP/1.1", chat, Content_Length=str(len(chat))),
        http(f"GET https://{e}/v1/files HTTP/1.1"),
        f"GET /v1/models HTTP/1.1\r\nHost: {e}\r\n\r\n".encode(),
        http("GET /v1/files HTTP/1.1", X_Forwarded_Host=e, Forwarded=f"host={e}", X_Original_URL=f"http://{e}/v1/files"),
        http(f"GET //{e}/v1/models HTTP/1.1"),
        http(f"GET /v1//{e}/v1/models HTTP/1.1"),
        http(f"GET /v1/http://{e}/v1/models HTTP/1.1"),
        http(f"GET /v1/@{e}/v1/models HTTP/1.1"),
        http(f"GET /v1/%2F%2F{e}/v1/models HTTP/1.1"),
        http(f"GET /v1@{e}/v1/models HTTP/1.1"),
        http(f"GET /v1/files?url=http://{e}/ HTTP/1.1"),
    ]
    for model in (f"http://{e}/v1", f"//{e}", f"{e}"):
        body = orjson.dumps({"model": model, "messages": []})
        attempts.append(http("POST /v1/chat/completions HTTP/1.1", body, Content_Length=str(len(body))))
    for request in attempts:
        resp = await raw_exchange(proxy, request, timeout=3)
        assert status_of(resp) < 500, resp[:300]
        if request.split(b" ", 2)[1].startswith(b"http") and not request.startswith(b"GET http://127.0.0.1"):
            # Absolute-form targets are refused (GET /v1/models ignores the path: served).
            assert status_of(resp) == 400, resp[:300]
    assert evil.requests == []
    # What did reach an upstream reached the configured one, under its API base.
    assert fake_openai.requests, "the harmless ones were forwarded"
    assert all(r.path.startswith("/v1/") for r in fake_openai.requests), [r.path for r in fake_openai.requests]


@pytest.mark.parametrize(
    ("path", "escapes"),
    [
        ("/v1/files", False),
        ("/v1/files/file-abc/content?x=../y", False),  # the query is not part of the path
        ("/v1/a%2Fb", False),  # an encoded slash alone does not leave the base
        ("/v1/...", False),
        ("/v1/..", True),
        ("/v1/a/%2e", True),
        ("/v1/%25252e%25252e/x", True),
        ("/v1/a%5C..", True),
        ("/v1/%00", True),
    ],
)
def test_escapes_api_base(path: str, escapes: bool) -> None:
    assert escapes_api_base(path) is escapes


# --- virtual keys ---------------------------------------------------------------------------------


def test_authenticate_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = [f"tg-key-{i}-" + os.urandom(8).hex() for i in range(5)]
    ring = KeyRing([VirtualKey(name=f"k{i}", key_sha256=hash_key(s)) for i, s in enumerate(secrets)])
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    for presented, expected in [(secrets[0], "k0"), (secrets[4], "k4"), ("tg-nope", None), (secrets[2][:-1], None)]:
        compared.clear()
        key = ring.authenticate(presented)
        assert (key.name if key else None) == expected
        # Every configured digest is compared, whether the first, the last or none matched,
        # and always digest against digest (equal lengths: no early length exit).
        assert len(compared) == len(secrets)
        assert {b for _, b in compared} == {bytes.fromhex(hash_key(s)) for s in secrets}
        assert all(a == hashlib.sha256(presented.encode()).digest() and len(a) == len(b) == 32 for a, b in compared)


def test_only_hashes_are_kept() -> None:
    ring = KeyRing([VirtualKey(name="app", key_sha256=hash_key(VIRTUAL_KEY))])
    assert VIRTUAL_KEY not in repr(ring.keys) and VIRTUAL_KEY not in repr(ring.__dict__)
    with pytest.raises(ValueError):
        VirtualKey(name="app", key_sha256=VIRTUAL_KEY)  # a raw key is not a digest


# --- size limits and slow clients -------------------------------------------------------------------


async def test_header_limits_answer_at_once(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    """aiohttp's parser limits (3.14 defaults): request line and each header field 8190
    bytes, 128 headers. Over any of them: a 400 straight away, nothing forwarded."""
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, default_upstream="openai"))
    for request in (
        http("GET /v1/files HTTP/1.1", X_Big="a" * 8200),
        http("GET /v1/files HTTP/1.1", **{f"X_H{i}": "v" for i in range(130)}),
        http("GET /v1/" + "a" * 8200 + " HTTP/1.1"),
        http("GET /v1/files HTTP/1.1", Authorization="Bearer " + "k" * 8200),
    ):
        t = time.monotonic()
        resp = await raw_exchange(proxy, request, timeout=5)
        assert status_of(resp) == 400 and time.monotonic() - t < 1.0
    # Just under the limits is served.
    resp = await raw_exchange(proxy, http("GET /healthz HTTP/1.1", X_Big="a" * 8000, **{f"X_H{i}": "v" for i in range(100)}))
    assert status_of(resp) == 200
    assert fake_openai.requests == []


async def trickle_headers(host: str, port: int | None, limit_s: float) -> float | None:
    """Send a request's headers one byte every 0.25 s (never finishing them); return after
    how many seconds the server closed the connection, or None if it was still open after
    `limit_s` (the test's own bound)."""
    reader, writer = await asyncio.open_connection(host, port)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000
    t = time.monotonic()
    try:
        for byte in head:
            if time.monotonic() - t > limit_s:
                return None
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return time.monotonic() - t
            try:
                if await asyncio.wait_for(reader.read(1024), 0.25) == b"":
                    return time.monotonic() - t
            except TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - t
        return None
    finally:
        writer.close()


async def test_slowloris_is_cut_off_by_the_keepalive_timeout(
    aiohttp_server: Callable[..., Awaitable[TestServer]], fake_openai: FakeUpstream, tmp_path: Path
) -> None:
    """aiohttp arms its keep-alive timer when a connection opens and closes the connection
    when it fires while no complete request has arrived; trickled header bytes do not
    re-arm it. So `keepalive_timeout` bounds a slowloris. aiohttp's web.run_app uses 75 s;
    a bare AppRunner (what `tollgate serve` builds) defaults to 3630 s, an hour: serve.py
    should pass keepalive_timeout explicitly (see the report on issue 7)."""
    config = proxy_yaml(fake_openai.api_base) + f"\nledger:\n  path: {tmp_path / 'l.db'}\n"
    app = make_app(parse_settings(config, env={}), registry=CollectorRegistry())
    server = await aiohttp_server(app, keepalive_timeout=1.5)
    closed_after = await trickle_headers(server.host, server.port, limit_s=10)
    print(f"slowloris: trickling client cut off after {closed_after} s (keepalive_timeout=1.5)")
    assert closed_after is not None and 1.0 < closed_after < 4.0
    # The server still serves others.
    async with aiohttp.ClientSession() as s, s.get(str(server.make_url("/healthz"))) as r:
        assert r.status == 200


async def test_slowloris_with_a_bare_runner_outlasts_the_test_bound(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    """The measurement behind the serve.py recommendation: with AppRunner's default
    keep-alive timeout (3630 s) a client trickling headers is still connected when this
    test's 6 s bound runs out. If aiohttp ever adds a header timeout, this fails and the
    recommendation can be revisited."""
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    closed_after = await trickle_headers(proxy.server.host, proxy.server.port, limit_s=6)
    print(f"slowloris with AppRunner defaults: {'still open after 6 s' if closed_after is None else closed_after}")
    assert closed_after is None


@pytest.mark.parametrize(
    ("access", "expected"),
    [("keys", {"virtual": 200, "admin": 200, "none": 401}), ("admin", {"virtual": 401, "admin": 200, "none": 401})],
)
async def test_summary_needs_a_key_once_keys_exist(
    start_proxy: StartProxy, fake_openai: FakeUpstream, access: str, expected: dict[str, int]
) -> None:
    config = proxy_yaml(fake_openai.api_base, extra=f"""
keys:
  - name: app
    key_sha256: {hash_key(VIRTUAL_KEY)}
admin:
  api_key: {ADMIN_KEY}
  summary_access: {access}
""")
    proxy = await start_proxy(config)
    got = {}
    async with aiohttp.ClientSession() as s:
        for who, key in (("virtual", VIRTUAL_KEY), ("admin", ADMIN_KEY), ("none", None)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with s.get(proxy.base_url + "/tollgate/summary", headers=headers) as r:
                got[who] = r.status
                if r.status == 401:
                    assert_openai_error(await r.json(), code="invalid_api_key")
    assert got == expected


async def test_summary_is_open_without_keys(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    async with aiohttp.ClientSession() as s, s.get(proxy.base_url + "/tollgate/summary") as r:
        assert r.status == 200
