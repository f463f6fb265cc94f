"""Every error Tollgate raises, and the one place they become OpenAI-shaped bodies.

    TollgateError
    ├── ConfigError                 bad YAML or values; names the key path and the bad value
    ├── ClientError                 the request is at fault: 4xx, nothing sent upstream
    │   ├── InvalidRequest          400 invalid_request_error
    │   │   └── UnreadableBody      400 (the body is not what its Content-Encoding says)
    │   ├── InvalidApiKey           401 invalid_api_key
    │   ├── PermissionDenied        403 (a key used outside what it allows)
    │   ├── NotFound                404 (unknown path)
    │   ├── ModelNotFound           404 model_not_found
    │   ├── MethodNotAllowed        405
    │   ├── RequestTimeout          408 (the client did not send its whole body in time)
    │   ├── BodyTooLarge            413
    │   ├── UnsupportedEncoding     415 (a Content-Encoding the proxy cannot decode)
    │   ├── BudgetExceeded          429 budget_exceeded (+ retry-after)
    │   └── RateLimited             429 rate_limit_exceeded, code names the limit's kind (+ retry-after)
    └── UpstreamError               the upstream is at fault: 5xx made by the proxy
        ├── UpstreamUnreachable     502 (connect refused, DNS, reset before headers)
        ├── UpstreamBroken          502 (reset or garbage after headers)
        └── UpstreamTimeout         504 (connect, first byte, idle between chunks)
    LedgerUnavailable               503 ledger_unavailable (budgets apply, ledger down, fail_closed)

Lower-layer exceptions (aiohttp, asyncio, OSError) are translated into this tree only by
`translate_upstream_exception`, which forward.py calls; nothing else catches them.
Errors the upstream itself returns (an HTTP 4xx/5xx with a body) are not exceptions: they
are relayed unchanged.

What a client reads is stable wording that names no host, port or library: the lower
layer's own text (which can name an internal upstream's address) is the error's `detail`,
kept for the operator's log and trace. A 5xx the proxy makes carries the request id in
its message, also in-stream, where the response headers are long gone.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import aiohttp
import orjson
from aiohttp import web, web_protocol


class TollgateError(Exception):
    """Base of everything Tollgate raises on purpose."""


class ConfigError(TollgateError):
    """The configuration cannot be used. `problems` holds one line per bad key."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid configuration in {self.source}:\n{lines}"


class HttpError(TollgateError):
    """An error the proxy answers itself, in the OpenAI error shape."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # The request's body was not read to its end: the connection cannot carry another
    # request, so the answer closes it.
    close_connection: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}

    def client_message(self, request_id: str | None = None) -> str:
        if request_id is not None and self.status >= 500:
            return f"{self.message} (request id: {request_id})"
        return self.message

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        return {
            "error": {
                "message": self.client_message(request_id),
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self, request_id: str | None = None) -> bytes:
        return orjson.dumps(self.body(request_id))

    def to_sse(self, request_id: str | None = None) -> bytes:
        """The in-stream form: what the OpenAI SDK raises on once a stream has started."""
        return b"data: " + self.to_json(request_id) + b"\n\n"

    @property
    def kind(self) -> str:
        """A short, bounded name for metrics and logs (`error.type`)."""
        return self.code or self.type


class ClientError(HttpError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    status = 400
    type = "invalid_request_error"


class UnreadableBody(InvalidRequest):
    code = "invalid_body"
    close_connection = True


class InvalidApiKey(ClientError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ClientError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ClientError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(ClientError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ClientError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    close_connection = True


class BodyTooLarge(ClientError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    close_connection = True


class UnsupportedEncoding(ClientError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"
    close_connection = True


class BudgetExceeded(ClientError):
    status = 429
    type = "budget_exceeded"
    code = "budget_exceeded"


class RateLimited(ClientError):
    """A Tollgate rate or concurrency limit: `code` is requests_per_minute_exceeded,
    tokens_per_minute_exceeded or max_in_flight_exceeded."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class UpstreamError(HttpError):
    status = 502
    type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    status = 502
    code = "upstream_unreachable"


class UpstreamBroken(UpstreamError):
    status = 502
    code = "upstream_broken"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class LedgerUnavailable(HttpError):
    """503: budgets apply but the ledger cannot be reached, and the config says fail_closed.

    503 rather than 429: nothing is wrong with the client's spending, and 429 would read as
    `budget_exceeded` or a rate limit to clients and dashboards; a 5xx with retry-after is
    what SDKs retry, and it is counted as the proxy's failure, which it is."""

    status = 503
    type = "server_error"
    code = "ledger_unavailable"


def translate_upstream_exception(exc: BaseException, upstream: str, phase: str) -> UpstreamError:
    """Map an aiohttp/asyncio/OS exception met while talking to `upstream` into our tree.

    `phase` is "connect", "headers" or "body": where in the exchange it happened, which
    decides between unreachable (nothing received yet) and broken (the response started).
    """
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        what = {
            "connect": "connecting to",
            "headers": "waiting for the first byte from",
            "body": "waiting for the next chunk from",
        }.get(phase, "talking to")
        return UpstreamTimeout(f"Timed out {what} upstream '{upstream}'.")
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if phase == "body" or isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamBroken(f"Upstream '{upstream}' broke off the response.", detail=detail)
    return UpstreamUnreachable(f"Upstream '{upstream}' could not be reached.", detail=detail)


# --- requests aiohttp refuses before any handler runs ---------------------------------------------

_aiohttp_handle_error = web_protocol.RequestHandler.handle_error


def _openai_shaped_protocol_error(
    self: web_protocol.RequestHandler,
    request: Any,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    # aiohttp's own answer first: it logs, and it refuses (raises) once a response started.
    plain = _aiohttp_handle_error(self, request, status, exc, message)
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    err = (
        InvalidRequest(f"The request could not be read as HTTP/1.1 ({status} {phrase}).", code="malformed_request")
        if 400 <= status < 500
        else HttpError("The proxy failed to handle the request.", code="internal_error")
    )
    resp = web.Response(status=plain.status, body=err.to_json(), content_type="application/json")
    resp.force_close()
    return resp


def install_openai_shaped_protocol_errors() -> None:
    """Make the answers aiohttp's HTTP parser gives (a malformed request line, a bad header,
    an unknown method: plain text by default) OpenAI-shaped like every other error.

    aiohttp offers no hook for these: they are made by its RequestHandler before any
    application code or middleware runs, so its `handle_error` is wrapped, once per process.
    """
    web_protocol.RequestHandler.handle_error = _openai_shaped_protocol_error  # type: ignore[method-assign]
