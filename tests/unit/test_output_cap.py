"""output_cap_of: the cap each upstream kind obeys and the outputs it makes (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import InvalidRequest
from proxy.output_cap import OutputCap, output_cap_of

CASES: list[tuple[str, str, dict[str, Any], OutputCap | None]] = [
    ("chat.completions", "openai", {}, OutputCap("max_completion_tokens", None, 1)),
    ("chat.completions", "openai", {"max_tokens": 5, "n": 3}, OutputCap("max_tokens", 5, 3)),
    ("chat.completions", "openai", {"max_completion_tokens": 7, "max_tokens": 5}, OutputCap("max_completion_tokens", 7, 1)),
    # OpenAI's chat does not read max_output_tokens (nor n_predict): no cap it obeys.
    ("chat.completions", "openai", {"max_output_tokens": 5, "n_predict": 9}, OutputCap("max_completion_tokens", None, 1)),
    ("completions", "openai", {"max_tokens": 4, "n": 2, "best_of": 5, "prompt": ["a", "b"]}, OutputCap("max_tokens", 4, 10)),
    ("completions", "openai", {"max_tokens": 4, "prompt": [1, 2, 3]}, OutputCap("max_tokens", 4, 1)),
    ("completions", "openai", {"max_tokens": 4, "prompt": [[1, 2], [3]]}, OutputCap("max_tokens", 4, 2)),
    ("responses", "openai", {"max_output_tokens": 30, "n": 4}, OutputCap("max_output_tokens", 30, 1)),
    ("embeddings", "openai", {"input": "x"}, None),
    ("chat.completions", "llamacpp", {"max_tokens": 1, "n_predict": 150}, OutputCap("n_predict", 150, 1)),
    ("chat.completions", "llamacpp", {"max_tokens": 1, "max_completion_tokens": 8}, OutputCap("max_completion_tokens", 8, 1)),
    ("chat.completions", "llamacpp", {"max_output_tokens": 5}, OutputCap("max_tokens", None, 1)),
    ("chat.completions", "llamacpp", {"n_predict": -1}, OutputCap("n_predict", None, 1, unlimited=True)),
    ("completions", "llamacpp", {"max_tokens": 3, "n_cmpl": 2, "n": 9, "prompt": ["a", "b", "c"]}, OutputCap("max_tokens", 3, 6)),
    ("chat.completions", "llamacpp", {"max_tokens": 3, "n": 2}, OutputCap("max_tokens", 3, 2)),
]


@pytest.mark.parametrize(("endpoint", "kind", "payload", "expected"), CASES)
def test_output_cap_of(endpoint: str, kind: str, payload: dict[str, Any], expected: OutputCap | None) -> None:
    assert output_cap_of(endpoint, kind, payload) == expected


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [({"n_predict": -2}, "n_predict", "integer_below_min_value"), ({"n_predict": "9"}, "n_predict", "invalid_type"),
     ({"n_cmpl": 1.5}, "n_cmpl", "invalid_type")],
)
def test_llamacpp_fields_of_the_wrong_kind_are_refused(payload: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        output_cap_of("chat.completions", "llamacpp", payload)
    assert (info.value.param, info.value.code) == (param, code)
