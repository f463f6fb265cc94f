"""accept: turn an incoming request into an Exchange. The body is read and parsed once here."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import BodyTooLarge, InvalidRequest
from proxy.exchange import Endpoint, Exchange

_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_MODEL_OK = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
# Fields that cap output, per endpoint family; the first present wins.
_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
MODEL_ENDPOINTS: frozenset[str] = frozenset({"chat.completions", "completions", "embeddings", "responses"})


def request_id_of(request: web.Request, header: str) -> str:
    """Honour a sane incoming id (so callers can correlate); otherwise make one."""
    incoming = request.headers.get(header)
    if incoming is not None and _REQUEST_ID_OK.fullmatch(incoming):
        return incoming
    return "tg-" + os.urandom(12).hex()


def new_exchange(request: web.Request, endpoint: Endpoint, request_id_header: str) -> Exchange:
    return Exchange(
        request_id=request_id_of(request, request_id_header),
        endpoint=endpoint,
        method=request.method,
        path=request.path,
        t0_ns=time.perf_counter_ns(),
        traceparent=request.headers.get("traceparent"),
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"Request body of {length} bytes is over the limit of {limit} bytes.")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"Request body is over the limit of {limit} bytes.") from exc


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
    return payload


def _int_field(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected an integer, but got {type(value).__name__}.",
            param=name,
            code="invalid_type",
        )
    if value < 0:
        raise InvalidRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 0, but got {value}.",
            param=name,
            code="integer_below_min_value",
        )
    return value


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
    user = payload.get("user")
    if isinstance(user, str) and user:
        ex.user = user[:256]
