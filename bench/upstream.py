"""The benchmark's fake OpenAI upstream, run as its own process: Tollgate's one synthetic
upstream (`proxy.synthetic.SyntheticUpstream`, the same generator `tollgate demo` uses),
without per-request records and with each stream's bytes built once, so it spends as little
CPU as possible beside the proxy under test on a 2-core machine.

It answers `POST /v1/chat/completions` with a JSON completion of `chunks` tokens, or an SSE
stream of a role-only chunk, `chunks` content chunks, a finish chunk and `[DONE]`, plus the
usage chunk (and `"usage":null` on every chunk) when the request sets
`stream_options.include_usage`.
"""

from __future__ import annotations

import asyncio
import sys

from proxy.synthetic import SyntheticUpstream


async def serve(port: int, chunks: int, ttft_s: float, gap_s: float, latency_s: float) -> None:
    upstream = SyntheticUpstream(
        ttft_s=ttft_s,
        gap_s=gap_s,
        tokens=chunks,
        models=("gpt-4o-mini",),
        port=port,
        record=False,
        body_delay_s=latency_s,
    )
    async with upstream:
        print(f"READY {upstream.base_url.rsplit(':', 1)[1].split('/', 1)[0]}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    import argparse

    import uvloop

    p = argparse.ArgumentParser(prog="python -m bench upstream")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chunks", type=int, default=64, help="content chunks per stream")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--gap-ms", type=float, default=1.0)
    p.add_argument("--latency-ms", type=float, default=0.0, help="non-stream: delay before the body")
    a = p.parse_args(argv)
    uvloop.run(serve(a.port, a.chunks, a.ttft_ms / 1000, a.gap_ms / 1000, a.latency_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
