"""Per-call fees (web search, file search) in the price format and the cost function; the
search models' shipped prices; costs written as plain decimals everywhere."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import orjson
import pytest
import yaml

from proxy.errors import ConfigError
from proxy.exchange import Exchange
from proxy.observers.access_log import AccessLogObserver
from proxy.pricing import Price, PriceTable, cost, plain_usd
from proxy.spend.ledger.base import SpendRow
from proxy.usage import Usage, usage_from_body, usage_from_stream_payload

REPO = Path(__file__).resolve().parents[2]


def _capture_response(name: str) -> dict[str, object]:
    cassette = yaml.safe_load((REPO / "tests/fixtures/openai-extra" / f"{name}.yaml").read_text())
    return json.loads(cassette["interactions"][0]["response"]["body"])


def test_search_model_is_priced_with_its_web_search_call() -> None:
    body = _capture_response("chat-web-search")
    usage = usage_from_body("chat.completions", body)
    assert usage is not None and (usage.input_tokens, usage.output_tokens, usage.web_search_calls) == (26, 22, 1)
    price = PriceTable.shipped().lookup(str(body["model"]))  # gpt-4o-mini-search-preview-2025-03-11
    assert price is not None and price.call_fee("web_search") == D("25.00")
    # 26 x $0.15/1M + 22 x $0.60/1M + one call at $25 per 1000.
    assert cost(usage, price) == D(26) * D("0.15") / 10**6 + D(22) * D("0.60") / 10**6 + D("0.025")
    full = PriceTable.shipped().lookup("gpt-4o-search-preview")
    assert full is not None and (full.input, full.output) == (D("2.50"), D("10.00"))


def test_responses_tool_calls_are_counted_from_output_items() -> None:
    response = {
        "object": "response",
        "model": "gpt-4.1",
        "output": [
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {"type": "web_search_call", "id": "ws_2", "status": "completed"},
            {"type": "file_search_call", "id": "fs_1", "status": "completed"},
            {"type": "message", "content": []},
        ],
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    usage = usage_from_body("responses", response)
    assert usage is not None and (usage.web_search_calls, usage.file_search_calls) == (2, 1)
    streamed = usage_from_stream_payload("responses", {"type": "response.completed", "response": response})
    assert streamed == usage
    price = Price(input=D(2), output=D(8), per_1k_calls=(("web_search", D(10)), ("file_search", D("2.50"))))
    assert cost(usage, price) == D(10 * 2 + 5 * 8) / 10**6 + D(2) * D(10) / 1000 + D("2.50") / 1000
    # No fee in the price: calls cost nothing extra; no calls: nothing extra either.
    assert cost(usage, Price(input=D(2), output=D(8))) == D(60) / 10**6
    assert cost(Usage(input_tokens=10, output_tokens=5), price) == D(60) / 10**6


def test_a_plain_chat_model_has_no_call() -> None:
    body = {"object": "chat.completion", "model": "gpt-4o-mini", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    usage = usage_from_body("chat.completions", body)
    assert usage is not None and usage.web_search_calls == 0


def test_price_format_per_1k_calls_errors_name_the_key_and_value() -> None:
    table = PriceTable.from_yaml_text("m:\n  input: 1\n  output: 2\n  per_1k_calls:\n    web_search: 10\n")
    price = table.lookup("m")
    assert price is not None and price.call_fee("web_search") == D(10) and price.call_fee("file_search") == D(0)
    with pytest.raises(ConfigError, match=r"m.per_1k_calls: unknown tool 'code_interpreter'"):
        PriceTable.from_yaml_text("m:\n  input: 1\n  output: 2\n  per_1k_calls:\n    code_interpreter: 3\n")
    with pytest.raises(ConfigError, match=r"m.per_1k_calls.web_search: -1"):
        PriceTable.from_yaml_text("m:\n  input: 1\n  output: 2\n  per_1k_calls:\n    web_search: -1\n")
    with pytest.raises(ConfigError, match=r"m.per_1k_calls: 5 must be a mapping"):
        PriceTable.from_yaml_text("m:\n  input: 1\n  output: 2\n  per_1k_calls: 5\n")


def test_costs_are_plain_decimals_in_logs_and_spend_rows() -> None:
    tiny = D("1.4E-7")
    assert str(tiny) == "1.4E-7" and plain_usd(tiny) == "0.00000014"
    row = SpendRow.from_usage(Usage(input_tokens=1), tiny, time=_now(), request_id="r", key=None, user=None,
                              model="m", upstream="u", endpoint="chat.completions")
    assert json.loads(row.to_json())["cost"] == "0.00000014"
    assert SpendRow.from_json(row.to_json()).cost == tiny
    ex = Exchange(request_id="r", endpoint="chat.completions", method="POST", path="/v1/chat/completions", t0_ns=0)
    ex.cost = tiny
    obs = AccessLogObserver(stream=io.BytesIO())
    line = orjson.loads(orjson.dumps(obs.record(ex), default=str))
    assert line["cost_usd"] == "0.00000014"


def _now() -> datetime:
    return datetime.now(UTC)
