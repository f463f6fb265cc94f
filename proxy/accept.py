"""accept: turn an incoming request into an Exchange and an `Accepted`: whether its target
may be forwarded, who sent it (virtual key, user), and its body, read and parsed once here."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import (
    BodyTooLarge,
    InvalidApiKey,
    InvalidRequest,
    NotFound,
    RequestTimeout,
    UnreadableBody,
    UnsupportedEncoding,
)
from proxy.exchange import Endpoint, Exchange
from proxy.keys import KeyRing, VirtualKey, parse_bearer, request_user
from proxy.paths import escapes_api_base
from proxy.policy import Policy

_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# C0 and C1 controls and DEL: a model name is echoed into messages, logs and span names.
_MODEL_OK = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,256}")
# Fields that cap output, per endpoint family; the first present wins.
_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# A whole request body must arrive within this many seconds. Without a deadline, a client
# that sends fewer bytes than its Content-Length promised (or trickles them) holds its
# handler and connection for as long as it likes: aiohttp has no body read timeout. A
# total, not an idle, deadline: a byte now and then cannot re-arm it. 120 s lets a
# body at the default 20 MB limit arrive at 1.4 Mbit/s.
BODY_READ_TIMEOUT_S = 120.0
# JSON nesting the proxy accepts. orjson parses up to 1024 levels, but everything after the
# parse has tighter limits: orjson.dumps stops at 255 (re-serialising a rewritten body), and
# recursive walks (the prompt estimate, payload logging) meet Python's recursion limit near
# 1000. OpenAI's own structured-output schemas nest at most 10 deep, so 128 refuses nothing
# real and keeps a body that parses from failing later as a 500.
MAX_JSON_DEPTH = 128
# The largest output cap accepted (int32 max, OpenAI's own bound for these fields). The cap
# is reserved against budgets as a token count; an int64-sized one would overflow the
# ledger's integer columns once the prompt estimate is added to it.
MAX_OUTPUT_CAP = 2**31 - 1
# How many choices the OpenAI API reference allows these endpoints to generate. Out of that
# range OpenAI itself answers 400, and every upstream here speaks that API: refused before a
# reservation or an upstream call is spent on it. Within it, each upstream applies its own
# rules (llama-server, for one, allows only n = 1).
_CHOICE_BOUNDS: dict[str, dict[str, tuple[int, int]]] = {
    "chat.completions": {"n": (1, 128)},
    "completions": {"n": (1, 128), "best_of": (0, 20)},
}
MODEL_ENDPOINTS: frozenset[str] = frozenset({"chat.completions", "completions", "embeddings", "responses"})


# Made ids: a random per-process prefix and a counter (48 bits each, 24 hex digits as
# before), unique without a getrandom call per request. A forked worker draws its own prefix.
_id_prefix = ""
_id_counter = itertools.count()


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix = "tg-" + os.urandom(6).hex()
    _id_counter = itertools.count()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)


def request_id_of(request: web.Request, header: str) -> str:
    """Honour a sane incoming id (so callers can correlate); otherwise make one."""
    incoming = request.headers.get(header)
    if incoming is not None and _REQUEST_ID_OK.fullmatch(incoming):
        return incoming
    return f"{_id_prefix}{next(_id_counter):012x}"


def new_exchange(request: web.Request, endpoint: Endpoint, request_id_header: str) -> Exchange:
    return Exchange(
        request_id=request_id_of(request, request_id_header),
        endpoint=endpoint,
        method=request.method,
        path=request.path,
        t0_ns=time.perf_counter_ns(),
        traceparent=request.headers.get("traceparent"),
        tracestate=request.headers.get("tracestate"),
        # x-tollgate-* headers are never forwarded upstream (proxy.forward).
        include_cost=request.headers.get("x-tollgate-include-cost", "").strip().lower() in ("true", "1", "yes"),
    )


# What aiohttp decodes as it reads a request body (br with brotli, zstd with backports.zstd,
# both dependencies). A body in any other encoding would be read, and forwarded, still
# encoded while its Content-Encoding header is not: refused instead.
DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})


async def read_body(request: web.Request, limit: int, timeout: float | None = None) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"Request body of {length} bytes is over the limit of {limit} bytes.")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in DECODED_ENCODINGS:
        raise UnsupportedEncoding(
            f"Content-Encoding '{encoding[:64]}' is not supported: send the body uncompressed, "
            "or compressed with gzip, deflate, br or zstd."
        )
    deadline = BODY_READ_TIMEOUT_S if timeout is None else timeout
    try:
        if request.content.is_eof():
            # The whole body is in already (the usual small body): nothing to wait for,
            # so no timer to arm and cancel.
            return await request.read()
        async with asyncio.timeout(deadline):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"Request body is over the limit of {limit} bytes.") from exc
    except web.RequestPayloadError:
        # A body that is not what its Content-Encoding says (or a broken chunked framing).
        raise UnreadableBody(
            f"The request body could not be read as sent (Content-Encoding: {encoding or 'none'})."
        ) from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body was not received within {deadline:g} seconds."
        ) from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest(
            "We could not parse the JSON body of your request: the body is empty. "
            "(HINT: send a JSON object with Content-Type: application/json.)"
        )
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}. "
            "(HINT: send a JSON object with Content-Type: application/json.)"
        ) from None
    if not isinstance(payload, dict):
        raise InvalidRequest(
            f"The JSON body of your request must be an object, not {type(payload).__name__}."
        )
    # Every level of nesting needs an opening bracket: a body with few cannot be deep, and
    # counting bytes is far cheaper than walking the parsed value.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_depth(payload) > MAX_JSON_DEPTH:
        raise InvalidRequest(
            f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep.",
            code="invalid_value",
        )
    return payload


def json_depth(value: object) -> int:
    """How deeply `value` nests arrays and objects (a scalar is 0). Iterative: a depth check
    that recursed would fail on exactly the input it exists to refuse."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth))
    return deepest


def _int_field(payload: dict[str, Any], name: str, low: int = 0, high: int = MAX_OUTPUT_CAP) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected an integer, but got {type(value).__name__}.",
            param=name,
            code="invalid_type",
        )
    if value < low:
        raise InvalidRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value}.",
            param=name,
            code="integer_below_min_value",
        )
    if value > high:
        raise InvalidRequest(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got {value}.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _check_choices(endpoint: str, payload: dict[str, Any]) -> None:
    values = {name: _int_field(payload, name, low, high) for name, (low, high) in _CHOICE_BOUNDS[endpoint].items()}
    n, best_of = values.get("n"), values.get("best_of")
    if n is not None and best_of is not None and best_of < n:
        raise InvalidRequest(
            f"Invalid 'best_of': must be at least 'n' ({n}), but got {best_of}.",
            param="best_of",
            code="invalid_value",
        )


def accept_body(ex: Exchange, payload: dict[str, Any]) -> None:
    """Fill the Exchange from a model endpoint's JSON body, rejecting what cannot be routed."""
    ex.body = payload
    model = payload.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise InvalidRequest(
            f"Invalid type for 'model': expected a string, but got {type(model).__name__}.",
            param="model",
            code="invalid_type",
        )
    if not _MODEL_OK.fullmatch(model):
        raise InvalidRequest(
            "Invalid 'model': must be 1 to 256 characters with no control characters.",
            param="model",
            code="invalid_value",
        )
    ex.requested_model = model
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(
            f"Invalid type for 'stream': expected a boolean, but got {type(stream).__name__}.",
            param="stream",
            code="invalid_type",
        )
    ex.stream = bool(stream)
    for name in _CAP_FIELDS:
        cap = _int_field(payload, name)
        if cap is not None and ex.output_cap is None:
            ex.output_cap = cap
    if ex.endpoint in _CHOICE_BOUNDS:
        _check_choices(ex.endpoint, payload)
    user = payload.get("user")
    if isinstance(user, str) and user:
        ex.user = user[:256]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A request that may go on: its body, its JSON object (model endpoints; None for a
    path passed through), and the virtual key it presented (None when keys are off)."""

    body: bytes
    payload: dict[str, Any] | None
    key: VirtualKey | None


async def accept(request: web.Request, ex: Exchange, policy: Policy, *, model: str | None = None) -> Accepted:
    """`model`: the model the path names (an Azure deployment), over the body's."""
    check_request_target(request)
    key = authenticate(request, ex, policy.keyring)
    body = await read_body(request, policy.settings.server.max_body_bytes)
    ex.t0_ns = time.perf_counter_ns()
    if ex.endpoint == "other":
        return Accepted(body, None, key)
    payload = parse_json_object(body)
    ex.body_sha256 = hashlib.sha256(body).hexdigest()  # a few KB: microseconds, once
    accept_body(ex, payload if model is None else {**payload, "model": model})
    ex.azure_deployment = model is not None
    header = policy.settings.user_header
    ex.user = request_user(ex.user, request.headers.get(header) if header else None)
    return Accepted(body, payload, key)


def check_request_target(request: web.Request) -> None:
    """The upstream URL is the configured API base plus the client's raw path, so only a
    plain path that stays under the base may be forwarded. An absolute-form target
    (`POST http://host/v1/...`) has a raw path that is a URL: appended to the base it would
    give a mangled path, and with dot segments one outside the base."""
    raw = request.raw_path
    if not raw.startswith("/"):
        raise InvalidRequest(
            "The request target must be a path such as /v1/chat/completions, not an absolute URL."
        )
    if escapes_api_base(raw):
        raise NotFound(f"Invalid URL ({request.method} {request.path})")


def authenticate(request: web.Request, ex: Exchange, keyring: KeyRing) -> VirtualKey | None:
    """With virtual keys on, every request must carry a known one (constant-time compare)."""
    if not keyring.enabled:
        return None
    # Azure OpenAI clients send their key as `api-key`, not as a bearer token.
    presented = parse_bearer(request.headers.get("Authorization")) or (request.headers.get("api-key") or "").strip() or None
    key = keyring.authenticate(presented)
    if key is None:
        # Like OpenAI, never echo the key itself back.
        raise InvalidApiKey(
            "Incorrect API key provided. Use a Tollgate virtual key as the bearer token."
            if presented
            else "You didn't provide an API key. Send a Tollgate virtual key as 'Authorization: Bearer <key>'."
        )
    ex.key_name = key.name
    ex.key_metadata = key.metadata or None
    ex.include_cost = ex.include_cost or key.include_cost
    return key
