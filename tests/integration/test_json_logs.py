"""With the access log on (JSON on stdout), everything else the process writes is JSON too.

Issue 15: the access log was JSON while Tollgate's own and aiohttp's log records were text
on stderr, so a collector needed two parsers. A real `tollgate serve` runs through start,
requests (a 502 from an upstream that is not there, a model listing that fails upstream),
a rejected and an applied SIGHUP reload, and SIGTERM; every line of both streams must parse
as a JSON object.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.faults_common import server_yaml, start_server_process
from tests.support.procs import free_port


def _lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{path.name} line {n} is not JSON: {line!r}")
        assert isinstance(rec, dict), line
        out.append(rec)
    return out


async def test_every_line_on_stdout_and_stderr_is_json(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cfg = tmp_path / "tollgate.yaml"
    good = server_yaml(dead, tmp_path / "ledger.db")
    cfg.write_text(good)
    server = await start_server_process(cfg, tmp_path, env={"TOLLGATE_LOG_LEVEL": "debug"})
    try:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-x", max_retries=0, timeout=10)
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert failed.value.status_code == 502
        assert [m.id async for m in client.models.list()] == []  # the upstream is not there: a warning
        cfg.write_text(good.replace("port: 0", "port: 'not a port'", 1))
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_log("config reload rejected")
        cfg.write_text(good)
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_log("config reloaded")
    finally:
        assert server.stop(timeout=15) == 0
    errors = _lines(server.log)
    messages = [r["message"] for r in errors]
    assert any(m.startswith("tollgate ready on http://127.0.0.1:") for m in messages), messages
    assert any(m.startswith("config reload rejected") for m in messages), messages
    assert any(m.startswith("listing models of upstream openai failed") for m in messages), messages
    assert messages[-1] == "stopped", messages
    assert {r["level"] for r in errors} >= {"debug", "info", "error"}
    assert all(set(r) >= {"ts", "level", "logger", "message"} and r["ts"].endswith("Z") for r in errors)
    access = _lines(server.stdout) if server.stdout is not None else []
    assert [r["status"] for r in access if r.get("endpoint") == "chat.completions"] == [502]
