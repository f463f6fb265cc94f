"""A local OTLP/HTTP trace receiver that accepts every export and keeps nothing.

Tollgate's tracing run exports here, so the benchmark pays for building, batching, encoding
and posting spans, and nothing for storing them.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

# An empty ExportTraceServiceResponse: protobuf encodes a message with no fields as no bytes.
_EMPTY = b""


async def traces(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_EMPTY, content_type="application/x-protobuf")


async def serve() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"READY {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
