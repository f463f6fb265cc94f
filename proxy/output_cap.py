"""How much output a request can make its upstream generate, as that upstream reads it. Pure.

A budget's reservation is only a worst case if it covers every token the upstream will
generate. That is the cap the upstream obeys, per output, times the number of outputs:

- OpenAI: chat reads `max_completion_tokens` (else `max_tokens`) and makes `n` choices;
  completions read `max_tokens` and generate `max(n, best_of)` candidates for each prompt of
  a batch (`prompt` may be a list); Responses read `max_output_tokens`.
- llama.cpp's llama-server: `n_predict` wins over its aliases `max_completion_tokens` and
  `max_tokens` (in that order); `max_output_tokens` means nothing to its chat endpoint;
  `n_cmpl` (alias `n`) outputs for each prompt; -1 means "until the context is full".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.errors import InvalidRequest

_OPENAI_CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "chat.completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
_LLAMACPP_CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "chat.completions": ("n_predict", "max_completion_tokens", "max_tokens"),
    "completions": ("n_predict", "max_completion_tokens", "max_tokens"),
    # llama-server turns a Responses request into a chat one, max_output_tokens into max_tokens.
    "responses": ("max_output_tokens",),
}
# The field Tollgate writes a cap into when the request has none, per upstream kind.
_DEFAULT_FIELD: dict[str, dict[str, str]] = {
    "openai": {"chat.completions": "max_completion_tokens", "completions": "max_tokens", "responses": "max_output_tokens"},
    "llamacpp": {"chat.completions": "max_tokens", "completions": "max_tokens", "responses": "max_output_tokens"},
}
UNLIMITED = -1  # llama.cpp's n_predict for "no cap"


@dataclass(frozen=True, slots=True)
class OutputCap:
    """The cap on one output and how many outputs the upstream generates."""

    field: str  # the body field that caps output, as this upstream reads it
    per_output: int | None  # its value; None when the request sets none, or is unlimited
    outputs: int  # choices times prompts
    unlimited: bool = False  # the client asked llama.cpp for no cap (-1)


def output_cap_of(endpoint: str, upstream_kind: str, payload: Mapping[str, Any]) -> OutputCap | None:
    """The output cap of a request to `endpoint` on an upstream of `upstream_kind`; None for
    endpoints that generate no output tokens (embeddings). Values were type-checked when the
    request was accepted, except llama.cpp's own fields, which are checked here."""
    llamacpp = upstream_kind == "llamacpp"
    fields = (_LLAMACPP_CAP_FIELDS if llamacpp else _OPENAI_CAP_FIELDS).get(endpoint)
    if fields is None:
        return None
    default_field = _DEFAULT_FIELD["llamacpp" if llamacpp else "openai"][endpoint]
    field, value = default_field, None
    for name in fields:
        if payload.get(name) is not None:
            field, value = name, _integer(payload, name)
            break
    unlimited = llamacpp and value is not None and value < 0
    if unlimited and value != UNLIMITED:
        raise InvalidRequest(
            f"Invalid '{field}': expected -1 (no limit) or a value >= 0, but got {value}.",
            param=field,
            code="integer_below_min_value",
        )
    per_output = None if unlimited else value
    return OutputCap(field, per_output, _choices(endpoint, llamacpp, payload) * _prompts(endpoint, payload), unlimited)


def _integer(payload: Mapping[str, Any], name: str) -> int:
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected an integer, but got {type(value).__name__}.",
            param=name,
            code="invalid_type",
        )
    return value


def _choices(endpoint: str, llamacpp: bool, payload: Mapping[str, Any]) -> int:
    if endpoint == "responses":
        return 1
    if llamacpp:
        for name in ("n_cmpl", "n"):  # n_cmpl first: `n` is its fallback alias
            if payload.get(name) is not None:
                return max(1, _integer(payload, name))
        return 1
    n = payload.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    if endpoint == "completions":
        best_of = payload.get("best_of")
        if isinstance(best_of, int) and not isinstance(best_of, bool):
            choices = max(choices, best_of)
    return choices


def _prompts(endpoint: str, payload: Mapping[str, Any]) -> int:
    """How many prompts a completions request batches: a list of strings or of token
    lists is one prompt each; a list of token ids is a single prompt."""
    if endpoint != "completions":
        return 1
    prompt = payload.get("prompt")
    if not isinstance(prompt, list) or not prompt or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)
