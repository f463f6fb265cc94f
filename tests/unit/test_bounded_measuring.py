"""What measuring keeps of a response is bounded, whatever the response's size (pure, no sockets)."""

from __future__ import annotations

import math

import orjson
import pytest

from proxy import body as body_module
from proxy.body import BODY_TAIL_BYTES, BodyKeeper, measure_body_tail
from proxy.estimate import estimate_output_tokens
from proxy.exchange import KEPT_OUTPUT_CHARS, Exchange, OutputText
from proxy.usage import Usage


def exchange() -> Exchange:
    return Exchange(request_id="r", endpoint="embeddings", method="POST", path="/v1/embeddings", t0_ns=0)


def test_output_text_keeps_its_beginning_and_counts_the_rest() -> None:
    text = OutputText()
    piece = "token " * 1000  # 6000 characters
    for _ in range(2000):  # 12 M characters relayed
        text.append(piece)
    assert text.chars == 12_000_000
    assert text.kept == KEPT_OUTPUT_CHARS and len(text.text()) == KEPT_OUTPUT_CHARS
    assert not text.complete
    assert text.text() == (piece * 11)[:KEPT_OUTPUT_CHARS]


def test_output_text_estimate_is_exact_while_whole_and_scaled_beyond() -> None:
    def count(s: str) -> int:
        return estimate_output_tokens(s, "gpt-4o-mini")

    small = OutputText()
    for word in ("Hello", ", ", "world", "!"):
        small.append(word)
    assert small.complete and small.estimate_tokens(count) == count("Hello, world!")

    big = OutputText()
    for _ in range(30_000):
        big.append(" hello")  # 180,000 characters, one token each
    kept_tokens = count(big.text())
    assert big.estimate_tokens(count) == math.ceil(kept_tokens * 180_000 / KEPT_OUTPUT_CHARS)
    assert abs(big.estimate_tokens(count) - 30_000) <= 2
    assert OutputText().estimate_tokens(count) == 0


def test_a_body_under_the_limit_is_measured_whole() -> None:
    ex = exchange()
    keeper = BodyKeeper()
    body = orjson.dumps({"object": "list", "data": [], "usage": {"prompt_tokens": 7, "total_tokens": 7}})
    for i in range(0, len(body), 5):
        keeper.add(body[i : i + 5])
    keeper.measure(ex)
    assert ex.usage == Usage(input_tokens=7, output_tokens=0, input_source="upstream", output_source="upstream")
    assert ex.body_measured == "whole"


def test_a_body_over_the_limit_keeps_only_its_tail_and_finds_the_usage_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_module, "MAX_PARSED_BODY", 1 << 20)
    ex = exchange()
    keeper = BodyKeeper()
    # A string holding braces and an escaped quote before the usage must not confuse the scan.
    head = b'{"object":"list","data":[' + b'{"embedding":[0.1,0.2],"index":0},' * 100_000
    tail = b'{"note":"a } and \\" {"}],"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60}}'
    body = head + tail
    for i in range(0, len(body), 16_384):
        keeper.add(body[i : i + 16_384])
        assert keeper.parts is None or sum(map(len, keeper.parts)) <= 1 << 20
    assert keeper.parts is None and len(keeper.tail) == BODY_TAIL_BYTES
    assert keeper.tail == body[-BODY_TAIL_BYTES:] and keeper.size == len(body)
    keeper.measure(ex)
    assert ex.body_measured == "tail"
    assert ex.usage is not None and (ex.usage.input_tokens, ex.usage.output_tokens) == (10, 50)


@pytest.mark.parametrize(
    "tail",
    [b'..."data":[1,2,3]}', b'...,"usage":{"prompt_tokens":10', b'...,"usage":{"prompt_tokens":"x"}}'],
    ids=["no-usage", "cut-off-usage", "bad-usage"],
)
def test_a_tail_without_a_readable_usage_leaves_the_usage_unknown(tail: bytes) -> None:
    ex = exchange()
    measure_body_tail(ex, tail)
    assert ex.usage is None and ex.body_measured == "tail"
