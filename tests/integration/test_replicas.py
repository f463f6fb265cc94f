"""Replicated upstreams over real HTTP, driven by the official openai SDK: several fake
OpenAI servers replaying real captures behind one upstream name (README "Replicated
upstreams"). The same against two real llama-servers is in test_replicas_llamacpp.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.app import reconfigure
from proxy.config_file import parse_settings
from proxy.errors import ConfigError
from proxy.replicas import ReplicaState, choose, default_replica_name
from tests.integration.conftest import Proxy, StartProxy
from tests.integration.test_real_llamacpp import sample, scrape
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import FakeUpstream, RecordedRequest, Reply, openai_usage_aware
from tests.support.procs import free_port, wait_until

USAGE = {"prompt_tokens": 19, "completion_tokens": 26, "total_tokens": 45}


def config(replicas: list[str], *, interval: float = 0.1, eject_for: float = 30.0, checks: bool = True) -> str:
    listed = "\n".join(f"      - {r}" for r in replicas)
    return f"""
server: {{host: 127.0.0.1, port: 0}}
timeouts: {{connect: 2, first_byte: 5, idle: 5}}
upstreams:
  pool:
    kind: openai
    api_key: sk-pool
    replicas:
{listed}
    health_check: {{enabled: {str(checks).lower()}, interval: {interval}, timeout: 1, eject_for: {eject_for}}}
default_upstream: pool
metrics: {{host: 127.0.0.1, port: 0}}
"""


def named(fake: FakeUpstream | str, name: str, key: str | None = None) -> str:
    url = fake if isinstance(fake, str) else fake.api_base
    return "{" + f"base_url: '{url}', name: {name}" + (f", api_key: {key}" if key else "") + "}"


def serve_chat(fake: FakeUpstream) -> None:
    fake.route("POST", "/v1/chat/completions", chat_reply())
    fake.replay(openai_capture("embeddings-basic"))
    fake.route("GET", "/v1/models", Reply.json({"object": "list", "data": []}))


def chat_reply(headers_delay: float = 0.0) -> Any:
    stream = openai_usage_aware(openai_capture("chat-streaming"), USAGE)
    basic = Reply.from_capture(openai_capture("chat-basic"))

    def reply(request: RecordedRequest) -> Reply:
        body = request.json if isinstance(request.json, dict) else {}
        chosen = stream(request) if body.get("stream") else basic
        if headers_delay:
            chosen = Reply(chosen.status, chosen.headers, chosen.chunks, chosen.delays, headers_delay=headers_delay)
        return chosen

    return reply


def posts(fake: FakeUpstream) -> list[RecordedRequest]:
    """The requests the proxy relayed (health checks are GETs)."""
    return [r for r in fake.requests if r.method == "POST"]


def client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=20)


async def ask(sdk: openai.AsyncOpenAI, stream: bool = False) -> str:
    messages: Any = [{"role": "user", "content": "hi"}]
    if stream:
        chunks = [c async for c in await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)]
        return "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    done = await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
    return done.choices[0].message.content or ""


def served_by(proxy: Proxy) -> list[str | None]:
    return [json.loads(line).get("replica") for line in proxy.log_lines()]


async def replica_metric(proxy: Proxy, name: str, **labels: str) -> float:
    return sample(await scrape(proxy.metrics_url), name, upstream="pool", **labels)


async def test_requests_spread_and_a_dead_replica_never_shows(start_proxy: StartProxy) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    async with FakeUpstream() as a, FakeUpstream() as b:
        serve_chat(a)
        serve_chat(b)
        # The dead one first: the first request picks it (a tie goes round-robin from the
        # first), fails to connect, and goes on to another replica. No health checks: they
        # would find it down before any request.
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        proxy = await start_proxy(
            config([named(dead, "dead"), named(a, "a"), named(b, "b")], checks=False), tracer_provider=provider
        )
        sdk = client(proxy)
        texts = [await ask(sdk, stream=i % 2 == 0) for i in range(8)]
        assert all(texts), texts
        who = served_by(proxy)
        print(f"\nserved by: {who}")
        assert set(who) == {"a", "b"} and who.count("a") == who.count("b") == 4
        first = json.loads(proxy.log_lines()[0])
        assert first["replica_connect_failures"] == ["dead"] and first["status"] == 200
        # Once ejected, the dead replica is not tried again for eject_for.
        assert all("replica_connect_failures" not in json.loads(line) for line in proxy.log_lines()[1:])
        assert await replica_metric(proxy, "tollgate_replica_connect_failures_total", replica="dead") == 1
        assert await replica_metric(proxy, "tollgate_replica_up", replica="dead") == 0
        assert await replica_metric(proxy, "tollgate_replica_up", replica="a") == 1
        assert await replica_metric(proxy, "tollgate_replica_requests_total", replica="a", outcome="ok") == 4
        assert await replica_metric(proxy, "tollgate_replica_in_flight_requests", replica="a") == 0
        # The span names the replica, and its server.port is that replica's.
        first_span = exporter.get_finished_spans()[0].attributes or {}
        assert first_span["tollgate.replica"] == first["replica"]
        assert first_span["tollgate.replica_connect_failures"] == ("dead",)
        assert first_span["server.port"] == (a if first["replica"] == "a" else b).port
        # The request went to the replica's own address, with the upstream's key.
        assert len(posts(a)) == 4 and posts(a)[0].headers["Authorization"] == "Bearer sk-pool"


async def test_least_busy_replica_takes_the_next_request(start_proxy: StartProxy) -> None:
    async with FakeUpstream() as slow, FakeUpstream() as fast:
        slow.route("POST", "/v1/chat/completions", chat_reply(headers_delay=1.5))
        serve_chat(fast)
        proxy = await start_proxy(config([named(slow, "slow"), named(fast, "fast")], checks=False))
        sdk = client(proxy)
        held = asyncio.create_task(ask(sdk))  # a tie: round-robin's first, the slow one
        await slow.wait_request(1)
        assert await replica_metric(proxy, "tollgate_replica_in_flight_requests", replica="slow") == 1
        # While it is busy, every later request (one at a time) goes to the idle replica.
        for _ in range(5):
            await ask(sdk)
        assert len(posts(fast)) == 5 and len(posts(slow)) == 1
        assert await held
        assert served_by(proxy) == ["fast"] * 5 + ["slow"]


async def test_killed_replica_mid_test_no_client_error(start_proxy: StartProxy) -> None:
    async with FakeUpstream() as a, FakeUpstream() as b:
        serve_chat(a)
        serve_chat(b)
        proxy = await start_proxy(config([named(a, "a"), named(b, "b")], checks=False))
        sdk = client(proxy)
        # Keep-alive connections to both replicas are pooled by the first round.
        assert all(await asyncio.gather(*(ask(sdk, stream=i % 2 == 0) for i in range(6))))
        assert len(posts(a)) == 3 and len(posts(b)) == 3
        await a.close()  # the replica goes away between two rounds
        texts = await asyncio.gather(*(ask(sdk, stream=i % 2 == 0) for i in range(10)))
        assert all(texts)
        assert len(posts(a)) == 3 and len(posts(b)) == 13
        log = [json.loads(line) for line in proxy.log_lines()]
        assert all(rec["status"] == 200 and rec["replica"] == "b" for rec in log[6:])
        failures = await replica_metric(proxy, "tollgate_replica_connect_failures_total", replica="a")
        print(f"\nconnect failures on the killed replica: {failures:.0f}")
        assert failures >= 1
        assert await replica_metric(proxy, "tollgate_replica_up", replica="a") == 0
        assert await replica_metric(proxy, "tollgate_replica_up", replica="b") == 1


async def test_health_gauge_flips_with_the_health_check(start_proxy: StartProxy) -> None:
    sick = {"now": False}

    def models(request: RecordedRequest) -> Reply:
        if sick["now"]:
            return Reply.json({"error": {"message": "overloaded"}}, status=503)
        return Reply.json({"object": "list", "data": []})

    async with FakeUpstream() as a, FakeUpstream() as b:
        serve_chat(a)
        serve_chat(b)
        b.route("GET", "/v1/models", models)
        proxy = await start_proxy(config([named(a, "a"), named(b, "b")], interval=0.05))

        async def up(name: str) -> float:
            return await replica_metric(proxy, "tollgate_replica_up", replica=name)

        async def gauge_becomes(name: str, value: float) -> None:
            for _ in range(200):
                if await up(name) == value:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"tollgate_replica_up{{replica={name}}} never became {value}")

        assert await up("b") == 1
        sick["now"] = True
        await gauge_becomes("b", 0)
        # Checked down: left out of the choice, though it would still answer.
        sdk = client(proxy)
        for _ in range(4):
            await ask(sdk)
        assert set(served_by(proxy)) == {"a"}
        sick["now"] = False
        await gauge_becomes("b", 1)
        for _ in range(4):
            await ask(sdk)
        assert "b" in served_by(proxy)[4:]
        assert await up("a") == 1


async def test_all_replicas_down_is_one_openai_shaped_502(start_proxy: StartProxy) -> None:
    dead = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    proxy = await start_proxy(config([named(dead[0], "x"), named(dead[1], "y")], checks=False))
    sdk = client(proxy)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as caught:
            await ask(sdk)
        assert caught.value.status_code == 502
        body: Any = caught.value.body
        assert body["code"] == "upstream_unreachable" and "127.0.0.1" not in body["message"]
    # Both tried each time: ejected ones are still tried when no replica is left.
    log = [json.loads(line) for line in proxy.log_lines()]
    assert [sorted(rec["replica_connect_failures"]) for rec in log] == [["x", "y"], ["x", "y"]]
    assert await replica_metric(proxy, "tollgate_replica_connect_failures_total", replica="x") == 2
    assert await replica_metric(proxy, "tollgate_replica_in_flight_requests", replica="x") == 0


async def test_a_replica_with_its_own_key(start_proxy: StartProxy) -> None:
    async with FakeUpstream() as a, FakeUpstream() as b:
        serve_chat(a)
        serve_chat(b)
        proxy = await start_proxy(config([named(a, "a"), named(b, "b", key="sk-b-own")], interval=30))
        sdk = client(proxy)
        for _ in range(2):
            await ask(sdk)
        embedding = await sdk.embeddings.create(model="text-embedding-3-small", input="hi")
        assert embedding.data
        # Requests and health checks alike carry the replica's own key where it has one.
        assert (len(posts(a)), len(posts(b))) == (2, 1) and any(r.method == "GET" for r in b.requests)
        assert {r.headers["Authorization"] for r in a.requests} == {"Bearer sk-pool"}
        assert {r.headers["Authorization"] for r in b.requests} == {"Bearer sk-b-own"}
        # GET /v1/models through the proxy asks an up replica.
        listed = await sdk.models.list()
        assert [m.id for m in listed.data] == []


def test_choice_is_least_busy_then_round_robin() -> None:
    a, b, c = ReplicaState("a"), ReplicaState("b"), ReplicaState("c")
    assert [choose([a, b, c], [], 0.0, turn).name for turn in range(4)] == ["a", "b", "c", "a"]
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 1
    assert [choose([a, b, c], [], 0.0, turn).name for turn in range(2)] == ["b", "c"]
    assert choose([a, b, c], [b, c], 0.0, 0) is a
    assert choose([a, b, c], [a, b, c], 0.0, 0) is None
    # Ejected: out until its time is up, then tried again; checked down: out until checked up.
    b.ejected(now=10.0, seconds=5.0)
    c.checked(False)
    assert choose([a, b, c], [], 12.0, 0) is a
    assert choose([a, b, c], [], 15.0, 0) is b
    # None eligible: the untried ones anyway.
    assert [choose([b, c], [], 12.0, turn).name for turn in range(2)] == ["b", "c"]
    assert choose([b, c], [b], 12.0, 0) is c
    c.checked(True)
    assert c.eligible(12.0) and c.up


def test_choice_by_llamacpp_free_slots() -> None:
    a, b = ReplicaState("a", slots_free=0), ReplicaState("b", slots_free=2)
    # b has free slots though this process has sent it more: others' traffic fills a.
    b.in_flight = b.in_flight_at_scrape = 1
    assert choose([a, b], [], 0.0, 0) is b
    # Requests sent since the scrape use up the free slots it saw.
    b.in_flight = 3
    assert b.free_estimate() == 0 and choose([a, b], [], 0.0, 0) is a  # tie on slots: fewer in flight
    # One replica's slots unknown: in flight alone decides.
    a.slots_free = None
    a.in_flight = 1
    assert choose([a, b], [], 0.0, 0) is a


def test_default_replica_name_never_holds_credentials_or_path() -> None:
    assert default_replica_name("https://user:pw@api.example.com/v1") == "api.example.com:443"
    assert default_replica_name("http://10.0.0.5:8080") == "10.0.0.5:8080"


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ("{kind: openai}", "upstreams.pool: set exactly one of base_url and replicas (got neither)"),
        ("{base_url: 'http://a/v1', replicas: ['http://b/v1']}", "set exactly one of base_url and replicas (got both)"),
        ("{replicas: []}", "upstreams.pool.replicas: [] must list at least one replica"),
        ("{replicas: ['http://a:1/v1', 'http://a:1/v1/']}", "upstreams.pool.replicas: [1] 'http://a:1/v1' is listed twice"),
        ("{replicas: ['http://a:1/x', 'http://a:1/y']}", "'a:1' names both 'http://a:1/x' and 'http://a:1/y'"),
        ("{replicas: ['ftp://a']}", "upstreams.pool.replicas[0].base_url: 'ftp://a' is not an http(s) URL"),
        ("{replicas: [{base_url: 'http://a', name: 'a b'}]}", "upstreams.pool.replicas[0].name: 'a b' is not a valid"),
        ("{replicas: [{base_url: 'http://a', url: 'x'}]}", "upstreams.pool.replicas[0].url"),
        ("{base_url: 'http://a', health_check: {interval: 1}}", "health_check applies only to an upstream with replicas"),
        ("{replicas: ['http://a'], health_check: {interval: 0}}", "upstreams.pool.health_check.interval: 0"),
    ],
)
def test_bad_replica_config_names_key_and_value(upstream: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(f"upstreams:\n  pool: {upstream}\ndefault_upstream: pool\n", env={})
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_replicas_of_a_llamacpp_upstream_are_server_roots() -> None:
    settings = parse_settings(
        "upstreams:\n  local: {kind: llamacpp, replicas: ['http://h1:8080/v1', {base_url: 'http://h2:8080', name: gpu2}]}\n"
        "default_upstream: local\n",
        env={},
    )
    replicas = settings.upstreams["local"].replicas
    assert replicas is not None
    assert [(r.name, r.base_url) for r in replicas] == [("h1:8080", "http://h1:8080"), ("gpu2", "http://h2:8080")]
    assert settings.upstreams["local"].api_base == "http://h1:8080/v1"


def test_settings_survive_a_dump_and_revalidation() -> None:
    # What worker start-up and a reload that keeps restart-only sections do.
    from proxy.settings import Settings

    settings = parse_settings(
        "upstreams:\n  one: {base_url: 'http://a/v1'}\n"
        "  pool: {kind: llamacpp, replicas: ['http://h1:1/v1', {base_url: 'http://h2:1', name: b, api_key: k}],"
        " health_check: {interval: 1}}\ndefault_upstream: pool\n",
        env={},
    )
    again = Settings.model_validate(settings.model_dump())
    assert again.upstreams == settings.upstreams


def test_a_replica_key_counts_as_tollgates_own_key_for_exposure() -> None:
    with pytest.raises(ConfigError, match="upstreams.pool"):
        parse_settings(
            "server: {host: 0.0.0.0}\nupstreams:\n  pool: {replicas: ['http://a/v1', {base_url: 'http://b/v1', api_key: sk-x}]}\n"
            "default_upstream: pool\n",
            env={},
        )


async def test_reload_swaps_the_replicas_and_stops_the_old_checks(start_proxy: StartProxy) -> None:
    async with FakeUpstream() as a, FakeUpstream() as b:
        serve_chat(a)
        serve_chat(b)
        a.route("POST", "/v1/chat/completions", chat_reply(headers_delay=0.5))
        proxy = await start_proxy(config([named(a, "a")], interval=0.05))
        sdk = client(proxy)
        old = proxy.runtime.upstreams["pool"]
        assert old.replicas is not None
        await wait_until(lambda: len(a.requests) >= 2, "health checks of a", 5)
        # A request in flight across the reload finishes on the replica it started on.
        held = asyncio.create_task(ask(sdk))
        await wait_until(lambda: len(posts(a)) == 1, "the request on a", 5)
        ledger = f"ledger: {{path: '{proxy.runtime.settings.ledger.path}'}}\n"
        kept = await reconfigure(proxy.app, parse_settings(config([named(b, "b")], interval=0.05) + ledger, env={}))
        assert kept == []
        assert old.retired and proxy.runtime.upstreams["pool"] is not old
        assert await replica_metric(proxy, "tollgate_replica_in_flight_requests", replica="a") == 1
        assert await ask(sdk)
        assert await held
        assert served_by(proxy) == ["b", "a"]
        assert await replica_metric(proxy, "tollgate_replica_in_flight_requests", replica="a") == 0
        checks_of_a = len(a.requests)
        await asyncio.sleep(0.3)
        assert len(a.requests) == checks_of_a  # the old upstream's checks stopped
