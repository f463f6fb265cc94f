"""The HTTP handlers: each walks a request down accept → route → admit → forward → relay → finish."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import orjson
from aiohttp import web

from proxy.accept import accept_body, new_exchange, parse_json_object, read_body
from proxy.admit import authenticate, check_model_allowed, identify_user, reserve
from proxy.errors import (
    ClientError,
    HttpError,
    InvalidApiKey,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    UpstreamUnreachable,
)
from proxy.budgets import buckets_for
from proxy.keys import parse_bearer
from proxy.encodings import encoding_ready
from proxy.exchange import Endpoint, Exchange
from proxy.finish import complete, finish, started
from proxy.forward import relay, send, upstream_headers
from proxy.route import outgoing_body, route_exchange
from proxy.state import RUNTIME, Runtime

log = logging.getLogger("tollgate.handlers")

MODEL_PATHS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}


def error_response(err: HttpError, ex: Exchange | None = None) -> web.Response:
    headers = dict(err.headers)
    request_id = None if ex is None else ex.request_id
    if request_id is not None:
        # Tollgate's own answer: no upstream id to pass on, so both headers carry Tollgate's.
        headers["X-Request-Id"] = request_id
        headers["X-Tollgate-Request-Id"] = request_id
    resp = web.Response(
        status=err.status, body=err.to_json(request_id), content_type="application/json", headers=headers
    )
    if err.close_connection:
        resp.force_close()
    return resp


def _refused(ex: Exchange, err: HttpError) -> web.Response:
    ex.status = err.status
    ex.outcome = "rejected" if isinstance(err, ClientError) else "proxy_error"
    ex.error_type = err.kind
    ex.error_message = err.message
    ex.error_detail = err.detail
    return error_response(err, ex)


async def _forward_and_relay(
    request: web.Request, rt: Runtime, ex: Exchange, body: bytes | None, upstream_path: str | None = None
) -> web.StreamResponse:
    upstream = rt.upstreams.get(ex.upstream or "")
    if upstream is None:
        # A SIGHUP reload removed this upstream between routing and forwarding.
        raise UpstreamUnreachable(f"Upstream '{ex.upstream}' is no longer configured.")
    started(ex, rt)
    # With virtual keys on, the client's Authorization is a Tollgate key: never forwarded.
    headers = upstream_headers(request.headers, upstream, ex, drop_client_auth=rt.keyring.enabled)
    # The proxy serves /v1/...; the upstream's API base already ends where /v1 does. Built
    # from the parsed target, so an absolute-form request line cannot smuggle in a host.
    path_qs = request.rel_url.raw_path_qs[3:] if upstream_path is None else upstream_path
    resp = await send(upstream, request.method, path_qs, headers, body, ex)
    return await relay(
        request, resp, upstream, ex, rt.observers.on_first_token, lambda: complete(ex, rt)
    )


async def _run(
    request: web.Request, endpoint: Endpoint, upstream_path: str | None = None, azure: AzureTarget | None = None
) -> web.StreamResponse:
    """`upstream_path`: the path (after /v1) and query to send upstream, when not the
    client's own (a model endpoint under another spelling goes out under its own).
    `azure`: the request came in Azure OpenAI's layout (/openai/...); its upstream path is
    chosen once the route names the upstream."""
    rt = request.app[RUNTIME]
    settings = rt.settings
    ex = new_exchange(request, endpoint, settings.server.request_id_header)
    try:
        check_request_target(request)
        authenticate(request, ex, rt)
        body = await read_body(request, settings.server.max_body_bytes)
        ex.t0_ns = time.perf_counter_ns()
        if endpoint == "other":
            if settings.default_upstream is None:
                raise NotFound(f"Invalid URL ({request.method} {request.path})")
            ex.upstream = settings.default_upstream
            ex.upstream_kind = settings.upstreams[ex.upstream].kind
            check_unmetered(request, ex, rt, body)
            return await _forward_and_relay(request, rt, ex, body or None)
        payload = parse_json_object(body)
        if azure is not None and azure.deployment is not None:
            # The deployment names the model; Azure ignores (and clients often omit) the
            # body's `model`.
            accept_body(ex, {**payload, "model": azure.deployment})
            ex.extra["azure_deployment"] = True
        else:
            accept_body(ex, payload)
        identify_user(request, ex, rt)
        route_exchange(ex, settings)
        check_model_allowed(ex, rt)
        # Admission and a usage-less finish estimate with the model's own tokenizer, never
        # a stand-in while it is still being built.
        await encoding_ready(ex.upstream_model or ex.requested_model or "")
        ex.extra["response_headers"] = await reserve(ex, rt, payload)
        inject = settings.upstreams[ex.upstream].inject_stream_usage  # type: ignore[index]  # this request's snapshot
        if azure is not None:
            upstream_path, payload = azure.upstream_request(ex, settings.upstreams[ex.upstream].kind, payload)  # type: ignore[index]
        out_body = outgoing_body(ex, body, payload, inject, ex.extra.get("cap_override"))
        return await _forward_and_relay(request, rt, ex, out_body, upstream_path)
    except HttpError as err:
        return _refused(ex, err)
    except asyncio.CancelledError:
        ex.outcome = ex.outcome or "client_gone"
        raise
    except Exception:
        log.exception("unexpected error handling %s", ex.request_id)
        ex.error_type = "internal_error"
        return _refused(ex, HttpError("The proxy failed to handle the request.", code="internal_error"))
    finally:
        finish(ex, rt)


def model_endpoint(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _run(request, endpoint)

    handler.__name__ = endpoint.replace(".", "_")
    return handler


def escapes_api_base(raw_path: str) -> bool:
    """Whether a path could leave the upstream's API base once the upstream URL is built.

    The upstream URL is the configured base plus the client's path, and URL normalisation
    resolves dot segments: `/v1/../props` would reach `<root>/props` on the upstream host,
    with the upstream's credentials attached. Percent-encoding is undone until it is stable
    (`%2e%2e`, `..%2f`, double encoding), since the upstream, or anything in front of it,
    may decode again.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    if "\\" in path or "\x00" in path:
        return True
    return any(segment in (".", "..") for segment in path.split("/"))


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


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other /v1/* path: a model endpoint under another spelling is metered as that
    endpoint; anything else goes to the default upstream untouched, if it may go unmetered."""
    endpoint = metered_endpoint(request.raw_path)
    if endpoint is not None:
        if request.method != "POST":
            return error_response(
                MethodNotAllowed(f"Method {request.method} is not allowed for {request.path}; use POST.")
            )
        query = request.rel_url.raw_query_string
        return await _run(request, endpoint, _CANONICAL[endpoint] + (f"?{query}" if query else ""))
    return await _run(request, "other")


# The path after /v1 each model endpoint is sent upstream under.
_CANONICAL: dict[Endpoint, str] = {endpoint: path[3:] for path, endpoint in MODEL_PATHS.items()}


def metered_endpoint(raw_path: str) -> Endpoint | None:
    """The model endpoint a path names under any spelling an upstream might accept: any
    case, repeated or trailing slashes, `.` segments, `;parameters`, percent-encoding.
    Such a request is metered (and budgeted) as that endpoint, never passed through."""
    path = raw_path.split("?", 1)[0]
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    segments = [seg.split(";", 1)[0].lower() for seg in path.split("/")]
    canonical = "/" + "/".join(seg for seg in segments if seg not in ("", "."))
    return MODEL_PATHS.get(canonical)


def check_unmetered(request: web.Request, ex: Exchange, rt: Runtime, body: bytes) -> None:
    """A path Tollgate cannot meter goes through only where nothing it guards applies, or
    where the config lets that path through unmetered by name. A body that names a model
    is held to the key's model allow-list all the same."""
    settings = rt.settings
    allowed_by = settings.passthrough.allows(request.path)
    if allowed_by is None:
        header = settings.user_header
        user = request.headers.get(header) if header else None
        guarded = rt.keyring.enabled or bool(buckets_for(settings.budgets, ex.key_name, user, "", rt.clock()))
        if guarded:
            raise PermissionDenied(
                f"{request.method} {request.path} cannot be metered, and keys or budgets apply to it here, "
                "so it was not forwarded. An operator can let it through unmetered with "
                "passthrough.allow_unmetered.",
                code="unmetered_path",
            )
    if body and request.content_type == "application/json":
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("model"), str):
            ex.requested_model = payload["model"]
            check_model_allowed(ex, rt)
    ex.extra["unmetered"] = allowed_by or "unguarded"


@dataclass(frozen=True, slots=True)
class AzureTarget:
    """A request in Azure OpenAI's path layout: /openai/deployments/{deployment}/{tail} or
    /openai/v1/{tail}, with the client's query (api-version)."""

    deployment: str | None  # None: the v1 layout, where the body names the model
    tail: str  # "chat/completions", "completions", "embeddings", "responses"
    query: str

    def upstream_request(self, ex: Exchange, kind: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The path (after the upstream's API base) and body for the routed upstream."""
        if kind == "azure":
            query = f"?{self.query}" if self.query else ""
            if self.deployment is None:
                return f"/v1/{self.tail}{query}", payload
            # An alias route sends the request to the deployment it names.
            deployment = ex.upstream_model or self.deployment
            return f"/deployments/{quote(deployment, safe='')}/{self.tail}{query}", payload
        # An OpenAI-layout upstream: its own path, the model in the body, no api-version.
        if "model" not in payload:
            payload = {**payload, "model": ex.upstream_model or ex.requested_model}
        return "/" + self.tail, payload


# The model endpoints an Azure deployment serves, as the tail after /deployments/{name}/.
_AZURE_DEPLOYMENT_ENDPOINTS: dict[str, Endpoint] = {
    "chat/completions": "chat.completions",
    "completions": "completions",
    "embeddings": "embeddings",
}


async def azure_deployment(request: web.Request) -> web.StreamResponse:
    """POST /openai/deployments/{deployment}/{chat/completions|completions|embeddings}."""
    deployment = request.match_info["deployment"]
    tail = request.match_info["tail"].strip("/").lower()
    endpoint = _AZURE_DEPLOYMENT_ENDPOINTS.get(tail)
    return await _azure(request, endpoint, AzureTarget(deployment, tail, request.rel_url.raw_query_string))


async def azure_v1(request: web.Request) -> web.StreamResponse:
    """POST /openai/v1/{chat/completions|completions|embeddings|responses}: Azure's v1 API,
    OpenAI's layout under /openai."""
    tail = request.match_info["tail"].strip("/").lower()
    endpoint = MODEL_PATHS.get(f"/v1/{tail}")
    return await _azure(request, endpoint, AzureTarget(None, tail, request.rel_url.raw_query_string))


async def _azure(request: web.Request, endpoint: Endpoint | None, target: AzureTarget) -> web.StreamResponse:
    if endpoint is None:
        # Tollgate meters Azure's model endpoints only; anything else would go unmetered
        # to an upstream it cannot name from the path.
        return error_response(NotFound(
            f"Invalid URL ({request.method} {request.path}): Tollgate serves Azure OpenAI's "
            "chat/completions, completions and embeddings under /openai/deployments/{deployment}/, "
            "and those plus responses under /openai/v1/."
        ))
    if request.method != "POST":
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed for {request.path}; use POST."))
    if target.deployment is not None and not target.deployment.strip():
        return error_response(NotFound(f"Invalid URL ({request.method} {request.path}): no deployment name."))
    return await _run(request, endpoint, azure=target)


async def not_found(request: web.Request) -> web.Response:
    return error_response(NotFound(f"Invalid URL ({request.method} {request.path})"))


async def list_models(request: web.Request) -> web.Response:
    """The models the route table can serve: aliases, plus each upstream's own list filtered
    through the routes (an upstream model is listed only if a request for it would reach it)."""
    rt = request.app[RUNTIME]
    settings = rt.settings
    try:
        authenticate(request, new_exchange(request, "models", settings.server.request_id_header), rt)
    except HttpError as err:
        return error_response(err)
    seen: dict[str, dict[str, object]] = {}
    for alias in settings.exact_model_names():
        seen[alias] = {"id": alias, "object": "model", "created": 0, "owned_by": "tollgate"}

    async def fetch(name: str) -> list[dict[str, object]]:
        upstream = rt.upstreams[name]
        headers = upstream_headers({}, upstream, None, drop_client_auth=True)
        if upstream.settings.api_key is None and not rt.keyring.enabled and "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        try:
            async with upstream.session.get(
                upstream.api_base + "/models", headers=headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status != 200:
                    return []
                data = orjson.loads(await resp.read()).get("data", [])
                return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except Exception as exc:  # noqa: BLE001 - one upstream down must not hide the others
            log.warning("listing models of upstream %s failed: %s", name, exc)
            return []

    names = sorted(rt.upstreams)
    for name, models in zip(names, await asyncio.gather(*(fetch(n) for n in names))):
        for model in models:
            mid = str(model["id"])
            resolved = settings.route_for(mid)
            if resolved is not None and resolved.upstream == name and resolved.upstream_model == mid:
                seen.setdefault(mid, model)
    return web.Response(
        body=orjson.dumps({"object": "list", "data": list(seen.values())}),
        content_type="application/json",
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.ready:
        return web.json_response({"status": "ready", "upstreams": sorted(rt.upstreams)})
    return web.json_response({"status": "not ready"}, status=503)


def require_admin(request: web.Request, rt: Runtime) -> None:
    expected = rt.settings.admin.api_key
    if expected is None:
        raise PermissionDenied("The admin API is off: set admin.api_key in the config to use it.")
    presented = parse_bearer(request.headers.get("Authorization")) or ""
    if not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise InvalidApiKey("This endpoint needs the admin key as 'Authorization: Bearer <key>'.")


def require_summary_reader(request: web.Request, rt: Runtime) -> None:
    """Once keys exist: any valid virtual key or the admin key (`admin.summary_access:
    keys`), or the admin key alone (`admin`). Without keys, open like the API itself."""
    if not rt.keyring.enabled:
        return
    if rt.settings.admin.summary_access == "admin":
        require_admin(request, rt)
        return
    if rt.keyring.authenticate(parse_bearer(request.headers.get("Authorization"))) is not None:
        return
    if rt.settings.admin.api_key is None:
        raise InvalidApiKey("This endpoint needs a Tollgate virtual key as 'Authorization: Bearer <key>'.")
    require_admin(request, rt)


def _jsonable(value: object) -> object:
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


async def budgets_report(request: web.Request) -> web.Response:
    """Each budget bucket's spent, reserved, limit and reset, from the shared ledger."""
    rt = request.app[RUNTIME]
    try:
        require_admin(request, rt)
    except HttpError as err:
        return error_response(err)
    now = rt.clock()
    rows = await rt.ledger.budget_report(now)
    return web.Response(
        body=orjson.dumps(
            {"object": "list", "now": _jsonable(now), "data": [{k: _jsonable(v) for k, v in r.items()} for r in rows]}
        ),
        content_type="application/json",
    )
