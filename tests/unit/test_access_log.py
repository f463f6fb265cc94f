from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.exchange import Exchange, OutputText
from proxy.observers.access_log import AccessLogObserver, prompt_text, wall_iso_ms
from proxy.usage import Usage
from tests.support.exchanges import chat_exchange

T0 = 3_000_000_000
MS = 1_000_000
SECRET_PROMPT = "SECRET-PROMPT-a8f3"
SECRET_KEY = "sk-proj-SECRETKEY-77"
SECRET_OUTPUT = "SECRET-COMPLETION-19c"



def output_text(*parts: str) -> OutputText:
    text = OutputText()
    for part in parts:
        text.append(part)
    return text

def exchange(**kw: Any) -> Exchange:
    defaults: dict[str, Any] = dict(
        requested_model="gpt-4o-mini",
        route_model="gpt-4o-mini",
        upstream="openai",
        stream=True,
        key_name="team-a",
        user="alice",
        body={
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": SECRET_PROMPT}]},
            ],
            "api_key": SECRET_KEY,
        },
        t_upstream_sent_ns=T0 + MS,
        t_first_byte_ns=T0 + 80 * MS,
        t_first_token_ns=T0 + 100 * MS,
        t_last_token_ns=T0 + 300 * MS,
        t_end_ns=T0 + 320 * MS,
        gaps_ns=[10 * MS] * 19 + [200 * MS],
        overhead_ns=250_000,
        status=200,
        outcome="ok",
        usage=Usage(
            input_tokens=30,
            cached_input_tokens=10,
            output_tokens=21,
            reasoning_tokens=4,
            input_source="upstream",
            output_source="upstream",
        ),
        cost=Decimal("0.00001234500"),
        output_text=output_text("Hello ", SECRET_OUTPUT),
        finish_reasons=["stop"],
    )
    return chat_exchange("req-42", T0, 1_700_000_000.5, {**defaults, **kw})


def log_lines(obs: AccessLogObserver, *exs: Exchange) -> list[dict[str, Any]]:
    for ex in exs:
        obs.on_start(ex)
        obs.on_first_token(ex)
        obs.on_finish(ex)
    assert isinstance(obs.stream, io.BytesIO)
    raw = obs.stream.getvalue()
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.splitlines()]


def test_one_line_with_measurements() -> None:
    buf = io.BytesIO()
    (rec,) = log_lines(AccessLogObserver(buf), exchange())
    assert rec["ts"] == "2023-11-14T22:13:20.500Z"
    assert rec["request_id"] == "req-42"
    assert rec["key"] == "team-a"
    assert rec["model"] == "gpt-4o-mini" and rec["route_model"] == "gpt-4o-mini"
    assert rec["upstream"] == "openai" and rec["endpoint"] == "chat.completions"
    assert rec["status"] == 200 and rec["stream"] is True and rec["outcome"] == "ok"
    assert rec["ttfb_s"] == pytest.approx(0.08)
    assert rec["ttft_s"] == pytest.approx(0.1)
    assert rec["gap_mean_s"] == pytest.approx((19 * 0.01 + 0.2) / 20)
    assert rec["gap_p95_s"] == pytest.approx(0.01)  # nearest rank 19 of 20
    # 21 output tokens of which 4 hidden reasoning (no reasoning chunk was seen): 17 came as
    # chunks, 16 after the first.
    assert rec["tpot_s"] == pytest.approx(0.2 / 16)
    assert rec["duration_s"] == pytest.approx(0.32)
    assert rec["overhead_s"] == pytest.approx(0.00025)
    assert rec["tokens"] == {
        "input": 30,
        "cached_input": 10,
        "cache_write": 0,
        "output": 21,
        "reasoning": 4,
        "input_source": "upstream",
        "output_source": "upstream",
    }
    assert rec["cost_usd"] == "0.00001234500"  # exact decimal, as a string
    assert rec["error_type"] is None
    assert "llamacpp" not in rec


def test_secrets_never_logged_with_payloads_off() -> None:
    buf = io.BytesIO()
    log_lines(AccessLogObserver(buf), exchange())
    raw = buf.getvalue().decode()
    for secret in (SECRET_PROMPT, SECRET_KEY, SECRET_OUTPUT, "be brief", "Bearer"):
        assert secret not in raw
    rec = orjson.loads(raw)
    assert "prompt" not in rec and "completion" not in rec
    # Issue 15: who spent is logged (the user the request is attributed to), once, in its
    # own field; the body it came from is not.
    assert rec["user"] == "alice" and raw.count("alice") == 1


def test_the_key_its_team_and_metadata_are_logged() -> None:
    buf = io.BytesIO()
    ex = exchange()
    ex.key_name, ex.key_metadata = "search-prod", {"team": "search", "cost_center": "42"}
    log_lines(AccessLogObserver(buf), ex)
    rec = orjson.loads(buf.getvalue())
    assert (rec["key"], rec["user"], rec["team"]) == ("search-prod", "alice", "search")
    assert rec["key_metadata"] == {"team": "search", "cost_center": "42"}


def test_truncated_payloads() -> None:
    buf = io.BytesIO()
    (rec,) = log_lines(AccessLogObserver(buf, payloads="truncated", payload_max_chars=20), exchange())
    assert rec["prompt"] == "system: be brief\nuse…"
    assert rec["completion"] == "Hello SECRET-COMPLET…"
    raw = buf.getvalue().decode()
    assert SECRET_KEY not in raw  # only the prompt text, never other body fields


def test_failure_and_llamacpp_timings_and_lines_per_exchange() -> None:
    buf = io.BytesIO()
    timings = {"prompt_n": 12.0, "cache_n": 0.0, "predicted_n": 7.0, "prompt_ms": 40.5,
               "predicted_ms": 120.0, "predicted_per_second": 58.3}  # fmt: skip
    failed = exchange(
        status=None,
        outcome="client_gone",
        error_type="client_disconnected",
        t_first_token_ns=None,
        t_last_token_ns=None,
        gaps_ns=[],
        usage=None,
        cost=None,
    )
    llama = exchange(upstream="llama", route_model=None, llamacpp_timings=timings)
    first, second = log_lines(AccessLogObserver(buf), failed, llama)
    assert first["outcome"] == "client_gone" and first["error_type"] == "client_disconnected"
    assert first["status"] is None and first["ttft_s"] is None and first["gap_mean_s"] is None
    assert first["tokens"] is None and first["cost_usd"] is None
    assert second["llamacpp"] == timings
    assert second["route_model"] == "other"


def test_prompt_rendering() -> None:
    assert prompt_text({"prompt": "once upon"}) == "once upon"
    assert prompt_text({"input": ["a", "b"]}) == "a\nb"
    assert prompt_text({"input": [{"role": "user", "content": "hi"}]}) == "user: hi"
    assert prompt_text({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}) == "user: [image_url]"
    assert prompt_text(None) is None
    assert prompt_text({"model": "m"}) is None


def test_flushes_each_line_and_rejects_bad_mode() -> None:
    class Recorder(io.BytesIO):
        flushes = 0

        def flush(self) -> None:
            Recorder.flushes += 1
            super().flush()

    buf = Recorder()
    obs = AccessLogObserver(buf)
    obs.on_finish(exchange())
    obs.on_finish(exchange())
    assert Recorder.flushes == 2
    assert buf.getvalue().count(b"\n") == 2
    with pytest.raises(ValueError):
        AccessLogObserver(buf, payloads="full")  # type: ignore[arg-type]
    assert wall_iso_ms(0.0) == "1970-01-01T00:00:00.000Z"


@settings(deadline=None, max_examples=2000)
@given(wall=st.floats(min_value=-1e10, max_value=2e10, allow_nan=False) | st.integers(0, 2_000_000_000).map(lambda s: s + 0.9995))
def test_iso_utc_is_datetimes_own_rendering(wall: float) -> None:
    # wall_iso_ms caches the text up to the second; it must still say what datetime says.
    expected = datetime.fromtimestamp(wall, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert wall_iso_ms(wall) == expected
    assert wall_iso_ms(wall) == expected  # the cached second gives the same
