"""Load the recorded upstream traffic in tests/fixtures as `Capture` values.

openai/*.yaml are go-vcr v2 cassettes (one interaction each); llamacpp/ holds raw `curl -D`
header files next to the raw body. Bodies are returned as the exact bytes the server sent:
YAML block scalars (`|`, `|-`, `|+`) and double-quoted scalars are decoded by PyYAML, and the
result is checked against the recorded content length in tests/unit/test_fake_upstream.py.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
OPENAI_DIR = FIXTURES / "openai"
OPENAI_EXTRA_DIR = FIXTURES / "openai-extra"  # images, audio, schema, suffix, search, Azure
LLAMACPP_DIR = FIXTURES / "llamacpp"


@dataclass(frozen=True)
class Capture:
    name: str
    method: str
    path: str
    request_body: bytes
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # go-vcr's `content_length` (-1 when unknown); for llama.cpp the Content-Length header or -1.
    content_length: int = -1
    request_content_length: int = -1

    @property
    def request_json(self) -> dict[str, Any]:
        loaded = json.loads(self.request_body)
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.name}: request body is not a JSON object")
        return loaded

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    @property
    def content_type(self) -> str:
        return self.header("Content-Type") or ""

    @property
    def is_stream(self) -> bool:
        return self.content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def _as_bytes(value: object) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"unexpected YAML body type {type(value).__name__}")


@functools.cache
def openai_capture(name: str, directory: Path = OPENAI_DIR) -> Capture:
    """The capture in tests/fixtures/openai/<name>.yaml, e.g. openai_capture("chat-streaming")
    (or in `directory`, e.g. OPENAI_EXTRA_DIR)."""
    path = directory / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    interactions = doc["interactions"]
    if len(interactions) != 1:
        raise ValueError(f"{path}: expected one interaction, found {len(interactions)}")
    req = interactions[0]["request"]
    resp = interactions[0]["response"]
    headers = tuple(
        (str(key), str(value))
        for key, values in (resp.get("headers") or {}).items()
        for value in values
    )
    return Capture(
        name=name,
        method=str(req["method"]).upper(),
        path=urlsplit(str(req["url"])).path,
        request_body=_as_bytes(req.get("body")),
        status=int(resp["code"]),
        headers=headers,
        body=_as_bytes(resp.get("body")),
        content_length=int(resp.get("content_length", -1)),
        request_content_length=int(req.get("content_length", -1)),
    )


def openai_capture_names() -> list[str]:
    return sorted(p.stem for p in OPENAI_DIR.glob("*.yaml"))


def openai_captures() -> list[Capture]:
    return [openai_capture(name) for name in openai_capture_names()]


_CHAT_STREAM: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Name three colors."}],
    "max_tokens": 8,
    "temperature": 0,
    "stream": True,
}
_COMPLETION: dict[str, Any] = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
# The README says the content was the phrase repeated 1200 times; the separator is not recorded.
_LONG_TEXT = " ".join(["apple banana cherry"] * 1200)


def _body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# Requests behind each llama.cpp fixture, transcribed from the table in llamacpp/README.md
# (curl sent the JSON shown there; key order follows the README).
_LLAMACPP_REQUESTS: dict[str, tuple[str, str, bytes]] = {
    "get_health": ("GET", "/health", b""),
    "get_health_loading": ("GET", "/health", b""),
    "get_v1_models": ("GET", "/v1/models", b""),
    "get_props": ("GET", "/props", b""),
    "get_slots": ("GET", "/slots", b""),
    "get_slots_busy": ("GET", "/slots", b""),
    "get_slots_after": ("GET", "/slots", b""),
    "get_metrics": ("GET", "/metrics", b""),
    "get_root": ("GET", "/", b""),
    "post_v1_chat_completions": (
        "POST",
        "/v1/chat/completions",
        _body(
            {
                "model": "gemma",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Name three colors."},
                ],
                "max_tokens": 32,
                "temperature": 0,
                "seed": 42,
            }
        ),
    ),
    "post_v1_chat_completions_stream": ("POST", "/v1/chat/completions", _body(_CHAT_STREAM)),
    "post_v1_chat_completions_stream_include_usage": (
        "POST",
        "/v1/chat/completions",
        _body({**_CHAT_STREAM, "stream_options": {"include_usage": True}}),
    ),
    "post_v1_chat_completions_stream_timings_per_token": (
        "POST",
        "/v1/chat/completions",
        _body({**_CHAT_STREAM, "max_tokens": 3, "timings_per_token": True}),
    ),
    "post_v1_completions": ("POST", "/v1/completions", _body(_COMPLETION)),
    "post_v1_completions_stream": ("POST", "/v1/completions", _body({**_COMPLETION, "stream": True})),
    "post_v1_completions_stream_include_usage": (
        "POST",
        "/v1/completions",
        _body({**_COMPLETION, "stream": True, "stream_options": {"include_usage": True}}),
    ),
    "post_v1_embeddings": (
        "POST",
        "/v1/embeddings",
        _body({"input": ["hello world", "goodbye"], "model": "x"}),
    ),
    "post_v1_chat_completions_on_embeddings_server": (
        "POST",
        "/v1/chat/completions",
        _body({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ),
    "err_embeddings_pooling_none": (
        "POST",
        "/v1/embeddings",
        _body({"input": ["hello world", "goodbye"], "model": "x"}),
    ),
    "err_embeddings_not_enabled": ("POST", "/v1/embeddings", _body({"input": "hello world"})),
    "err_exceed_context_chat": (
        "POST",
        "/v1/chat/completions",
        _body({"messages": [{"role": "user", "content": _LONG_TEXT}], "max_tokens": 8}),
    ),
    "err_exceed_context_chat_stream": (
        "POST",
        "/v1/chat/completions",
        _body({"messages": [{"role": "user", "content": _LONG_TEXT}], "max_tokens": 8, "stream": True}),
    ),
    "err_exceed_context_completions": (
        "POST",
        "/v1/completions",
        _body({"prompt": _LONG_TEXT, "max_tokens": 8}),
    ),
    "err_invalid_json": ("POST", "/v1/chat/completions", b'{"messages": [oops'),
    "err_missing_messages": ("POST", "/v1/chat/completions", _body({"max_tokens": 4})),
    "err_404": ("GET", "/v1/nonexistent", b""),
}

# Fixtures that share another fixture's headers file (the README captured only the body).
_LLAMACPP_HEADERS_FROM: dict[str, str] = {"get_slots_after": "get_slots"}


def _parse_curl_headers(raw: bytes) -> tuple[int, tuple[tuple[str, str], ...]]:
    text = raw.decode("latin-1")
    lines = [line for line in text.replace("\r\n", "\n").split("\n")]
    status_line = lines[0].split(" ", 2)
    status = int(status_line[1])
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            break
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    return status, tuple(headers)


def llamacpp_capture_names() -> list[str]:
    return sorted(_LLAMACPP_REQUESTS)


@functools.cache
def llamacpp_capture(name: str) -> Capture:
    """<name>.headers + the body file next to it (.json/.sse/.txt/.body)."""
    if name not in _LLAMACPP_REQUESTS:
        raise KeyError(f"unknown llama.cpp fixture {name!r}")
    bodies = [p for p in LLAMACPP_DIR.glob(f"{name}.*") if p.suffix in {".json", ".sse", ".txt", ".body"}]
    if len(bodies) != 1:
        raise FileNotFoundError(f"expected one body file for {name}, found {bodies}")
    headers_name = _LLAMACPP_HEADERS_FROM.get(name, name)
    status, headers = _parse_curl_headers((LLAMACPP_DIR / f"{headers_name}.headers").read_bytes())
    method, path, request_body = _LLAMACPP_REQUESTS[name]
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    return Capture(
        name=name,
        method=method,
        path=path,
        request_body=request_body,
        status=status,
        headers=headers,
        body=bodies[0].read_bytes(),
        # get_slots_after borrows get_slots' headers, so its length is not recorded.
        content_length=int(length) if length is not None and headers_name == name else -1,
    )
