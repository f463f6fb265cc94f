"""`tollgate demo`: what the proxy measured agrees with what the synthetic upstream did."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy import demo
from proxy.estimate import count_text_tokens, estimate_prompt_tokens
from proxy.synthetic import WORDS, SyntheticUpstream, completion_words

ROOT = Path(__file__).resolve().parents[2]
TTFT_MS, GAP_MS, TOKENS = 60.0, 5.0, 8
# The SDK, the proxy and the synthetic upstream share one event loop on a shared machine;
# a measured moment may trail the true one by loop latency, never precede it.
TTFT_TOLERANCE_S = 0.005
GAP_TOLERANCE_S = 0.001


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.configure_parser(parser)
    return parser.parse_args(list(argv))


def run_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code = demo.run(demo_args(*argv))
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_demo_json_measurements_equal_the_synthetic_truth(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_in_process(
        capsys,
        "--json", "--requests", "6", "--ttft-ms", str(TTFT_MS), "--gap-ms", str(GAP_MS),
        "--tokens", str(TOKENS), "--metrics-port", "0",
    )  # fmt: skip
    requests = data["requests"]
    assert [r["kind"] for r in requests] == [k.name for k in demo.KINDS]
    for r in requests:
        rid = r["request_id"]
        assert r["outcome"] == "ok", rid
        assert r["client_text_ok"], rid
        # Tokens: exactly the upstream's, which are exactly what was generated.
        assert (r["input_tokens"], r["output_tokens"]) == (r["truth_input_tokens"], r["truth_output_tokens"]), rid
        assert (r["input_source"], r["output_source"]) == ("upstream", "upstream"), rid
        assert r["truth_output_tokens"] == (0 if r["endpoint"] == "embeddings" else TOKENS), rid
        assert Decimal(r["cost"]) == Decimal(r["expected_cost"]) > 0, rid
        # Timing. Tollgate stamps the first output when it reads it: at or after the true
        # write (never before: the role-only chunk, written earlier, must not count), and
        # within a few ms. Its upstream TTFT starts when it sent the request, before the
        # upstream had it.
        assert 0 <= r["first_token_lag_s"] <= TTFT_TOLERANCE_S, rid
        assert r["arrival_lag_s"] >= 0, rid
        assert r["first_output_s"] >= r["truth_first_output_s"], rid
        if r["stream"]:
            assert r["truth_first_output_s"] >= TTFT_MS / 1000
            assert r["ttft_s"] >= r["first_output_s"]
            assert r["gap_count"] == r["truth_gap_count"] == TOKENS - 1, rid
            assert abs(r["gap_mean_s"] - r["truth_gap_mean_s"]) <= GAP_TOLERANCE_S, rid
        else:
            assert r["ttft_s"] is None and r["gap_count"] == 0, rid

    # Measured minus true TTFT also holds the request's trip to the upstream, which other
    # processes on a busy machine can stretch now and then; typically it is about 1 ms.
    errors = sorted(abs(r["first_output_s"] - r["truth_first_output_s"]) for r in requests)
    assert errors[len(errors) // 2] <= TTFT_TOLERANCE_S, errors

    # The summary endpoint saw the same burst and the same money.
    summary = data["summary"]
    assert summary["requests"] == 6 and summary["errors"] == 0
    total = sum((Decimal(r["expected_cost"]) for r in requests), Decimal(0))
    assert Decimal(summary["cost_usd"]) == total
    assert set(summary["models"]) == {demo.CHAT_MODEL, demo.EMBEDDING_MODEL}
    assert data["models_listed"] == [demo.CHAT_MODEL, demo.EMBEDDING_MODEL]
    assert data["metrics_url"].startswith("http://127.0.0.1:") and data["metrics_url"].endswith("/metrics")
    kinds = {row["kind"]: row for row in data["kinds"]}
    assert kinds["chat stream"]["token_sources"] == ["upstream"]


def test_demo_prints_the_table_as_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--requests", "4", "--ttft-ms", "40", "--gap-ms", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("kind "))
    for column in ("TTFT", "upstream TTFT*", "truth", "gap mean", "tokens in/out (source)", "cost USD"):
        assert column in header
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for kind in ("chat stream", "chat", "completions stream", "embeddings"):
        assert kind in rows, out
    assert "4 requests" in out and "4 ok" in out
    assert "(upstream)" in rows["chat stream"]
    assert "/metrics" in out and "/v1/tollgate/summary" in out
    assert "OPENAI_BASE_URL=" in out
    assert "the SDK received exactly the generated text: yes" in out


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200
        return await r.text()


def test_keep_running_serves_metrics_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--json", "--keep-running", "--metrics-port", "0",
         "--requests", "2", "--ttft-ms", "20", "--gap-ms", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line or "Ctrl-C to stop" in line:
                break
        assert proc.poll() is None, "the demo exited instead of staying up"
        # --json printed the whole document before waiting.
        text = os.read(proc.stdout.fileno(), 1 << 20).decode()
        data = json.loads(text)
        metrics = asyncio.run(scrape(data["metrics_url"]))
        assert 'tollgate_requests_total{' in metrics
        assert f'model="{demo.CHAT_MODEL}"' in metrics
        summary = orjson.loads(asyncio.run(scrape(data["summary_url"])))
        assert summary["requests"] == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


# ------------------------------------------------------------------ the synthetic upstream itself


def test_every_word_is_one_o200k_token_and_so_is_every_completion() -> None:
    for n in (1, 7, len(WORDS), 3 * len(WORDS) + 1):
        text = "".join(completion_words(n))
        assert count_text_tokens(text, "demo-model") == n


async def test_synthetic_stream_follows_openai_usage_protocol() -> None:
    body: dict[str, Any] = {
        "model": "demo-model",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 3,
    }
    async with SyntheticUpstream(ttft_s=0.01, gap_s=0.002, tokens=5) as syn:
        async with aiohttp.ClientSession() as s:
            async with s.post(syn.base_url + "/chat/completions", json=body, headers={"X-Request-Id": "r1"}) as r:
                raw = await r.read()
            async with s.post(syn.base_url + "/chat/completions", json={**body, "stream_options": None}) as r:
                plain = await r.read()
        truth = syn.truth_for("r1")
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == [" the", " quick", " brown"]
    assert chunks[4]["choices"][0]["finish_reason"] == "length"  # capped by max_tokens
    assert chunks[-1]["choices"] == []
    prompt = estimate_prompt_tokens("chat.completions", body, "demo-model")
    assert chunks[-1]["usage"]["prompt_tokens"] == prompt
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert b'"usage"' not in plain
    assert truth is not None and len(truth.token_times_ns) == 3 and truth.include_usage
    assert truth.t_role_ns is not None and truth.t_role_ns < truth.token_times_ns[0]
    assert truth.ttft_s is not None and truth.ttft_s >= 0.01
    # Never closer than half a gap, so a reader sees every token as its own chunk.
    assert truth.gaps_s and min(truth.gaps_s) >= 0.0009
