"""What counts as output in a stream event, per channel, and the response metadata read on
the way (id, model, finish reasons). Pure: the stream tap and the body measure call it.

An output chunk carries non-empty content, refusal, reasoning text (`reasoning_content`,
`reasoning`), completions `text`, a tool call from its first chunk (id and name, even with
`arguments: ""`) on, a legacy `function_call`, or audio (data or transcript); for the
Responses API a non-empty `*.delta` event or the `response.output_item.added` of a tool call
item. The role-only chunk is not output.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from proxy.exchange import Exchange

log = logging.getLogger("tollgate.measure")


class TextSink(Protocol):
    """Where output text goes: the Exchange's bounded OutputText, or a plain list."""

    def append(self, text: str, /) -> None: ...


# What a stream event carried, as bit flags; 0 is nothing (a role-only chunk, an empty
# delta, metadata). Any of them makes the event's chunk an output chunk (TTFT, gaps, TPOT).
VISIBLE = 1  # content, refusal, a tool call or function call, audio: what the user sees
REASONING = 2  # reasoning text itself (chat reasoning_content / reasoning, Responses reasoning_text)
SUMMARY = 4  # a Responses reasoning summary: output, but the reasoning tokens stay hidden


def text_of_chat_delta(delta: dict[str, Any], parts: TextSink) -> int:
    """Collect the output text a chat delta (or message) carries; the flags of what it carries.

    A tool call counts from its first chunk, the one with its id and name and `arguments: ""`:
    the model has produced those tokens, though no argument text has come yet. Audio counts
    when it carries data or a transcript. What goes to `parts` (the local output estimate)
    is as before: content, refusal, reasoning and call argument text.
    """
    carries = 0
    for field in ("content", "refusal"):
        value = delta.get(field)
        if isinstance(value, str) and value:
            parts.append(value)
            carries |= VISIBLE
    for field in ("reasoning_content", "reasoning"):
        value = delta.get(field)
        if isinstance(value, str) and value:
            parts.append(value)
            carries |= REASONING
    tool_calls = delta.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if not isinstance(call, dict):
                continue
            if call.get("id"):
                carries |= VISIBLE
            for kind, text_key in (("function", "arguments"), ("custom", "input")):
                fn = call.get(kind)
                if isinstance(fn, dict):
                    if fn.get("name"):
                        carries |= VISIBLE
                    args = fn.get(text_key)
                    if isinstance(args, str) and args:
                        parts.append(args)
                        carries |= VISIBLE
    fn_call = delta.get("function_call")
    if isinstance(fn_call, dict):
        if fn_call.get("name"):
            carries |= VISIBLE
        args = fn_call.get("arguments")
        if isinstance(args, str) and args:
            parts.append(args)
            carries |= VISIBLE
    audio = delta.get("audio")
    if isinstance(audio, dict) and (audio.get("data") or audio.get("transcript")):
        carries |= VISIBLE
    return carries


def _responses_delta_kind(kind: str) -> int:
    if "reasoning_summary" in kind:
        return SUMMARY
    if "reasoning" in kind:
        return REASONING
    return VISIBLE


def output_of_payload(endpoint: str, event_name: str | None, payload: dict[str, Any], parts: TextSink) -> int:
    """Append the output text of one stream event to `parts`; the flags of the output it
    carries (0: none).

    The role-only first chat chunk (`{"role": "assistant", "content": ""}`) carries none.
    Responses: every non-empty `*.delta` event (text, refusal, function-call arguments, audio
    and its transcript, reasoning text and summaries), and `response.output_item.added` for
    a tool call item (`function_call`, `custom_tool_call`, hosted `*_call`s), the
    counterpart of chat's first tool-call chunk.
    """
    if endpoint == "responses":
        kind = payload.get("type") or event_name or ""
        if not isinstance(kind, str):
            return 0
        if kind.endswith(".delta"):
            delta = payload.get("delta")
            if isinstance(delta, str):
                if delta:
                    parts.append(delta)
                    return _responses_delta_kind(kind)
                return 0
            return 0 if delta is None else _responses_delta_kind(kind)
        if kind == "response.output_item.added":
            item = payload.get("item")
            if isinstance(item, dict):
                item_type = item.get("type")
                if isinstance(item_type, str) and item_type.endswith("_call"):
                    return VISIBLE
        return 0
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return 0
    carries = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            carries |= text_of_chat_delta(delta, parts)
        text = choice.get("text")
        if isinstance(text, str) and text:
            parts.append(text)
            carries |= VISIBLE
    return carries


def note_response_identity(ex: Exchange, response: dict[str, Any]) -> None:
    """The model that answered and the response id, from a body, a chunk or a Responses event."""
    model = response.get("model")
    if isinstance(model, str):
        ex.response_model = model
    rid = response.get("id")
    if isinstance(rid, str):
        ex.response_id = rid


def note_finish_reason(ex: Exchange, choice: dict[str, Any]) -> None:
    reason = choice.get("finish_reason")
    if isinstance(reason, str):
        ex.finish_reasons.append(reason)
