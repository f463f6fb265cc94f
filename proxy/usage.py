"""Token counts of one exchange, each with where it came from, and reading them from the
upstream's JSON.

Trust order: the upstream's `usage`, then llama.cpp `timings`, then a local estimate
(`proxy.estimate`). The extraction functions read untrusted upstream JSON, so they never
raise: a missing or wrongly typed field reads as "not there" (None) or 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "TokenSource",
    "Usage",
    "usage_from_body",
    "usage_from_llamacpp_timings",
    "usage_from_stream_payload",
]

# "estimated_lower_bound": output estimated from the relayed text of a reasoning model,
# which cannot see the hidden reasoning tokens it was billed for, so the true count is
# higher. "estimated_upper_bound": a prompt with an image of unknown size (a remote URL),
# counted as the largest image the model bills.
TokenSource = Literal["upstream", "estimated", "estimated_lower_bound", "estimated_upper_bound"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens by the kinds that are priced apart.

    `input_tokens` includes `cached_input_tokens` and `cache_write_tokens` (as OpenAI's
    `prompt_tokens` includes `cached_tokens`); `output_tokens` includes `reasoning_tokens`.
    Pricing subtracts the parts so nothing is billed twice.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    input_source: TokenSource = "estimated"
    output_source: TokenSource = "estimated"
    # Built-in tool calls billed per call (USD per 1k calls in the price table), as the
    # response shows them.
    web_search_calls: int = 0
    file_search_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def with_output(self, output_tokens: int, source: TokenSource) -> Usage:
        return replace(self, output_tokens=output_tokens, output_source=source)



def _count(value: object) -> int | None:
    """A token count from JSON: a non-negative integer (integral floats allowed), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _detail(obj: Mapping[str, Any], details_key: str, field: str) -> int:
    details = obj.get(details_key)
    if not isinstance(details, dict):
        return 0
    return _count(details.get(field)) or 0


def _consistent(
    input_tokens: int, output_tokens: int, cached: int, reasoning: int, cache_write: int
) -> Usage:
    # Parts never exceed their totals: a malformed upstream cannot make a Usage that bills
    # the same token twice.
    cached = min(cached, input_tokens)
    cache_write = min(cache_write, input_tokens - cached)
    reasoning = min(reasoning, output_tokens)
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
        cache_write_tokens=cache_write,
        input_source="upstream",
        output_source="upstream",
    )


# (input, output, input details, output details) field names: the Responses API's, then
# chat/completions/embeddings'.
_RESPONSES_USAGE = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
_CHAT_USAGE = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")


def _usage_from_object(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    responses = "input_tokens" in usage or "output_tokens" in usage
    inp, out, inp_details, out_details = _RESPONSES_USAGE if responses else _CHAT_USAGE
    input_tokens = _count(usage.get(inp))
    output_tokens = _count(usage.get(out))
    if input_tokens is None and output_tokens is None:
        return None
    cache_write = _detail(usage, inp_details, "cache_write_tokens")
    if not cache_write and not responses:
        # OpenAI reports no cache writes. Gateways that serve Anthropic models in OpenAI's
        # format (LiteLLM and the like) put them beside prompt_tokens, which includes them,
        # as Anthropic's own name.
        cache_write = _count(usage.get("cache_creation_input_tokens")) or 0
    return _consistent(
        input_tokens or 0,
        output_tokens or 0,
        cached=_detail(usage, inp_details, "cached_tokens"),
        reasoning=_detail(usage, out_details, "reasoning_tokens"),
        cache_write=cache_write,
    )


def usage_from_llamacpp_timings(timings: dict[str, Any]) -> Usage:
    """llama.cpp `timings`: prompt = prompt_n (evaluated) + cache_n (reused from the KV cache)."""
    if not isinstance(timings, dict):
        timings = {}
    prompt_n = _count(timings.get("prompt_n")) or 0
    cache_n = _count(timings.get("cache_n")) or 0
    predicted_n = _count(timings.get("predicted_n")) or 0
    return _consistent(prompt_n + cache_n, predicted_n, cached=cache_n, reasoning=0, cache_write=0)


def _usage_from_timings(timings: object) -> Usage | None:
    if not isinstance(timings, dict):
        return None
    if _count(timings.get("prompt_n")) is None and _count(timings.get("predicted_n")) is None:
        return None
    return usage_from_llamacpp_timings(timings)


def _with_tool_calls(usage: Usage | None, payload: Mapping[str, Any]) -> Usage | None:
    """`usage` plus the billed built-in tool calls the response shows: a Responses body's
    `web_search_call` / `file_search_call` output items; a chat search model
    (gpt-4o[-mini]-search-preview) searches the web once for every answer."""
    if usage is None:
        return None
    web = file = 0
    output = payload.get("output")
    if isinstance(output, list):
        for item in output:
            kind = item.get("type") if isinstance(item, dict) else None
            web += kind == "web_search_call"
            file += kind == "file_search_call"
    model = payload.get("model")
    if isinstance(model, str) and "search-preview" in model and payload.get("object") in (
        "chat.completion", "chat.completion.chunk"
    ):
        web = max(web, 1)
    if not web and not file:
        return usage
    return replace(usage, web_search_calls=web, file_search_calls=file)


def usage_from_body(endpoint: str, payload: dict[str, Any]) -> Usage | None:
    """Usage of a non-stream response body (parsed JSON), or None if it reports none.

    Reads chat/completions/embeddings `usage` (prompt_tokens ...) and Responses `usage`
    (input_tokens ...) alike; a llama-server body without `usage` falls back to `timings`.
    """
    if not isinstance(payload, dict):
        return None
    usage = _usage_from_object(payload.get("usage")) or _usage_from_timings(payload.get("timings"))
    return _with_tool_calls(usage, payload)


# Responses stream events whose `response` carries the final usage. `incomplete` (output
# cap reached) and `failed` still bill what was used.
_RESPONSES_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def usage_from_stream_payload(endpoint: str, payload: dict[str, Any]) -> Usage | None:
    """Usage carried by one stream event's JSON, or None.

    The chat/completions chunk with a non-null `usage` (OpenAI sends it last, with
    `choices: []`); a Responses `response.completed` event; a llama-server chunk with
    `timings`. llama-server with `timings_per_token` puts running timings on every chunk,
    so callers should keep the last Usage they see, not the first.
    """
    if not isinstance(payload, dict):
        return None
    event_type = payload.get("type")
    if isinstance(event_type, str) and event_type.startswith("response."):
        if event_type not in _RESPONSES_FINAL_EVENTS:
            return None
        response = payload.get("response")
        if not isinstance(response, dict):
            return None
        return _with_tool_calls(_usage_from_object(response.get("usage")), response)
    usage = _usage_from_object(payload.get("usage")) or _usage_from_timings(payload.get("timings"))
    return _with_tool_calls(usage, payload)
