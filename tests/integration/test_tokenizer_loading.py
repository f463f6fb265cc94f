"""Tokenizers at start and on first use: the proxy only checks the fallback encoding's data
(o200k_base) before it serves, and builds each table off the event loop when a request first
needs an estimate; that request waits for its own table (~0.1 s from the cache) rather than being
estimated with the wrong one, and other requests keep being served meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import openai
import pytest

from proxy import encodings as tokens
from tests.integration.conftest import StartProxy, proxy_yaml
from tests.integration.faults_common import drained, leave_mid_stream, spend_rows
from tests.integration.test_failures import CHAT, SSE, chunk
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.recorder import Recorder


async def test_no_table_is_built_before_serving_and_each_on_first_need(
    start_proxy: StartProxy, fake_openai: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens.warm()  # already built by earlier tests in this process, or now: kept out of the timing
    monkeypatch.setattr(tokens, "_ENCODINGS", {})
    monkeypatch.setattr(tokens, "_in_background", False)
    monkeypatch.setattr(tokens, "_BUILDING", set())

    # A budget, so admission estimates the prompt: that is what needs a tokenizer.
    budget = "budgets:\n  - name: daily\n    period: daily\n    limit_usd: 100\n"
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=budget))
    # Start only checked the fallback's data: no ~43 MB table until a request needs one.
    assert tokens._ENCODINGS == {}
    assert tokens._in_background

    # text-embedding-3-small is a cl100k_base model: its own table is built for it.
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=10)
    capture = openai_capture("embeddings-basic")
    fake_openai.replay(capture)
    body = capture.request_json
    assert tokens.encoding_name_for(body["model"]) == "cl100k_base"
    result = await client.embeddings.create(**body)
    assert result.data and result.usage.prompt_tokens > 0
    assert set(tokens._ENCODINGS) == {"cl100k_base"}
    assert tokens.encoding_for(body["model"]).name == "cl100k_base"
    await client.embeddings.create(**body)


async def test_without_budgets_a_response_with_usage_builds_no_table(
    start_proxy: StartProxy, fake_openai: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "_ENCODINGS", {})
    monkeypatch.setattr(tokens, "_BUILDING", set())
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=10)
    capture = openai_capture("embeddings-basic")
    fake_openai.replay(capture)
    result = await client.embeddings.create(**capture.request_json)
    assert result.usage.prompt_tokens > 0
    assert tokens._ENCODINGS == {}


async def test_the_first_request_waits_for_its_own_table_off_the_event_loop(
    start_proxy: StartProxy, fake_openai: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens.warm()
    monkeypatch.setattr(tokens, "_ENCODINGS", {"o200k_base": tokens._encoding_named("o200k_base")})
    monkeypatch.setattr(tokens, "_BUILDING", set())
    budget = "budgets:\n  - name: daily\n    period: daily\n    limit_usd: 100\n"
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=budget))
    assert "cl100k_base" not in tokens._ENCODINGS

    # The event loop keeps ticking while the table builds on a worker thread.
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    estimated: list[str] = []
    real_estimate = tokens.encoding_for

    def spy(model: str) -> object:
        enc = real_estimate(model)
        estimated.append(enc.name)
        return enc

    monkeypatch.setattr("proxy.estimate.encoding_for", spy)
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=10)
    capture = openai_capture("embeddings-basic")
    fake_openai.replay(capture)
    await client.embeddings.create(**capture.request_json)
    ticking.cancel()
    # Admission estimated the very first request with cl100k_base, not the o200k stand-in.
    assert estimated and set(estimated) == {"cl100k_base"}
    assert tokens._ENCODINGS.get("cl100k_base") is not None
    assert gaps and max(gaps) < 0.3, f"event loop blocked for {max(gaps):.3f} s"


async def test_encoding_ready_returns_at_once_when_loaded() -> None:
    tokens.warm()
    started = time.perf_counter()
    await tokens.encoding_ready("gpt-4o")
    assert time.perf_counter() - started < 0.01


async def test_a_leased_request_the_client_left_is_estimated_with_a_table_built_off_the_loop(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leased admission builds no table, so the first request that must be estimated may
    be one whose client left mid-stream, ended on the handler's way out: its table is built
    on a worker thread and the request accounted once it is there."""
    tokens.warm()
    monkeypatch.setattr(tokens, "_ENCODINGS", {})
    monkeypatch.setattr(tokens, "_BUILDING", set())
    built_on: list[bool] = []
    real_build = tokens._build

    def spy(name: str) -> object:
        built_on.append(threading.current_thread() is threading.main_thread())
        return real_build(name)

    monkeypatch.setattr(tokens, "_build", spy)
    rec = Recorder()
    chunks = [chunk(i, f"word{i} ") for i in range(40)]
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, chunks=chunks, delays=[0] + [0.05] * 39))
    extra = (
        f"ledger: {{path: '{tmp_path / 'ledger.db'}', leasing: {{enabled: true}}}}\n"
        "budgets:\n  - name: daily\n    period: daily\n    limit_usd: 100\n"
    )
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=extra), observers=[rec])
    await leave_mid_stream(proxy.base_url, CHAT)
    ex = await rec.wait()
    await drained(proxy.runtime)
    assert ex.outcome == "client_gone" and ex.budget_verdict == "ok"
    assert ex.usage is not None and ex.usage.output_source == "estimated" and ex.usage.output_tokens >= 10
    assert built_on and not any(built_on), "a tokenizer table was built on the event loop"
    row = next(r for r in spend_rows(tmp_path / "ledger.db") if r["request_id"] == ex.request_id)
    assert row["output_tokens"] == ex.usage.output_tokens and row["outcome"] == "client_gone"
