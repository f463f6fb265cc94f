"""Local token estimates of a request or a completion, for when the upstream reports none.

Pure apart from the tokenizer it asks `proxy.encodings` for. Any request shape it does not
understand is counted as its JSON text, so it never raises on request content.
"""

from __future__ import annotations

import json
from typing import Any

import tiktoken

from proxy.encodings import encoding_for

__all__ = [
    "IMAGE_PART_TOKENS",
    "REASONING_TOOL_PREAMBLE_TOKENS",
    "count_text_tokens",
    "estimate_output_tokens",
    "estimate_prompt_tokens",
]

# Chat framing from the OpenAI cookbook "How to count tokens with tiktoken":
# every message is wrapped as <|start|>{role/name}\n{content}<|end|>\n, and every reply is
# primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# An image (or any other non-text part: audio, file) cannot be sized from the request
# without fetching and decoding it, so each counts as OpenAI's documented cost of a
# 1024x1024 image at high detail on the gpt-4o family: 85 base + 4 tiles x 170 = 765.
# "detail": "low" is a fixed 85. This errs high, which is the safe side for a reservation.
IMAGE_PART_TOKENS = 765
IMAGE_PART_TOKENS_LOW = 85

# Function/tool definitions: the model sees them rendered into its system prompt; the
# counts below follow the cookbook's `num_tokens_for_tools` recipe (per-function and
# per-property framing around "name:description" and "prop:type:description" lines).
_FUNC_INIT = 7
_PROP_INIT = 3
_PROP_KEY = 3
_ENUM_INIT = -3
_ENUM_ITEM = 3
_FUNC_END = 12

# Reasoning models (gpt-5, o-series) also get a system message carrying the tool-calling
# channel instructions when a request has tools (OpenAI's harmony format). Its text from
# OpenAI's harmony guide ("You are ChatGPT ... Reasoning: medium ... # Valid channels ...
# Calls to these tools must go to the commentary channel: 'functions'.") is 71 o200k
# tokens, plus 4 for its framing. Checked against one real capture (gpt-5-nano, one tool:
# 162 real vs 154 estimated); for other models the cookbook recipe alone applies.
REASONING_TOOL_PREAMBLE_TOKENS = 75
_REASONING_MODEL_PREFIXES = ("gpt-5", "o1", "o3", "o4")



def count_text_tokens(text: str, model: str) -> int:
    # encode_ordinary: text that happens to contain "<|endoftext|>" is just text here.
    return len(encoding_for(model).encode_ordinary(text))


def estimate_output_tokens(text: str, model: str) -> int:
    """Tokens in the relayed completion text (used when the upstream reports no usage)."""
    return count_text_tokens(text, model) if isinstance(text, str) else 0


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any], model: str) -> int:
    """Estimated input tokens of a request body for `endpoint`.

    endpoint is one of "chat.completions", "completions", "embeddings", "responses".
    Chat follows the cookbook recipe (3 per message, 1 per name, 3 to prime the reply);
    tool definitions follow the cookbook's tool recipe (plus the reasoning models' tool
    preamble); images count IMAGE_PART_TOKENS.
    Any shape it does not understand is counted as its JSON text, so it never raises on
    request content (only on a broken tokenizer install).
    """
    count = _Counter(encoding_for(model), model)
    try:
        if not isinstance(body, dict):
            return count.json(body)
        if endpoint == "chat.completions":
            return count.chat(body)
        if endpoint in ("completions", "embeddings"):
            field = "prompt" if endpoint == "completions" else "input"
            return count.prompt_like(body.get(field))
        if endpoint == "responses":
            return count.responses(body)
        return count.json(body)
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError):
        return count.json(body)


class _Counter:
    def __init__(self, enc: tiktoken.Encoding, model: str) -> None:
        self.enc = enc
        self.tool_preamble = (
            REASONING_TOOL_PREAMBLE_TOKENS
            if isinstance(model, str) and model.startswith(_REASONING_MODEL_PREFIXES)
            else 0
        )

    def text(self, text: str) -> int:
        return len(self.enc.encode_ordinary(text))

    def json(self, value: object) -> int:
        try:
            rendered = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            rendered = str(value)
        return self.text(rendered)

    def value(self, value: object) -> int:
        """A message field's value: text as text, anything else as its JSON."""
        if value is None:
            return 0
        if isinstance(value, str):
            return self.text(value)
        return self.json(value)

    # ---- chat

    def chat(self, body: dict[str, Any]) -> int:
        messages = body.get("messages")
        total = 0
        if isinstance(messages, list):
            for message in messages:
                total += self.message(message)
        elif messages is not None:
            total += self.json(messages)
        total += REPLY_PRIMING_TOKENS
        total += self.tools(body.get("tools"), body.get("functions"))
        return total

    def message(self, message: object) -> int:
        if not isinstance(message, dict):
            return TOKENS_PER_MESSAGE + self.json(message)
        total = TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                total += self.content(value)
            elif key == "tool_calls" and isinstance(value, list):
                total += sum(self.tool_call(call) for call in value)
            elif key == "function_call" and isinstance(value, dict):
                total += self.function_call(value)
            else:
                total += self.value(value)
            if key == "name":
                total += TOKENS_PER_NAME
        return total

    def content(self, content: object) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.text(content)
        if isinstance(content, list):
            return sum(self.part(part) for part in content)
        return self.json(content)

    def part(self, part: object) -> int:
        """One content part (chat or Responses): text counts as text, media as a flat figure."""
        if isinstance(part, str):
            return self.text(part)
        if not isinstance(part, dict):
            return self.json(part)
        kind = part.get("type")
        for key in ("text", "refusal"):
            if isinstance(part.get(key), str):
                return self.text(part[key])
        if kind in ("image_url", "input_image"):
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else part.get("detail")
            return IMAGE_PART_TOKENS_LOW if detail == "low" else IMAGE_PART_TOKENS
        if kind in ("input_audio", "file", "input_file"):
            return IMAGE_PART_TOKENS
        return self.json(part)

    def function_call(self, call: dict[str, Any]) -> int:
        return self.value(call.get("name")) + self.value(call.get("arguments"))

    def tool_call(self, call: object) -> int:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            return self.function_call(call["function"])
        return self.json(call)

    # ---- tools (chat `tools`/`functions`, Responses `tools`)

    def tools(self, tools: object, functions: object = None) -> int:
        defs: list[object] = []
        for group in (tools, functions):
            if isinstance(group, list):
                defs.extend(group)
            elif group is not None:
                defs.append(group)
        if not defs:
            return 0
        return sum(self.tool_def(d) for d in defs) + _FUNC_END + self.tool_preamble

    def tool_def(self, tool: object) -> int:
        if not isinstance(tool, dict):
            return self.json(tool)
        # chat: {"type":"function","function":{...}}; legacy functions and Responses: flat.
        inner = tool.get("function")
        fn: dict[str, Any] = inner if isinstance(inner, dict) else tool
        name = fn.get("name")
        if not isinstance(name, str):
            # Built-in tools (web_search, file_search ...) have no schema to render.
            return self.json(tool)
        total = _FUNC_INIT + self.text(f"{name}:{_strip_period(fn.get('description'))}")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and props:
            total += _PROP_INIT
            for key, prop in props.items():
                total += _PROP_KEY
                if not isinstance(prop, dict):
                    total += self.text(str(key)) + self.json(prop)
                    continue
                enum = prop.get("enum")
                if isinstance(enum, list):
                    total += _ENUM_INIT
                    for item in enum:
                        total += _ENUM_ITEM + self.value(item)
                ptype = prop.get("type")
                ptype_text = ptype if isinstance(ptype, str) else json.dumps(ptype, default=str)
                line = f"{key}:{ptype_text}:{_strip_period(prop.get('description'))}"
                total += self.text(line)
                # Nested schemas (objects, arrays of objects) are rendered too; count them.
                for nested in ("properties", "items", "anyOf", "oneOf", "allOf"):
                    if nested in prop:
                        total += self.json(prop[nested])
        return max(total, 0)

    # ---- completions / embeddings

    def prompt_like(self, prompt: object) -> int:
        """str | list[str] | list[int] (one token array) | list[list[int]]."""
        if prompt is None:
            return 0
        if isinstance(prompt, str):
            return self.text(prompt)
        if isinstance(prompt, list):
            if all(_is_token_id(x) for x in prompt):
                return len(prompt)
            total = 0
            for item in prompt:
                if isinstance(item, str):
                    total += self.text(item)
                elif isinstance(item, list) and all(_is_token_id(x) for x in item):
                    total += len(item)
                else:
                    total += self.json(item)
            return total
        return self.json(prompt)

    # ---- responses

    def responses(self, body: dict[str, Any]) -> int:
        total = 0
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            total += TOKENS_PER_MESSAGE + 1 + self.text(instructions)  # a developer message
        items = body.get("input")
        if isinstance(items, str):
            total += TOKENS_PER_MESSAGE + 1 + self.text(items)  # one user message
        elif isinstance(items, list):
            total += sum(self.response_item(item) for item in items)
        elif items is not None:
            total += self.json(items)
        total += REPLY_PRIMING_TOKENS
        total += self.tools(body.get("tools"))
        return total

    def response_item(self, item: object) -> int:
        if not isinstance(item, dict):
            return TOKENS_PER_MESSAGE + self.value(item)
        kind = item.get("type")
        if kind in (None, "message") and "content" in item:
            return TOKENS_PER_MESSAGE + self.value(item.get("role")) + self.content(item["content"])
        if kind == "function_call":
            return TOKENS_PER_MESSAGE + self.function_call(item)
        if kind == "function_call_output":
            return TOKENS_PER_MESSAGE + self.value(item.get("output"))
        return TOKENS_PER_MESSAGE + self.json(item)


def _strip_period(value: object) -> str:
    text = value if isinstance(value, str) else ""
    return text[:-1] if text.endswith(".") else text


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
