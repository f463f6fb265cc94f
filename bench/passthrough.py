"""The baseline: a bare aiohttp reverse proxy that measures nothing.

Same stack as Tollgate (aiohttp server, aiohttp client with a pooled keep-alive session,
uvloop), same relay shape (one client write per upstream read), none of the work Tollgate
adds. The gap between the two is the cost of measuring.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te"})


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session: list[aiohttp.ClientSession] = []

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        session.append(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1024),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
                auto_decompress=False,
            )
        )
        yield
        await session[0].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session[0].request(
            request.method, upstream + request.raw_path, headers=headers, data=body
        ) as up:
            out = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    out.headers[k] = v
            if "Content-Length" in up.headers:
                out.content_length = int(up.headers["Content-Length"])
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def serve(upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(f"READY {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench passthrough")
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000")
    a = p.parse_args(argv)
    uvloop.run(serve(a.upstream.rstrip("/")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
