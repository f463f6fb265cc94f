"""The response cache's pure rules: what is deterministic, the key, the plan a request's
headers make, the Cache-Status values, and the entry format (untrusted bytes when read
back from a shared Redis)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.response_cache import Entry, Plan, Recorder, cache_key, deterministic, plan, scope_id
from proxy.usage import Usage

ALL = ("chat.completions", "completions", "embeddings")
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        ("chat.completions", CHAT, True),
        ("chat.completions", {**CHAT, "temperature": 0.0}, True),
        ("chat.completions", {**CHAT, "temperature": 0.2}, False),
        ("chat.completions", {k: v for k, v in CHAT.items() if k != "temperature"}, False),  # default is 1
        ("chat.completions", {**CHAT, "temperature": False}, False),
        ("chat.completions", {**CHAT, "temperature": "0"}, False),
        ("chat.completions", {**CHAT, "n": 2}, False),
        ("chat.completions", {**CHAT, "n": 1}, True),
        ("completions", {"model": "m", "prompt": "x", "temperature": 0, "best_of": 3}, False),
        ("embeddings", {"model": "e", "input": "x"}, True),
    ],
)
def test_deterministic(endpoint: str, body: dict[str, Any], expected: bool) -> None:
    assert deterministic(endpoint, body) is expected


def test_key_ignores_key_order_and_spacing_but_nothing_else() -> None:
    base = cache_key("chat.completions", "openai", "gpt", "s", CHAT, False)
    assert cache_key("chat.completions", "openai", "gpt", "s", dict(reversed(list(CHAT.items()))), False) == base
    different = [
        cache_key("completions", "openai", "gpt", "s", CHAT, False),
        cache_key("chat.completions", "other", "gpt", "s", CHAT, False),
        cache_key("chat.completions", "openai", "gpt-2", "s", CHAT, False),
        cache_key("chat.completions", "openai", "gpt", "t", CHAT, False),
        cache_key("chat.completions", "openai", "gpt", "s", CHAT, True),
        cache_key("chat.completions", "openai", "gpt", "s", {**CHAT, "user": "u"}, False),
        cache_key("chat.completions", "openai", "gpt", "s", {**CHAT, "seed": 1}, False),
    ]
    assert len({base, *different}) == len(different) + 1


def test_scopes() -> None:
    assert scope_id("key", "k1", "Bearer x", "u", "t") == "key:k1"
    # Without virtual keys the credential stands for the key, hashed.
    anon = scope_id("key", None, "Bearer sk-a", None, None)
    assert anon.startswith("cred:") and "sk-a" not in anon
    assert anon != scope_id("key", None, "Bearer sk-b", None, None)
    assert scope_id("user", "k1", None, "alice", None) != scope_id("user", "k1", None, "bob", None)
    assert scope_id("team", "k1", None, None, "search") == scope_id("team", "k2", None, None, "search")
    assert scope_id("team", "k1", None, None, None) == "key:k1"  # no team: the key alone
    assert scope_id("global", "k1", None, None, None) == scope_id("global", None, "x", "u", "t")


@pytest.mark.parametrize(
    ("endpoint", "body", "headers", "expected"),
    [
        ("chat.completions", CHAT, {}, (True, True, "uri-miss")),
        ("chat.completions", {**CHAT, "temperature": 1}, {}, (False, False, "bypass")),
        ("chat.completions", {**CHAT, "temperature": 1}, {"x-tollgate-cache": "On"}, (True, True, "uri-miss")),
        ("chat.completions", CHAT, {"x-tollgate-cache": "off"}, (False, False, "request")),
        ("chat.completions", CHAT, {"Cache-Control": "no-store"}, (False, False, "request")),
        ("chat.completions", CHAT, {"Cache-Control": "max-age=0, No-Cache"}, (False, True, "request")),
        ("responses", {"model": "m", "input": "x", "temperature": 0}, {"x-tollgate-cache": "on"}, (False, False, "bypass")),
    ],
)
def test_plan(endpoint: str, body: dict[str, Any], headers: dict[str, str], expected: tuple[bool, bool, str]) -> None:
    p = plan(endpoint, body, headers, ALL, "k")
    assert (p.lookup, p.store, p.fwd) == expected


def test_an_endpoint_left_out_of_the_config_is_bypassed() -> None:
    assert plan("embeddings", {"model": "e", "input": "x"}, {}, ("chat.completions",), "k").fwd == "bypass"


chunks = st.lists(st.binary(max_size=40), max_size=8).map(tuple)
usages = st.none() | st.builds(
    Usage,
    input_tokens=st.integers(0, 10**6), output_tokens=st.integers(0, 10**6),
    cached_input_tokens=st.integers(0, 10**6), input_source=st.sampled_from(["upstream", "estimated"]),
)


@given(st.text(max_size=30), chunks, usages)
def test_entry_round_trips(content_type: str, parts: tuple[bytes, ...], usage: Usage | None) -> None:
    entry = Entry(content_type, parts, usage)
    assert Entry.decode(entry.encode()) == entry


@given(st.binary(max_size=200))
def test_garbage_is_not_an_entry(blob: bytes) -> None:
    decoded = Entry.decode(blob)
    assert decoded is None or decoded.encode() == blob


def test_a_truncated_entry_is_refused() -> None:
    blob = Entry("text/event-stream", (b"data: 1\n\n", b"data: [DONE]\n\n")).encode()
    assert Entry.decode(blob[:-1]) is None
    assert Entry.decode(blob + b"x") is None


def test_recorder_gives_up_past_its_limit_and_on_errors() -> None:
    store = Plan("k", lookup=True, store=True, fwd="uri-miss")
    r = Recorder(store, limit=10)
    assert r.cache_status(200, "application/json") == "tollgate; fwd=uri-miss; fwd-status=200; stored"
    r.add(b"12345")
    r.add(b"67890")
    assert r.entry(None) == Entry("application/json", (b"12345", b"67890"))
    r.add(b"!")
    assert r.entry(None) is None and r.chunks == []
    failed = Recorder(store, limit=10)
    assert failed.cache_status(429, "application/json") == "tollgate; fwd=uri-miss; fwd-status=429"
    failed.add(b"x")
    assert failed.entry(None) is None
    bypass = Recorder(Plan("k", lookup=False, store=False, fwd="bypass"), limit=10)
    assert bypass.cache_status(200, "application/json") == "tollgate; fwd=bypass; fwd-status=200"


def test_what_a_recorder_keeps() -> None:
    store = Plan("k", lookup=True, store=True, fwd="uri-miss")

    def recorder(content_type: str, capped: bool = False) -> Recorder:
        r = Recorder(store, limit=100, capped=capped)
        r.cache_status(200, content_type)
        r.add(b"x")
        return r

    assert recorder("application/json").keeps("ok", 200, [])  # embeddings have no finish_reason
    assert not recorder("application/json").keeps("client_gone", 200, ["stop"])
    assert not recorder("application/json").keeps("ok", 201, ["stop"])
    assert recorder("text/event-stream").keeps("ok", 200, ["stop"])
    assert not recorder("text/event-stream").keeps("ok", 200, [])  # a stream cut short upstream
    assert recorder("application/json", capped=True).keeps("ok", 200, ["stop"])
    assert not recorder("application/json", capped=True).keeps("ok", 200, ["length"])
    assert recorder("application/json").keeps("ok", 200, ["length"])  # the client's own cap
    assert recorder("application/json", capped=True).final_status("ok", 200, ["length"]) == (
        "tollgate; fwd=uri-miss; fwd-status=200"
    )
