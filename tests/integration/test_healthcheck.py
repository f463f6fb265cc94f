"""The image's HEALTHCHECK command (`python -m proxy.healthcheck`) against a live server."""

from __future__ import annotations

from pathlib import Path


async def test_the_healthcheck_exits_0_against_a_live_server_and_1_otherwise(tmp_path: Path) -> None:
    import asyncio

    from aiohttp import web

    from proxy.healthcheck import main

    app = web.Application()
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"server: {{port: {port}}}\nupstreams: {{o: {{base_url: 'http://127.0.0.1:1/v1'}}}}\ndefault_upstream: o\n")
    try:
        assert await asyncio.to_thread(main, [str(cfg)]) == 0
    finally:
        await runner.cleanup()
    assert await asyncio.to_thread(main, [str(cfg)]) == 1
