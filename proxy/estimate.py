"""Local token estimates of a request or a completion, for when the upstream reports none.

Pure apart from the tokenizer it asks `proxy.encodings` for. Any request shape it does not
understand is counted as its JSON text, so it never raises on request content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import tiktoken

from proxy import images
from proxy.encodings import encoding_for

__all__ = [
    "IMAGE_PART_TOKENS",
    "PromptEstimate",
    "estimate_prompt",
    "is_reasoning_model",
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

# Images are sized from their data-URL header and billed by the model's formula
# (proxy.images). A file part cannot be sized without parsing the document, so it counts
# as OpenAI's documented cost of a 1024x1024 image at high detail on the gpt-4o family.
IMAGE_PART_TOKENS = 765

# Input audio is billed at about 10 tokens a second (one per 100 ms); a real capture
# (gpt-4o-audio-preview, 0.13 s of WAV: 1 audio token) reports 4 more text tokens than its
# text alone, the audio part's own wrapping.
AUDIO_TOKENS_PER_SECOND = 10
AUDIO_PART_FRAMING_TOKENS = 4

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
# tokens, plus 4 for its framing, plus the "# Tools\n\n## functions\n\nnamespace
# functions {...}" wrapper around the definitions, 8 more. Three real gpt-5-nano captures
# with different tools (chat-tools, chat-parallel-tools, chat-text-to-image-tool) are each
# exact with 83; for other models the cookbook recipe alone applies.
REASONING_TOOL_PREAMBLE_TOKENS = 83
_REASONING_MODEL_PREFIXES = ("gpt-5", "o1", "o3", "o4", "codex-mini")

# A `response_format` JSON schema is rendered into the developer message as harmony does:
# "# Response Formats\n\n## {name}\n\n// {description}\n{schema as compact JSON}", the
# schema without its `title` annotations; joining it to the instructions (or opening a
# developer message for it) costs 4 tokens more. Measured on a real gpt-5-nano capture
# (chat-openai-agents-python: 171 real, exact).
RESPONSE_FORMAT_FRAMING_TOKENS = 4


def is_reasoning_model(model: str) -> bool:
    """Whether `model` thinks in hidden reasoning tokens before it answers (so the output
    it shows is less than the output it bills)."""
    return (
        isinstance(model, str)
        and model.startswith(_REASONING_MODEL_PREFIXES)
        and not model.startswith("gpt-5-chat")
    )


def _search_model(model: str) -> bool:
    # The chat search models (gpt-4o-search-preview, gpt-4o-mini-search-preview) report the
    # message text alone as prompt_tokens: no per-message framing, no reply priming (a real
    # capture, chat-web-search: 26 real = the user text's 26 tokens).
    return isinstance(model, str) and "search-preview" in model



def count_text_tokens(text: str, model: str) -> int:
    # encode_ordinary: text that happens to contain "<|endoftext|>" is just text here.
    return len(encoding_for(model).encode_ordinary(text))


def estimate_output_tokens(text: str, model: str) -> int:
    """Tokens in the relayed completion text (used when the upstream reports no usage)."""
    return count_text_tokens(text, model) if isinstance(text, str) else 0


@dataclass(frozen=True, slots=True)
class PromptEstimate:
    """An estimated prompt: its tokens, and whether an image's size had to be assumed (a
    remote URL, counted as the largest image the model bills: an upper bound)."""

    tokens: int
    image_size_assumed: bool = False


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any], model: str) -> int:
    """Estimated input tokens of a request body for `endpoint` (see `estimate_prompt`)."""
    return estimate_prompt(endpoint, body, model).tokens


def estimate_prompt_bound(endpoint: str, body: dict[str, Any], model: str) -> int:
    """An upper bound of `estimate_prompt_tokens` that needs no tokenizer: every text is
    counted as its UTF-8 bytes (a BPE token is never shorter than one byte); framing,
    images and audio are counted as there."""
    return _estimate(endpoint, body, _ByteCounter(model)).tokens


def estimate_prompt(endpoint: str, body: dict[str, Any], model: str) -> PromptEstimate:
    """Estimated input tokens of a request body for `endpoint`.

    endpoint is one of "chat.completions", "completions", "embeddings", "responses".
    Chat follows the cookbook recipe (3 per message, 1 per name, 3 to prime the reply);
    tool definitions follow the cookbook's tool recipe (plus the reasoning models' tool
    preamble); a `response_format` schema, a completions `suffix`, images (by size and
    detail, proxy.images) and input audio (by duration) count as OpenAI bills them.
    Any shape it does not understand is counted as its JSON text, so it never raises on
    request content (only on a broken tokenizer install).
    """
    return _estimate(endpoint, body, _Counter(encoding_for(model), model))


def _estimate(endpoint: str, body: dict[str, Any], count: _Counter) -> PromptEstimate:
    try:
        if not isinstance(body, dict):
            tokens = count.json(body)
        elif endpoint == "chat.completions":
            tokens = count.chat(body)
        elif endpoint == "completions":
            # The suffix is sent to the model too (insertion): its text counts as the prompt's.
            tokens = count.prompt_like(body.get("prompt")) + count.prompt_like(body.get("suffix"))
        elif endpoint == "embeddings":
            tokens = count.prompt_like(body.get("input"))
        elif endpoint == "responses":
            tokens = count.responses(body)
        else:
            tokens = count.json(body)
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError):
        count.assumed = False
        tokens = count.json(body)
    return PromptEstimate(tokens, count.assumed)


class _Counter:
    def __init__(self, enc: tiktoken.Encoding | None, model: str) -> None:
        self.enc = enc
        self.model = model if isinstance(model, str) else ""
        self.assumed = False
        self.tool_preamble = (
            REASONING_TOOL_PREAMBLE_TOKENS
            if isinstance(model, str) and model.startswith(_REASONING_MODEL_PREFIXES)
            else 0
        )

    def text(self, text: str) -> int:
        assert self.enc is not None
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
        if _search_model(self.model) and isinstance(messages, list):
            return sum(
                self.content(m.get("content")) if isinstance(m, dict) else self.json(m) for m in messages
            )
        total = 0
        if isinstance(messages, list):
            for message in messages:
                total += self.message(message)
        elif messages is not None:
            total += self.json(messages)
        total += REPLY_PRIMING_TOKENS
        total += self.tools(body.get("tools"), body.get("functions"))
        total += self.response_format(body.get("response_format"))
        return total

    def response_format(self, fmt: object) -> int:
        """A chat `response_format` (or Responses `text.format`) JSON schema."""
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return 0
        spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else fmt
        assert isinstance(spec, dict)
        name = spec.get("name") if isinstance(spec.get("name"), str) else "response"
        text = f"# Response Formats\n\n## {name}\n\n"
        if isinstance(spec.get("description"), str):
            text += f"// {spec['description']}\n"
        schema = _without_titles(spec.get("schema", {}))
        text += json.dumps(schema, ensure_ascii=False, separators=(",", ":"), default=str)
        return self.text(text) + RESPONSE_FORMAT_FRAMING_TOKENS

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
            # chat: {"image_url": {"url", "detail"}}; Responses: {"image_url": "...", "detail"}.
            image = part.get("image_url")
            if isinstance(image, dict):
                url, detail = image.get("url"), image.get("detail")
            else:
                url, detail = image, part.get("detail")
            tokens, assumed = images.image_tokens(self.model, url, detail)
            self.assumed = self.assumed or assumed
            return tokens
        if kind == "input_audio":
            audio = part.get("input_audio")
            seconds = images.audio_seconds(audio.get("data"), audio.get("format")) if isinstance(audio, dict) else None
            if seconds is None:
                return IMAGE_PART_TOKENS
            return max(1, round(seconds * AUDIO_TOKENS_PER_SECOND)) + AUDIO_PART_FRAMING_TOKENS
        if kind in ("file", "input_file"):
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
        text = body.get("text")
        if isinstance(text, dict):
            total += self.response_format(text.get("format"))
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


def _without_titles(schema: object, names: bool = False) -> object:
    """The schema without `title` annotations (harmony leaves them out). Under
    `properties`/`$defs`/`definitions` keys are names, so a property called "title" stays."""
    if isinstance(schema, dict):
        out: dict[str, object] = {}
        for key, value in schema.items():
            if key == "title" and not names and isinstance(value, str):
                continue
            out[key] = _without_titles(value, names=key in ("properties", "$defs", "definitions") and not names)
        return out
    if isinstance(schema, list):
        return [_without_titles(v) for v in schema]
    return schema


def _strip_period(value: object) -> str:
    text = value if isinstance(value, str) else ""
    return text[:-1] if text.endswith(".") else text


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _ByteCounter(_Counter):
    """Counts a text as its UTF-8 bytes: at least its token count in any BPE encoding."""

    def __init__(self, model: str) -> None:
        super().__init__(None, model)

    def text(self, text: str) -> int:
        return len(text.encode("utf-8", "surrogatepass"))
