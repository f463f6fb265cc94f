"""The soak runner (tests/soak/run.py) for ~30 s, as CI runs it: flat memory, descriptors
and tasks, no errors beyond the injected ones, and the ledger reconciled to the nano-dollar.
The 10-minute run is `python -m tests.soak.run --minutes 10`."""

from __future__ import annotations

from pathlib import Path

from tests.soak.run import soak

# Steady-state growth allowed over 30 s: a leak of one object per request (600 requests)
# shows in tasks or fds at once; RSS gets allocator slack.
RSS_GROWTH_KIB = 8 * 1024
FD_GROWTH = 4
TASK_GROWTH = 10


async def test_short_soak_is_flat_clean_and_reconciled(tmp_path: Path) -> None:
    # One burst of two 20 MB streams after an idle pause, in the middle of the run.
    report = await soak(0.5, 20.0, 2.0, tmp_path, log=False, burst_every=12.0, burst_streams=2, burst_mb=20)
    start, end = report.steady()
    summary = report.summary()
    summary.pop("samples")
    print(f"short soak: {summary}")
    assert report.unexpected == []
    assert report.exit_code == 0
    # Every kind of traffic ran, and every injected fault left its outcome.
    assert set(report.by_kind) == {
        "stream", "plain", "gzip_plain", "upstream_500", "upstream_429", "gone_mid_stream", "gone_thinking", "big_stream",
    }
    assert len(report.bursts) >= 1
    assert report.outcomes.get("upstream_error") == report.by_kind["upstream_500"] + report.by_kind["upstream_429"]
    assert report.outcomes.get("client_gone") == report.by_kind["gone_mid_stream"] + report.by_kind["gone_thinking"]
    assert end.rss_kib - start.rss_kib < RSS_GROWTH_KIB, (start, end)
    assert end.fds - start.fds <= FD_GROWTH, (start, end)
    assert end.tasks - start.tasks <= TASK_GROWTH and end.tasks >= 0, (start, end)
    # The ledger's bucket, its spend log and the access log agree exactly, row for row.
    assert report.reconciled, summary["ledger"]
    assert report.ledger_spent_nanos > 0
