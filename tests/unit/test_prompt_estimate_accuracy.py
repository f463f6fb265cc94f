"""How close the local prompt estimate comes to OpenAI's real `prompt_tokens`.

Every OpenAI capture whose response reports usage (non-stream bodies, and streams with
`include_usage`) is estimated from its request body and compared with the real count.
Run with `-s` to see the table.

Bounds, and why:
- completions and embeddings: exact. The prompt is plain text or token ids with no
  framing, and the model's encoding is the one tiktoken names for it.
- chat without tools: within 2 tokens. The cookbook framing (3 per message, 3 to prime the
  reply) is exact for the gpt-4/gpt-4o chat format; the gpt-5 captures here differ by one
  token per request (the reply is primed with 2 tokens, not 3; developer messages are
  wrapped slightly differently), so 2 leaves room without hiding a real error.
- chat with tools: within 10% of the real count. Tool schemas are rendered server-side in
  a format OpenAI does not publish; the cookbook recipe plus the reasoning models' tool
  preamble is an approximation, measured here at about 5% low.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import estimate as estimating
from proxy import usage as usage_json

REPO = Path(__file__).resolve().parents[2]
_ROOTS = (REPO / "tests" / "fixtures" / "openai", Path("/work/shared/fixtures/openai"))


def _capture_dir() -> Path:
    for root in _ROOTS:
        if root.is_dir() and any(root.glob("*.yaml")):
            return root
    raise FileNotFoundError(f"no OpenAI captures in {_ROOTS}")


def _real_usage(endpoint: str, raw: str) -> int | None:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        usage = usage_json.usage_from_body(endpoint, body)
        return None if usage is None else usage.input_tokens
    found = None
    for line in raw.splitlines():
        if line.startswith("data: {"):
            usage = usage_json.usage_from_stream_payload(endpoint, json.loads(line[len("data: ") :]))
            if usage is not None:
                found = usage.input_tokens
    return found


def _rows() -> list[dict[str, Any]]:
    rows = []
    for path in sorted(_capture_dir().glob("*.yaml")):
        cassette = yaml.safe_load(path.read_text())
        for interaction in cassette["interactions"]:
            request, response = interaction["request"], interaction["response"]
            if response.get("code") != 200:
                continue
            endpoint = request["url"].split("/v1/", 1)[1].replace("/", ".")
            real = _real_usage(endpoint, response["body"])
            if real is None:
                continue
            body = json.loads(request["body"])
            estimate = estimating.estimate_prompt_tokens(endpoint, body, body.get("model", ""))
            rows.append({
                "capture": path.stem,
                "endpoint": endpoint,
                "model": body.get("model", ""),
                "tools": bool(body.get("tools") or body.get("functions")),
                "real": real,
                "estimate": estimate,
                "diff": estimate - real,
            })
    return rows


ROWS = _rows()


def _bound(row: dict[str, Any]) -> int:
    if row["endpoint"] in ("completions", "embeddings"):
        return 0
    if row["tools"]:
        return max(2, row["real"] // 10)
    return 2


def test_captures_cover_every_endpoint_and_are_printed() -> None:
    print()
    print(f"{'capture':36} {'endpoint':17} {'model':24} {'real':>5} {'est':>5} {'diff':>5} {'bound':>5}")
    for row in ROWS:
        print(f"{row['capture']:36} {row['endpoint']:17} {row['model']:24} "
              f"{row['real']:5d} {row['estimate']:5d} {row['diff']:+5d} {_bound(row):5d}")
    diffs = [abs(r["diff"]) for r in ROWS]
    print(f"{len(ROWS)} captures; |diff| max {max(diffs)}, mean {sum(diffs) / len(diffs):.2f}")
    assert {r["endpoint"] for r in ROWS} == {"chat.completions", "completions", "embeddings"}
    assert any(r["tools"] for r in ROWS)
    # Streams with include_usage are in: the chat-streaming-detailed-usage capture.
    assert "chat-streaming-detailed-usage" in {r["capture"] for r in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[r["capture"] for r in ROWS])
def test_estimate_is_within_bound(row: dict[str, Any]) -> None:
    assert abs(row["diff"]) <= _bound(row), row
