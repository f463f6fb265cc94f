"""Tollgate in front of a real llama-server (CPU, Gemma 3 270M), driven by the official openai SDK.

What a client gets through the proxy equals what it gets directly; what Tollgate measures
agrees with what llama-server reports about itself, per request (`timings`) and in its own
`/metrics`. Every tolerance is stated next to its assertion with the reason for it.

Needs LLAMA_SERVER and LLAMA_MODEL (scripts/build-llama-server.sh prints them, scripts/test
exports them). Without them these tests fail; they never skip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.exchange import Exchange
from tests.integration.conftest import Proxy, StartProxy, proxy_yaml
from tests.support.llama_server import HOW_TO_GET_IT, LlamaServer, LlamaServerError
from tests.support.recorder import Recorder

# Never contacted: only the llamacpp routes are used here.
UNUSED_OPENAI = "http://127.0.0.1:9/v1"
UPSTREAM = "llamacpp"
SEED = 42
MAX_TOKENS = 16
CHAT_PROMPTS = ("Name three colors.", "Write one short sentence about the sea.")
COMPLETION_PROMPTS = ("The capital of France is", "Once upon a time")

# TTFT measured by the proxy (request received -> first content chunk relayed) contains
# llama-server's prompt evaluation (timings.prompt_ms, which ends when the last prompt
# decode is done) plus what lies outside it: the proxy's own forwarding (well under 5 ms),
# loopback HTTP both ways, llama-server's request parsing, chat templating and tokenization,
# sampling the first token, and the hand-off from its inference thread to its HTTP thread. On an idle 2-core machine that is
# 1-10 ms; 250 ms leaves room for a CI runner busy with other work without letting a TTFT
# taken from the wrong moment (e.g. the end of the stream, or t0 at the first token) pass.
TTFT_SLACK_S = 0.25
# TPOT = (last content chunk - first content chunk) / (tokens - 1) as the proxy saw it,
# against llama-server's predicted_per_token_ms = predicted_ms / (predicted_n - 1) over the
# same span. Each end can be late by the event-loop and socket jitter of one chunk, spread
# over MAX_TOKENS - 1 intervals: allow 100 ms of total span error, i.e. ~7 ms per token.
TPOT_SPAN_SLACK_S = 0.1
# Per request, llama-server's prompt_ms runs from the moment a slot starts on the prompt to
# the end of its last prompt decode; its prompt_seconds_total counter only times the decode
# calls themselves (tools/server/server-context.cpp: metrics_pre_decode .. metrics_flush_prompt),
# leaving out cache matching and batch building. So the counter can only trail the sum of
# prompt_ms, by 0.3-3.3 ms per request as measured on an idle 2-core machine; allow 10 ms.
PROMPT_SECONDS_SLACK_PER_REQUEST_S = 0.010
# tokens_predicted_seconds_total adds up the very microseconds each request reports as
# predicted_ms (metrics_on_prediction adds stats.t_gen_us()), but /metrics prints 6
# significant digits (0.1 ms once the counter passes 10 s): allow 1 ms per request.
PREDICTED_SECONDS_SLACK_PER_REQUEST_S = 0.001


@pytest.fixture(scope="session")
def llama() -> Iterator[LlamaServer]:
    # A missing or broken server fails every test that needs it (reported as a setup error
    # with the reason); it never skips.
    problem = None
    try:
        server = LlamaServer.from_env()
        server.start()
    except LlamaServerError as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def inject_yaml(llama_url: str) -> str:
    text = proxy_yaml(UNUSED_OPENAI, llama_root=llama_url)
    marker = "    kind: llamacpp\n"
    assert text.count(marker) == 1
    return text.replace(marker, marker + "    inject_stream_usage: true\n")


async def start(start_proxy: StartProxy, yaml_text: str) -> tuple[Proxy, Recorder]:
    # A real model on one CPU thread is slower than the fakes: a wider bound than 5 s.
    recorder = Recorder(timeout=10.0)
    proxy = await start_proxy(yaml_text, observers=[recorder])
    return proxy, recorder


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-client", max_retries=0, timeout=60)


def extra(obj: Any) -> dict[str, Any]:
    """Fields llama-server adds that the SDK's models do not declare (`timings`)."""
    return dict(obj.model_extra or {})


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
            return await r.text()


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def llama_metrics(llama: LlamaServer) -> dict[str, float]:
    return await asyncio.to_thread(llama.metrics)


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after[f"llamacpp:{name}"] - before[f"llamacpp:{name}"]


async def chat(c: openai.AsyncOpenAI, model: str, prompt: str, **kw: Any) -> Any:
    return await c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS, temperature=0, seed=SEED, **kw,
    )  # fmt: skip


async def complete(c: openai.AsyncOpenAI, model: str, prompt: str, **kw: Any) -> Any:
    return await c.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, seed=SEED, **kw
    )


async def chat_stream(c: openai.AsyncOpenAI, model: str, prompt: str, **kw: Any) -> list[Any]:
    return [chunk async for chunk in await chat(c, model, prompt, stream=True, **kw)]


async def complete_stream(c: openai.AsyncOpenAI, model: str, prompt: str, **kw: Any) -> list[Any]:
    return [chunk async for chunk in await complete(c, model, prompt, stream=True, **kw)]


def chat_text(chunks: list[Any]) -> str:
    return "".join(ch.delta.content or "" for c in chunks for ch in c.choices)


def completion_text(chunks: list[Any]) -> str:
    return "".join(ch.text for c in chunks for ch in c.choices)


def stream_timings(chunks: list[Any]) -> dict[str, Any] | None:
    found = [extra(c)["timings"] for c in chunks if "timings" in extra(c)]
    assert len(found) <= 1, "llama-server sends timings once, on its last data chunk"
    return found[0] if found else None


def assert_usage_matches_timings(ex: Exchange, timings: dict[str, Any]) -> None:
    """Tollgate's token counts equal llama-server's own, whichever field they came from."""
    assert ex.usage is not None
    assert ex.usage.input_tokens == timings["prompt_n"] + timings["cache_n"]
    assert ex.usage.cached_input_tokens == timings["cache_n"]
    assert ex.usage.output_tokens == timings["predicted_n"]
    assert (ex.usage.input_source, ex.usage.output_source) == ("upstream", "upstream")


def test_missing_binary_or_model_is_a_failure_that_says_how_to_get_them() -> None:
    for env in ({}, {"LLAMA_SERVER": "/nonexistent/llama-server"}, {"LLAMA_MODEL": "/x.gguf"}):
        with pytest.raises(LlamaServerError, match="scripts/build-llama-server.sh"):
            LlamaServer.from_env(env)
    with pytest.raises(LlamaServerError, match="not an executable"):
        LlamaServer.from_env({"LLAMA_SERVER": "/nonexistent/llama-server", "LLAMA_MODEL": "/x.gguf"})
    assert "build-llama-server.sh" in HOW_TO_GET_IT


async def test_context_size_read_from_props(start_proxy: StartProxy, llama: LlamaServer) -> None:
    props = await asyncio.to_thread(llama.props)
    n_ctx = props["default_generation_settings"]["n_ctx"]
    assert n_ctx == 2048  # what `-c 2048` asked for, as this build reports it per slot
    proxy, _ = await start(start_proxy, proxy_yaml(UNUSED_OPENAI, llama_root=llama.url))
    # Tollgate reads /props in the background at start-up; give it a bounded while.
    deadline = time.monotonic() + 10
    seen = 0.0
    while time.monotonic() < deadline:
        seen = sample(await scrape(proxy.metrics_url), "tollgate_llamacpp_context_size", upstream=UPSTREAM)
        if seen:
            break
        await asyncio.sleep(0.05)
    print(f"\ncontext size: tollgate {seen:.0f}, llama-server /props n_ctx {n_ctx}")
    assert seen == n_ctx


async def test_non_stream_chat_and_completions_equal_direct(start_proxy: StartProxy, llama: LlamaServer) -> None:
    proxy, recorder = await start(start_proxy, proxy_yaml(UNUSED_OPENAI, llama_root=llama.url))
    direct, proxied = client(llama.api_base), client(proxy.base_url)

    d = await chat(direct, llama.model, CHAT_PROMPTS[0])
    p = await chat(proxied, "local", CHAT_PROMPTS[0])
    assert p.choices[0].message.content == d.choices[0].message.content
    assert p.choices[0].message.content
    assert (p.usage.prompt_tokens, p.usage.completion_tokens) == (d.usage.prompt_tokens, d.usage.completion_tokens)
    (ex,) = await recorder.wait_for(1)
    assert (ex.status, ex.outcome, ex.endpoint, ex.stream) == (200, "ok", "chat.completions", False)
    assert ex.upstream == UPSTREAM and ex.upstream_model == "models/gemma-3-270m-q4_k_m.gguf"
    assert ex.llamacpp_timings == extra(p)["timings"]
    assert_usage_matches_timings(ex, extra(p)["timings"])
    assert ex.usage is not None and ex.usage.output_tokens == p.usage.completion_tokens

    d = await complete(direct, llama.model, COMPLETION_PROMPTS[0])
    p = await complete(proxied, "local", COMPLETION_PROMPTS[0])
    assert p.choices[0].text == d.choices[0].text and p.choices[0].text
    assert (p.usage.prompt_tokens, p.usage.completion_tokens) == (d.usage.prompt_tokens, d.usage.completion_tokens)
    ex = (await recorder.wait_for(2))[1]
    assert (ex.status, ex.outcome, ex.endpoint) == (200, "ok", "completions")
    assert ex.llamacpp_timings == extra(p)["timings"]
    assert_usage_matches_timings(ex, extra(p)["timings"])
    assert ex.usage is not None and ex.usage.input_tokens == p.usage.prompt_tokens


async def test_streams_equal_direct_and_timings_are_captured(start_proxy: StartProxy, llama: LlamaServer) -> None:
    # The default for a llamacpp upstream: no usage injection, timings read instead.
    proxy, recorder = await start(start_proxy, proxy_yaml(UNUSED_OPENAI, llama_root=llama.url))
    direct, proxied = client(llama.api_base), client(proxy.base_url)

    d = await chat_stream(direct, llama.model, CHAT_PROMPTS[0])
    p = await chat_stream(proxied, "models/gemma-3-270m-q4_k_m.gguf", CHAT_PROMPTS[0])
    assert chat_text(p) == chat_text(d) and chat_text(p)
    assert [c.choices[0].finish_reason if c.choices else None for c in p] == [
        c.choices[0].finish_reason if c.choices else None for c in d
    ]
    assert all(c.usage is None for c in p)  # not asked for, not injected, not sent
    (ex,) = await recorder.wait_for(1)
    assert (ex.status, ex.outcome, ex.stream, ex.usage_injected) == (200, "ok", True, False)
    timings = stream_timings(p)
    assert timings is not None and ex.llamacpp_timings == timings
    assert_usage_matches_timings(ex, timings)
    assert ex.ttft_s is not None and ex.t_first_token_ns is not None

    d = await complete_stream(direct, llama.model, COMPLETION_PROMPTS[0])
    p = await complete_stream(proxied, "local", COMPLETION_PROMPTS[0])
    assert completion_text(p) == completion_text(d) and completion_text(p)
    ex = (await recorder.wait_for(2))[1]
    timings = stream_timings(p)
    assert timings is not None and ex.llamacpp_timings == timings
    assert_usage_matches_timings(ex, timings)
    # llama-server puts `usage` on a completions stream's last chunk unasked; it reaches the
    # client as it would directly, and Tollgate's count is that usage.
    assert p[-1].usage is not None and d[-1].usage is not None
    assert ex.usage is not None and ex.usage.output_tokens == p[-1].usage.completion_tokens


async def test_injected_usage_is_stripped_unless_asked(start_proxy: StartProxy, llama: LlamaServer) -> None:
    proxy, recorder = await start(start_proxy, inject_yaml(llama.url))
    direct, proxied = client(llama.api_base), client(proxy.base_url)

    # Not asked: Tollgate asks llama-server for the usage chunk and takes it out again.
    d = await chat_stream(direct, llama.model, CHAT_PROMPTS[1])
    p = await chat_stream(proxied, "local", CHAT_PROMPTS[1])
    assert chat_text(p) == chat_text(d) and chat_text(p)
    assert all(c.usage is None for c in d)
    assert all(c.usage is None for c in p), "the injected usage chunk reached the client"
    assert all(c.choices for c in p), "a choices:[] chunk reached the client"
    assert len(p) == len(d)
    (ex,) = await recorder.wait_for(1)
    assert ex.usage_injected and ex.outcome == "ok"
    assert ex.llamacpp_timings is not None
    assert_usage_matches_timings(ex, ex.llamacpp_timings)
    # With include_usage llama-server moves `timings` from the finish chunk to the usage
    # chunk, so the stripped stream carries none (a direct call without the option does).
    print(
        "\ninjection: client saw timings through proxy:", stream_timings(p) is not None,
        "| directly:", stream_timings(d) is not None,
    )  # fmt: skip

    # Asked: the client gets the usage chunk, the same counts as a direct call.
    d = await chat_stream(direct, llama.model, CHAT_PROMPTS[1], stream_options={"include_usage": True})
    p = await chat_stream(proxied, "local", CHAT_PROMPTS[1], stream_options={"include_usage": True})
    assert chat_text(p) == chat_text(d)
    assert p[-1].choices == [] and p[-1].usage is not None and d[-1].usage is not None
    assert (p[-1].usage.prompt_tokens, p[-1].usage.completion_tokens) == (
        d[-1].usage.prompt_tokens, d[-1].usage.completion_tokens,
    )  # fmt: skip
    assert len(p) == len(d)
    ex = (await recorder.wait_for(2))[1]
    assert ex.usage is not None and ex.usage.input_tokens == p[-1].usage.prompt_tokens
    assert ex.usage.output_tokens == p[-1].usage.completion_tokens
    timings = stream_timings(p)
    assert timings is not None and ex.llamacpp_timings == timings

    # Completions: llama-server reports usage on the last chunk whether asked or not, so
    # there is nothing to strip and the client sees what it sees directly.
    d = await complete_stream(direct, llama.model, COMPLETION_PROMPTS[1])
    p = await complete_stream(proxied, "local", COMPLETION_PROMPTS[1])
    assert completion_text(p) == completion_text(d) and completion_text(p)
    assert p[-1].usage is not None and d[-1].usage is not None
    assert p[-1].usage.completion_tokens == d[-1].usage.completion_tokens
    ex = (await recorder.wait_for(3))[2]
    assert ex.usage_injected
    assert ex.usage is not None and ex.usage.output_tokens == p[-1].usage.completion_tokens


async def test_metrics_agree_with_llama_servers_own_numbers(start_proxy: StartProxy, llama: LlamaServer) -> None:
    proxy, recorder = await start(start_proxy, proxy_yaml(UNUSED_OPENAI, llama_root=llama.url))
    c = client(proxy.base_url)
    before = await llama_metrics(llama)

    # Sequential, so each request has llama-server to itself and its timings are clean.
    streams = [
        await chat_stream(c, "local", CHAT_PROMPTS[0]),
        await chat_stream(c, "local", CHAT_PROMPTS[1]),
        await complete_stream(c, "local", COMPLETION_PROMPTS[0]),
        await complete_stream(c, "local", COMPLETION_PROMPTS[1]),
    ]
    plain = [await chat(c, "local", CHAT_PROMPTS[1]), await complete(c, "local", COMPLETION_PROMPTS[1])]
    exchanges = await recorder.wait_for(len(streams) + len(plain))
    after = await llama_metrics(llama)
    text = await scrape(proxy.metrics_url)

    # llama-server's per-request timings, as the client received them through the proxy.
    timings = [stream_timings(s) for s in streams] + [extra(r)["timings"] for r in plain]
    assert all(t is not None for t in timings)
    for ex, t in zip(exchanges, timings, strict=True):
        assert ex.llamacpp_timings == t
        assert_usage_matches_timings(ex, t)  # type: ignore[arg-type]
    n = len(exchanges)
    lab = {"model": "local", "upstream": UPSTREAM}
    print(f"\n{n} requests ({len(streams)} streams), max_tokens={MAX_TOKENS}, temperature 0, seed {SEED}")

    # Tokens: exact. Both sides count the same tokens (prompt_n evaluated, cache_n reused,
    # predicted_n generated); there is nothing to be approximate about.
    tg_input = sample(text, "tollgate_tokens_total", kind="input", **lab)
    tg_cached = sample(text, "tollgate_tokens_total", kind="cached_input", **lab)
    tg_output = sample(text, "tollgate_tokens_total", kind="output", **lab)
    ll_prompt = delta(after, before, "prompt_tokens_total")
    ll_cached = delta(after, before, "prompt_tokens_cached_total")
    ll_predicted = delta(after, before, "tokens_predicted_total")
    print(f"tokens  input: tollgate {tg_input:.0f} / llama prompt_tokens_total {ll_prompt:.0f}")
    print(f"tokens cached: tollgate {tg_cached:.0f} / llama prompt_tokens_cached_total {ll_cached:.0f}")
    print(f"tokens output: tollgate {tg_output:.0f} / llama tokens_predicted_total {ll_predicted:.0f}")
    assert sample(text, "tollgate_tokens_total", source="estimated") == 0
    assert (tg_input, tg_cached, tg_output) == (ll_prompt, ll_cached, ll_predicted)
    assert tg_output == sum(t["predicted_n"] for t in timings)  # type: ignore[index]

    # Prompt evaluation: Tollgate's histogram holds llama-server's per-request prompt_ms
    # exactly (same numbers, only divided by 1000) ...
    pe_sum = sample(text, "tollgate_llamacpp_prompt_eval_seconds_sum", upstream=UPSTREAM)
    pe_count = sample(text, "tollgate_llamacpp_prompt_eval_seconds_count", upstream=UPSTREAM)
    prompt_s = sum(t["prompt_ms"] for t in timings) / 1000  # type: ignore[index]
    assert pe_count == n
    assert pe_sum == pytest.approx(prompt_s, rel=1e-9)
    # ... and agrees with llama-server's own counter, which can only be the smaller.
    ll_prompt_s = delta(after, before, "prompt_seconds_total")
    print(
        f"prompt eval s: tollgate sum {pe_sum:.6f} / llama prompt_seconds_total {ll_prompt_s:.6f} "
        f"(diff {1000 * (pe_sum - ll_prompt_s):+.2f} ms over {n}; allowed 0..+{1000 * PROMPT_SECONDS_SLACK_PER_REQUEST_S * n:.0f} ms)"
    )
    # Below zero only by the printed precision of the counter (6 significant digits).
    assert -1e-4 * n <= pe_sum - ll_prompt_s <= PROMPT_SECONDS_SLACK_PER_REQUEST_S * n

    # Generation speed: the histogram holds predicted_per_second per request exactly. llama-
    # server computes it as (predicted_n - 1) / predicted_ms: its clock starts at the first
    # token, which came out of prompt evaluation. From it and Tollgate's own output token
    # counts, generation time is rebuilt per request and must sum to llama-server's
    # tokens_predicted_seconds_total.
    tps_sum = sample(text, "tollgate_llamacpp_generation_tokens_per_second_sum", upstream=UPSTREAM)
    tps_count = sample(text, "tollgate_llamacpp_generation_tokens_per_second_count", upstream=UPSTREAM)
    assert tps_count == n
    assert tps_sum == pytest.approx(sum(t["predicted_per_second"] for t in timings), rel=1e-9)  # type: ignore[index]
    rebuilt_s = sum(
        (ex.usage.output_tokens - 1) / ex.llamacpp_timings["predicted_per_second"]  # type: ignore[union-attr,index]
        for ex in exchanges
    )
    ll_gen_s = delta(after, before, "tokens_predicted_seconds_total")
    mean_tps, agg_tps = tps_sum / tps_count, (ll_predicted - n) / ll_gen_s
    print(
        f"generation s: rebuilt from tollgate {rebuilt_s:.6f} / llama tokens_predicted_seconds_total "
        f"{ll_gen_s:.6f} (diff {1000 * (rebuilt_s - ll_gen_s):+.3f} ms; allowed ±{1000 * PREDICTED_SECONDS_SLACK_PER_REQUEST_S * n:.0f} ms)"
    )
    print(f"tokens/s: tollgate mean of requests {mean_tps:.2f} / llama (tokens - first) over total time {agg_tps:.2f}")
    assert abs(rebuilt_s - ll_gen_s) <= PREDICTED_SECONDS_SLACK_PER_REQUEST_S * n
    # A mean of per-request rates and a total rate differ unless every request ran at the
    # same speed; both lie between the slowest and the fastest request.
    rates = [t["predicted_per_second"] for t in timings]  # type: ignore[index]
    assert min(rates) <= mean_tps <= max(rates) and min(rates) <= agg_tps <= max(rates)

    # TTFT and TPOT, streams only: what the proxy timed against llama-server's own clock.
    ttft_sum = sample(text, "tollgate_time_to_first_token_seconds_sum", **lab)
    ttft_count = sample(text, "tollgate_time_to_first_token_seconds_count", **lab)
    stream_ex = exchanges[: len(streams)]
    assert ttft_count == len(streams)
    assert ttft_sum == pytest.approx(sum(ex.ttft_s for ex in stream_ex), rel=1e-9)  # type: ignore[misc]
    tpot_count = sample(text, "tollgate_time_per_output_token_seconds_count", **lab)
    tpot_sum = sample(text, "tollgate_time_per_output_token_seconds_sum", **lab)
    tpots = [ex.tpot_s for ex in stream_ex]
    assert tpot_count == len(streams) and tpot_sum == pytest.approx(sum(tpots), rel=1e-9)  # type: ignore[arg-type]
    for i, ex in enumerate(stream_ex):
        t = ex.llamacpp_timings
        assert t is not None and ex.ttft_s is not None and ex.tpot_s is not None and ex.usage is not None
        prompt_eval_s = t["prompt_ms"] / 1000
        llama_tpot_s = t["predicted_per_token_ms"] / 1000
        span_err_s = abs(ex.tpot_s - llama_tpot_s) * (ex.usage.output_tokens - 1)
        print(
            f"stream {i} ({ex.endpoint}): TTFT tollgate {1000 * ex.ttft_s:.1f} ms vs llama prompt_ms "
            f"{t['prompt_ms']:.1f} (+{1000 * (ex.ttft_s - prompt_eval_s):.1f} ms) | TPOT tollgate "
            f"{1000 * ex.tpot_s:.2f} ms vs llama {t['predicted_per_token_ms']:.2f} ms "
            f"(span error {1000 * span_err_s:.1f} ms) | tokens/s llama {t['predicted_per_second']:.1f}"
        )
        # The first token cannot be relayed before llama-server has evaluated the prompt.
        assert prompt_eval_s <= ex.ttft_s <= prompt_eval_s + TTFT_SLACK_S
        assert ex.usage.output_tokens == t["predicted_n"] == MAX_TOKENS
        assert span_err_s <= TPOT_SPAN_SLACK_S


async def test_opted_in_streams_get_their_cost_in_the_usage_chunk(start_proxy: StartProxy, llama: LlamaServer) -> None:
    """llama-server's own usage chunk (chat: `choices: []`; completions: the last chunk,
    which also carries the finish) gains `usage.cost`, equal to what Tollgate charged."""
    prices = '\npricing:\n  models:\n    "models/*": {input: 1.5, cached_input: 0.5, output: 3}\n'
    proxy, recorder = await start(start_proxy, proxy_yaml(UNUSED_OPENAI, llama_root=llama.url, extra=prices))
    proxied = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=60,
                                 default_headers={"x-tollgate-include-cost": "true"})
    asked = {"stream_options": {"include_usage": True}}
    chunks = [
        await chat_stream(proxied, "local", CHAT_PROMPTS[0], **asked),
        await complete_stream(proxied, "local", COMPLETION_PROMPTS[0], **asked),
    ]
    finished = await recorder.wait_for(2)
    for stream, ex in zip(chunks, finished, strict=True):
        (usage,) = [c.usage for c in stream if c.usage is not None]
        cost = extra(usage)["cost"]
        assert extra(usage)["cost_source"] == "price_table"
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0
        expected = (
            Decimal(usage.prompt_tokens - cached) * Decimal("1.5") + Decimal(cached) * Decimal("0.5")
            + Decimal(usage.completion_tokens) * 3
        ) / 1_000_000
        assert Decimal(str(cost["total_usd"])) == expected == ex.cost, (cost, ex.usage)
        assert usage.completion_tokens > 0 and ex.outcome == "ok"
        print(f"\n{ex.endpoint} stream: {usage.prompt_tokens} in ({cached} cached), "
              f"{usage.completion_tokens} out -> usage.cost {cost}")
    assert chat_text(chunks[0]) and completion_text(chunks[1])
    await proxied.close()
