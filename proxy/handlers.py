"""The HTTP handlers. A model request walks the pipeline top to bottom, one stage each:

    accept   → Accepted    target, key, body (proxy.accept)
    route    → Routed      upstream by model, key's model allow-list (proxy.route)
    cached   → a hit       answered from the response cache, when on (proxy.cached)
    admit    → Admission   budgets reserved, with its Hold (proxy.spend.admission)
    throttle → Admission   rate and concurrency limits charged, with its Grant (proxy.throttle)
    forward  → response    sent upstream, relayed as it arrives (proxy.forward)
    finish                 usage, cost, observers, the hold settled or released (proxy.finish)

Every stage reads the one `Policy` the request captured when it arrived.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from proxy.accept import accept, authenticate, new_exchange
from proxy.azure import AZURE_DEPLOYMENT_ENDPOINTS, AzureTarget
from proxy.cached import look_up, replay, store
from proxy.encodings import encoding_ready
from proxy.errors import (
    ClientError,
    HttpError,
    InvalidApiKey,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PermissionDenied,
)
from proxy.exchange import Endpoint, Exchange
from proxy.finish import complete, finish_soon, started
from proxy.forward import relay, send, upstream_headers
from proxy.keys import parse_bearer
from proxy.paths import CANONICAL, MODEL_PATHS, metered_endpoint
from proxy.policy import Policy
from proxy.response_cache import Recorder
from proxy.route import Routed, outgoing_body, route, route_unmetered
from proxy.spend.admission import OutputLimits, admit
from proxy.spend.forecast import forecast_fields
from proxy.spend.hold import NOT_ADMITTED, Admission
from proxy.spend.money import report_value
from proxy.state import RUNTIME, Runtime
from proxy.throttle import throttle

log = logging.getLogger("tollgate.handlers")

__all__ = ["MODEL_PATHS", "model_endpoint", "passthrough"]


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


async def _run(
    request: web.Request, endpoint: Endpoint, upstream_path: str | None = None, azure: AzureTarget | None = None
) -> web.StreamResponse:
    """`upstream_path`: the path (after /v1) and query to send upstream, when not the
    client's own (a model endpoint under another spelling goes out under its own).
    `azure`: the request came in Azure OpenAI's layout (/openai/...); its upstream path is
    chosen once the route names the upstream."""
    rt = request.app[RUNTIME]
    policy = rt.policy  # this request's configuration, whatever a reload does meanwhile
    ex = new_exchange(request, endpoint, policy.settings.server.request_id_header)
    admission = NOT_ADMITTED
    recorder: Recorder | None = None
    try:
        # An Azure deployment names the model in the path; Azure ignores (and clients often
        # omit) the body's `model`.
        accepted = await accept(request, ex, policy, model=azure.deployment if azure else None)
        if accepted.payload is None:
            routed = route_unmetered(request, ex, policy, accepted, rt.clock())
            body = accepted.body or None
        else:
            routed = route(ex, policy, accepted)
            cache = rt.response_cache
            if cache is not None and azure is None:
                found, recorder = await look_up(cache, request, ex, policy, accepted.payload, routed)
                if found is not None:
                    # Free, so served whatever the budgets say: no reservation, no upstream.
                    started(ex, rt)
                    return await replay(
                        request, cache, ex, policy, found, rt.observers, lambda: complete(ex, policy, admission, rt)
                    )
            limits = OutputLimits(routed.default_output_cap, routed.upstream.context_size)
            admission = await admit(rt.spend, ex, policy, accepted.payload, limits)
            admission = await throttle(rt.limiter, ex, policy, accepted.payload, limits, admission)
            if recorder is not None and admission.cap_override is not None:
                recorder.capped = True
            payload = accepted.payload
            if azure is not None:
                kind = policy.settings.upstreams[routed.upstream.name].kind
                upstream_path, payload = azure.upstream_request(ex, kind, payload)
            inject = policy.settings.upstreams[routed.upstream.name].inject_stream_usage
            body = outgoing_body(ex, accepted.body, payload, inject, admission.cap_override)
        return await _forward(request, rt, policy, ex, routed, admission, body, upstream_path, recorder)
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
        finish_soon(ex, policy, admission, rt)


async def _forward(
    request: web.Request,
    rt: Runtime,
    policy: Policy,
    ex: Exchange,
    routed: Routed,
    admission: Admission,
    body: bytes | None,
    upstream_path: str | None,
    recorder: Recorder | None,
) -> web.StreamResponse:
    upstream = routed.upstream
    started(ex, rt)
    # With virtual keys on, the client's Authorization is a Tollgate key: never forwarded.
    headers = upstream_headers(request.headers, upstream, ex, drop_client_auth=policy.keyring.enabled)
    rt.observers.on_request_headers(ex, headers)
    # The proxy serves /v1/...; the upstream's API base already ends where /v1 does. Built
    # from the parsed target, so an absolute-form request line cannot smuggle in a host.
    path_qs = request.rel_url.raw_path_qs[3:] if upstream_path is None else upstream_path
    resp = await send(upstream, request.method, path_qs, headers, body, ex)
    try:
        out = await relay(
            request, resp, upstream, ex, admission.headers, rt.observers,
            lambda: _complete(ex, policy, admission, rt), policy.prices, recorder,
        )
    finally:
        if upstream.replicas is not None and ex.replica is not None:
            upstream.replicas.release(ex.replica)
    if recorder is not None and rt.response_cache is not None:
        store(rt.response_cache, ex, recorder)
    return out


async def _complete(ex: Exchange, policy: Policy, admission: Admission, rt: Runtime) -> None:
    if ex.usage is None and ex.llamacpp_timings is None and (ex.status is None or ex.status < 400):
        # `finish` will estimate the usage the upstream did not report: with the model's own
        # table, built off the event loop (the first such response of the process waits for
        # it, ~0.1 s). A superset of when `finish.account` estimates: at worst a table is
        # built that is not used.
        await encoding_ready(ex.upstream_model or ex.requested_model or "")
    await complete(ex, policy, admission, rt)


def model_endpoint(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _run(request, endpoint)

    handler.__name__ = endpoint.replace(".", "_")
    return handler


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
        return await _run(request, endpoint, CANONICAL[endpoint] + (f"?{query}" if query else ""))
    return await _run(request, "other")


async def azure_deployment(request: web.Request) -> web.StreamResponse:
    """POST /openai/deployments/{deployment}/{chat/completions|completions|embeddings}."""
    deployment = request.match_info["deployment"]
    tail = request.match_info["tail"].strip("/").lower()
    endpoint = AZURE_DEPLOYMENT_ENDPOINTS.get(tail)
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
    policy = request.app[RUNTIME].policy
    try:
        authenticate(request, new_exchange(request, "models", policy.settings.server.request_id_header), policy.keyring)
    except HttpError as err:
        return error_response(err)
    seen = await _served_models(request, policy)
    return web.Response(
        body=orjson.dumps({"object": "list", "data": list(seen.values())}),
        content_type="application/json",
    )


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (the SDK's `models.retrieve`): the entry `GET /v1/models` lists
    for that id. An alias exists only here, so the upstream cannot answer for it: the same
    list decides, so whatever the list shows can be retrieved, and nothing else."""
    policy = request.app[RUNTIME].policy
    try:
        authenticate(request, new_exchange(request, "models", policy.settings.server.request_id_header), policy.keyring)
    except HttpError as err:
        return error_response(err)
    model_id = request.match_info["model"]
    found = (await _served_models(request, policy)).get(model_id)
    if found is None:
        return error_response(
            ModelNotFound(
                f"The model `{model_id}` does not exist or is not served by this proxy (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )
        )
    return web.Response(body=orjson.dumps(found), content_type="application/json")


async def _served_models(request: web.Request, policy: Policy) -> dict[str, dict[str, object]]:
    """id -> model object, in listing order: aliases first, then each upstream's own."""
    settings = policy.settings
    seen: dict[str, dict[str, object]] = {}
    for alias in settings.exact_model_names():
        seen[alias] = {"id": alias, "object": "model", "created": 0, "owned_by": "tollgate"}

    async def fetch(name: str) -> list[dict[str, object]]:
        upstream = policy.upstreams[name]
        api_base, replica = upstream.healthy_api_base()
        headers = upstream.own_headers(replica)
        own_key = upstream.settings.api_key if replica is None or replica.api_key is None else replica.api_key
        if own_key is None and not policy.keyring.enabled and "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        try:
            async with upstream.session.get(
                api_base + "/models", headers=headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status != 200:
                    return []
                data = orjson.loads(await resp.read()).get("data", [])
                return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except Exception as exc:  # noqa: BLE001 - one upstream down must not hide the others
            log.warning("listing models of upstream %s failed: %s", name, exc)
            return []

    names = sorted(policy.upstreams)
    for name, models in zip(names, await asyncio.gather(*(fetch(n) for n in names)), strict=True):
        for model in models:
            mid = str(model["id"])
            resolved = settings.route_for(mid)
            if resolved is not None and resolved.upstream == name and resolved.upstream_model == mid:
                seen.setdefault(mid, model)
    return seen


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


async def budgets_report(request: web.Request) -> web.Response:
    """Each budget bucket's spent, reserved, limit and reset, from the shared ledger."""
    rt = request.app[RUNTIME]
    try:
        require_admin(request, rt)
    except HttpError as err:
        return error_response(err)
    now = rt.clock()
    rows = [forecast_fields(r, now) for r in await rt.ledger.budget_report(now)]
    return web.Response(
        body=orjson.dumps(
            {"object": "list", "now": report_value(now), "data": [{k: report_value(v) for k, v in r.items()} for r in rows]}
        ),
        content_type="application/json",
    )
