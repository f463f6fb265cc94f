"""The only module that talks to upstreams: build the request, send it, relay the answer.

Bytes go to the client as they arrive, one write per upstream chunk, unchanged; the
measurement tap gets a reference to the same bytes after the write (or before it, when the
stream must be rewritten: to undo Tollgate's own usage injection, or to add `usage.cost` to
the usage event of a client that asked for both).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.body import MAX_PARSED_BODY, BodyKeeper
from proxy.client_cost import UsageCoster, cost_headers, stream_wants_cost, with_usage_cost
from proxy.errors import UpstreamError, translate_upstream_exception
from proxy.exchange import Exchange
from proxy.measure import StreamTap
from proxy.observer import Observers
from proxy.pricing import PriceTable, price_of_answer
from proxy.response_cache import Recorder
from proxy.strip import EventRewriter, UsageStripper
from proxy.upstream import _ATTEMPT, Replica, ReplicaSet, Upstream, _Attempt

log = logging.getLogger("tollgate.forward")

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# content-encoding: aiohttp decodes a compressed request body as it reads it, and the
# decoded bytes are what goes upstream (measured, and possibly rewritten), so the header
# that described the client's encoding would now lie to the upstream.
_NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect", "content-encoding"}
_NOT_RELAYED_DOWN = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}


# How many times a request is sent again after a reused pooled connection turned out
# closed (each attempt discards one stale connection).
STALE_CONNECTION_RETRIES = 3


def upstream_headers(
    incoming: Mapping[str, str], upstream: Upstream, ex: Exchange, *, drop_client_auth: bool
) -> CIMultiDict[str]:
    """Headers sent upstream: the client's minus hop-by-hop, with credentials from config."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in _NOT_FORWARDED_UP or lname.startswith("x-tollgate-"):
            continue
        out.add(name, value)
    # The hop between proxy and upstream is uncompressed so the tap reads plain SSE.
    out["Accept-Encoding"] = "identity"
    key = upstream.settings.api_key
    azure = upstream.settings.kind == "azure"
    if key is not None and azure:
        # Azure OpenAI takes its key as `api-key`; a client's credentials never go with it.
        out.popall("Authorization", None)
        out["api-key"] = key.get_secret_value()
    elif key is not None:
        out["Authorization"] = f"Bearer {key.get_secret_value()}"
        out.popall("api-key", None)
    elif drop_client_auth:
        # A Tollgate virtual key, whichever header the client sent it in.
        out.popall("Authorization", None)
        out.popall("api-key", None)
    for name, value in upstream.settings.headers.items():
        out[name] = value
    # A client's sane x-request-id is the request id, so it goes up unchanged; without
    # one (or with one refused as hostile) the upstream sees Tollgate's.
    out["X-Request-Id"] = ex.request_id
    return out


def relayed_headers(upstream_headers_: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as the client gets them: unchanged but for
    hop-by-hop ones and those the relay recomputes. Its x-request-id (OpenAI's `req_...`,
    what the SDK shows as `response.request_id` and OpenAI support asks for) included."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream_headers_.items():
        lname = name.lower()
        if lname in _NOT_RELAYED_DOWN or lname.startswith("x-tollgate-"):
            continue
        out.add(name, value)
    return out


async def send(
    upstream: Upstream,
    method: str,
    path_qs: str,
    headers: CIMultiDict[str],
    body: bytes | None,
    ex: Exchange,
) -> aiohttp.ClientResponse:
    """Send the request and wait for response headers; errors come back translated.

    To a replicated upstream: to the least busy replica, and to the next one when a connect
    fails (nothing was sent, so nothing can have been acted on), each at most once. The
    chosen replica is `ex.replica`, counted in flight until the caller releases it
    (`ReplicaSet.release`) once the response is relayed; on an error raised here it is
    already released."""
    ex.t_upstream_sent_ns = time.perf_counter_ns()
    replicas = upstream.replicas
    if replicas is None:
        try:
            resp = await _request(upstream, method, upstream.api_base + path_qs, headers, body)
        except Exception as exc:  # noqa: BLE001 - translated in exactly one place
            raise translate_upstream_exception(exc, upstream.name, _phase_of(exc)) from exc
    else:
        resp = await _send_replicated(upstream, replicas, method, path_qs, headers, body, ex)
    ex.t_headers_ns = time.perf_counter_ns()
    return resp


async def _send_replicated(
    upstream: Upstream,
    replicas: ReplicaSet,
    method: str,
    path_qs: str,
    headers: CIMultiDict[str],
    body: bytes | None,
    ex: Exchange,
) -> aiohttp.ClientResponse:
    tried: list[Replica] = []
    while True:
        replica = replicas.acquire(tried, time.monotonic())
        assert replica is not None  # the loop leaves before every replica has been tried
        tried.append(replica)
        ex.replica = replica.name
        ex.upstream_url = replica.api_base
        try:
            resp = await _request(
                upstream, method, replica.api_base + path_qs, _replica_headers(headers, upstream, replica), body
            )
        except BaseException as exc:
            replicas.release(replica.name)
            if not isinstance(exc, Exception):
                raise  # cancelled: the client left
            phase = _phase_of(exc)
            if phase != "connect":
                raise translate_upstream_exception(exc, upstream.name, phase) from exc
            replicas.connect_failed(replica, time.monotonic())
            ex.replica_failures += (replica.name,)
            if len(tried) == len(replicas.replicas):
                raise translate_upstream_exception(exc, upstream.name, phase) from exc
            log.info("upstream %s: replica %s could not be reached (%s); trying another", upstream.name, replica.name, exc)
            continue
        if not replica.up:
            replicas.verdict(replica, True)
        return resp


def _replica_headers(headers: CIMultiDict[str], upstream: Upstream, replica: Replica) -> CIMultiDict[str]:
    """The request's headers with the replica's own key, where it has one."""
    key = replica.api_key
    if key is None:
        return headers
    out = headers.copy()
    if upstream.settings.kind == "azure":
        out.popall("Authorization", None)
        out["api-key"] = key.get_secret_value()
    else:
        out.popall("api-key", None)
        out["Authorization"] = f"Bearer {key.get_secret_value()}"
    return out


async def _request(
    upstream: Upstream, method: str, url: str, headers: CIMultiDict[str], body: bytes | None
) -> aiohttp.ClientResponse:
    """One request on the upstream's session; lower-layer errors are raised as they are."""
    attempt = _Attempt()
    token = _ATTEMPT.set(attempt)
    try:
        retry = 0
        while True:
            attempt.reused = False
            try:
                return await upstream.session.request(method, url, headers=headers, data=body, allow_redirects=False)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection the upstream closed as we reused it: nothing
                # was answered, so the request goes again on another connection. aiohttp does
                # this only for idempotent methods; a POST met the same race. A fresh
                # connection that fails is never retried: the upstream may have acted on it.
                if not attempt.reused or retry == STALE_CONNECTION_RETRIES:
                    raise
                retry += 1
                log.debug("upstream %s dropped a reused connection (%s); sending again", upstream.name, exc)
    finally:
        _ATTEMPT.reset(token)


def _phase_of(exc: BaseException) -> str:
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return "connect"
    return "headers"


def _set_idle_timeout(resp: aiohttp.ClientResponse, idle: float) -> None:
    # aiohttp re-arms its read timer on every data_received; switching the value after the
    # headers gives a per-chunk idle timeout with no timer of our own per chunk.
    conn = resp.connection
    if conn is not None and conn.protocol is not None:
        conn.protocol.read_timeout = idle
        conn.protocol.start_timeout()  # re-arm now, not at the next data_received


def client_response(
    resp: aiohttp.ClientResponse, ex: Exchange, admission_headers: Mapping[str, str], is_sse: bool
) -> web.StreamResponse:
    """The client's response, not yet prepared: the upstream's status and headers (less
    hop-by-hop ones), our request id, admission's headers, and what keeps a stream flowing
    through buffering proxies in front of us."""
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    out.headers.update(relayed_headers(resp.headers))
    # Tollgate's own id in its own header (it names the log line, span and spend row); the
    # x-request-id is the upstream's, or Tollgate's only if the upstream sent none.
    out.headers["X-Tollgate-Request-Id"] = ex.request_id
    out.headers.setdefault("X-Request-Id", ex.request_id)
    if admission_headers:
        out.headers.update(admission_headers)
    if is_sse:
        out.headers["X-Accel-Buffering"] = "no"
        out.headers.setdefault("Cache-Control", "no-cache")
    elif "Content-Length" in resp.headers and "Content-Encoding" not in resp.headers:
        out.content_length = int(resp.headers["Content-Length"])
    return out


async def _fail_started(
    request: web.Request, out: web.StreamResponse, ex: Exchange, err: UpstreamError, is_sse: bool
) -> None:
    """The upstream failed after the client's response began: say so in the stream (SSE),
    or cut the connection so a plain body cannot look complete."""
    ex.outcome = "proxy_error"
    if is_sse:
        try:
            await out.write(err.to_sse(ex.request_id))
            await out.write_eof()
        except (ConnectionError, RuntimeError):
            ex.outcome = "client_gone"
    elif request.transport is not None:
        request.transport.close()


async def _send_held(request: web.Request, out: web.StreamResponse, ex: Exchange, data: bytes) -> None:
    """A held-back plain body, accounted: its cost headers, then the body in one write
    (with `usage.cost` spliced in when the client opted in)."""
    if ex.status is not None and ex.status < 400 and ex.body_measured == "whole":
        out.headers.update(cost_headers(ex))
        if ex.include_cost and out.headers.get("Content-Type", "").startswith("application/json"):
            rewritten = with_usage_cost(data, ex.cost_parts)
            if rewritten is not None:
                data = rewritten
    if out.content_length is not None:
        out.content_length = len(data)
    await out.prepare(request)
    if data:
        await out.write(data)
        ex.bytes_out += len(data)


async def relay(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    upstream: Upstream,
    ex: Exchange,
    admission_headers: Mapping[str, str],
    observers: Observers,
    complete: Callable[[], Awaitable[None]],
    prices: PriceTable,
    recorder: Recorder | None = None,
) -> web.StreamResponse:
    """Relay the upstream response to the client as it arrives; fill the Exchange on the way.

    `complete` runs once the whole response is known and before its last bytes reach the
    client (the final chunk of a chunked or SSE body, or the last piece of a Content-Length
    body), so a response the client sees complete has already been accounted and settled.

    `prices` (the request's Policy's) price the usage event of a stream whose client opted
    into `usage.cost`.
    `recorder`: the response cache's, when the response may be stored: it gets each piece
    of the body as the client gets it (a plain body before any `usage.cost` is spliced in).

    Raises UpstreamError before the response has started; after, failures are reported to
    the client in-stream (SSE) or by closing the connection (plain bodies), and recorded.
    """
    ex.status = resp.status
    is_sse = resp.headers.get("Content-Type", "").startswith("text/event-stream")
    out = client_response(resp, ex, admission_headers, is_sse)
    rewriter: EventRewriter | None = None
    if is_sse and ex.usage_injected:
        rewriter = UsageStripper()
    elif is_sse and stream_wants_cost(ex):
        rewriter = UsageCoster(
            ex.endpoint,
            lambda: price_of_answer(prices, ex.upstream_model, ex.requested_model, ex.response_model, ex.azure_deployment),
        )
    if recorder is not None and isinstance(rewriter, UsageCoster):
        # This client's usage chunk carries its own cost: bytes no other client may replay.
        recorder.failed = True
    if recorder is not None:
        out.headers["Cache-Status"] = recorder.cache_status(resp.status, out.headers.get("Content-Type", ""))
    expected_length = out.content_length
    observers.on_response_headers(ex, out.headers)
    _set_idle_timeout(resp, upstream.idle_timeout)

    content = resp.content
    tap = StreamTap(ex, observers.on_first_token) if is_sse else None
    body = None if is_sse else BodyKeeper()
    # A plain body that can be parsed whole is held back until it has been read and
    # accounted, so its headers can carry its cost (README "Cost where the client sees
    # it"); one that turns out larger than the parse limit is relayed as it comes, as a
    # stream is, without them.
    held: list[bytes] | None = (
        [] if body is not None and (expected_length is None or expected_length <= MAX_PARSED_BODY) else None
    )
    started = False
    perf = time.perf_counter_ns
    # Overhead (README "What is measured"): pre-send time plus the relay delay of one chunk:
    # the first output chunk of a stream (the first chunk relayed until one comes), or a
    # plain body's end read until it is measured, just before the exchange is accounted.
    presend = 0 if ex.t_upstream_sent_ns is None else ex.t_upstream_sent_ns - ex.t0_ns
    ex.overhead_ns = presend
    first_output_counted = False

    def relay_delay(delay: int) -> None:
        ex.relay_delay_ns = delay
        ex.overhead_ns = presend + delay

    async def completing() -> None:
        if body is not None:
            body.measure(ex)
            # Since the end of the body was read (t_read: its last piece, or the upstream's
            # end of a chunked body): observers see the overhead from here on.
            relay_delay(perf() - t_read)
        ex.outcome = "ok" if resp.status < 400 else "upstream_error"
        await complete()

    try:
        while True:
            try:
                chunk = await content.readany()
            except Exception as exc:  # noqa: BLE001 - translated in exactly one place
                raise translate_upstream_exception(exc, upstream.name, "body") from exc
            t_read = perf()
            if not chunk:
                break
            if ex.t_first_byte_ns is None:
                ex.t_first_byte_ns = t_read
            if rewriter is not None:
                assert tap is not None
                chunk = tap.strip(chunk, t_read, rewriter)
                if not chunk:
                    continue
            if held is not None:
                assert body is not None
                body.add(chunk)
                held.append(chunk)
                if body.size <= MAX_PARSED_BODY:
                    continue
                # Too large to account before it is sent: relay it from here as it comes.
                chunk = b"".join(held)
                held = None
                await out.prepare(request)
                started = True
                await out.write(chunk)
                ex.bytes_out += len(chunk)
                if recorder is not None:
                    recorder.add(chunk)
                continue
            if not started:
                await out.prepare(request)
                started = True
            if body is not None:
                body.add(chunk)
                if expected_length is not None and body.size >= expected_length:
                    # The client will take this piece as the end of the body.
                    await completing()
            await out.write(chunk)
            t_written = perf()
            ex.bytes_out += len(chunk)
            if recorder is not None:
                recorder.add(chunk)
            if tap is not None and rewriter is None:
                tap.tap(chunk, t_read)
            if tap is not None and not first_output_counted:
                # The tap has seen this chunk by now (before the write when rewriting).
                first_output_counted = ex.t_first_token_ns == t_read
                if first_output_counted or ex.relay_delay_ns is None:
                    relay_delay(t_written - t_read)
        if tap is not None:
            tail = tap.finish(perf())
            if rewriter is not None and tail:
                rest = b"".join([rewriter.rewrite(ev) for ev in tail])
                if rest:
                    if not started:
                        await out.prepare(request)
                        started = True
                    await out.write(rest)
                    if recorder is not None:
                        recorder.add(rest)
        if held is not None:
            await completing()
            whole = b"".join(held)
            if recorder is not None and resp.status == 200:
                recorder.add(whole)
                out.headers["Cache-Status"] = recorder.final_status(ex.outcome, resp.status, ex.finish_reasons)
            await _send_held(request, out, ex, whole)
            started = True
            held = None
        if not started:
            await out.prepare(request)
            started = True
        if ex.outcome is None:
            await completing()
        await out.write_eof()
    except UpstreamError as err:
        ex.error_type = err.kind
        ex.error_message = err.message
        ex.error_detail = err.detail
        if not started:
            raise
        await _fail_started(request, out, ex, err, is_sse)
    except asyncio.CancelledError:
        # The client left (aiohttp cancels the handler): drop the upstream connection now
        # so the upstream stops generating.
        ex.outcome = "client_gone"
        resp.close()
        raise
    except ConnectionError:
        ex.outcome = "client_gone"
        resp.close()
    finally:
        if ex.outcome in ("client_gone", "proxy_error"):
            resp.close()
        else:
            resp.release()
        if body is not None:
            body.measure(ex)
    return out
