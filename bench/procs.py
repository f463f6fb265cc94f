"""Child processes of the benchmark, and what they cost: CPU time and RSS from /proc.

CPU is the sum of `/proc/<pid>/task/<tid>/schedstat` run times (nanoseconds, every thread,
including the tracing exporter's) over the process and its descendants: a server with
workers or an nginx master/worker pair counts as one. RSS is VmRSS summed the same way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """Direct children, from /proc/<pid>/task/*/children (needs no scan of all of /proc)."""
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    pids = [pid]
    i = 0
    while i < len(pids):
        pids.extend(children_of(pids[i]))
        i += 1
    return pids


def process_cpu_ns(pid: int) -> int:
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            # No schedstat (kernel without CONFIG_SCHED_INFO): clock ticks, coarser.
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLK_TCK
            except (OSError, ValueError, IndexError):
                continue
    return total


def tree_cpu_ns(pid: int) -> int:
    return sum(process_cpu_ns(p) for p in tree(pid))


def _process_ticks_ns(pid: int) -> int:
    """utime + stime + cutime + cstime: every thread's CPU, dead ones included, and that of
    reaped children; in clock ticks (10 ms), so coarser than schedstat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) * 1_000_000_000 // _CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class CpuMark:
    precise: int  # schedstat of the live threads
    ticks: int  # clock ticks, threads and reaped children that have gone included


def cpu_mark(pid: int) -> CpuMark:
    pids = tree(pid)
    return CpuMark(sum(process_cpu_ns(p) for p in pids), sum(_process_ticks_ns(p) for p in pids))


def cpu_between(start: CpuMark, end: CpuMark) -> int:
    """The tree's CPU time between two marks. schedstat (ns) only covers threads alive at
    each mark: a server whose threads or worker processes come and go (LiteLLM) loses the
    time of those that ended, and can even read negative. When the precise figure falls
    short of the tick count by more than two ticks, the tick count is the truth."""
    precise, ticks = end.precise - start.precise, end.ticks - start.ticks
    slack = 2 * 1_000_000_000 // _CLK_TCK
    return precise if precise >= ticks - slack else ticks


def rss_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in tree(pid))


@dataclass
class Child:
    """A server the benchmark started; output goes to files (a pipe nobody reads can fill
    up and stall the server)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start(
    name: str,
    argv: list[str],
    workdir: Path,
    *,
    ready: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    stdout_to_log: bool = True,
    cwd: Path | None = None,
) -> Child:
    """Start `argv` and wait until its output matches `ready` (a regex whose group 1 is the
    port, or no group when the port is already known). It runs in `cwd`, by default this
    repository: `python -m proxy` imports the `proxy` of its working directory before any on
    PYTHONPATH, so another source tree's Tollgate must run in that tree."""
    log_path = workdir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        argv,
        stdout=log if stdout_to_log else subprocess.DEVNULL,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=cwd if cwd is not None else Path(__file__).resolve().parent.parent,
    )
    log.close()
    child = Child(name=name, proc=proc, log_path=log_path)
    pattern = re.compile(ready)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = pattern.search(text)
        if m:
            if m.groups():
                child.port = int(m.group(1))
            return child
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    child.stop()
    raise RuntimeError(f"{name} not ready after {timeout} s:\n{log_path.read_text(errors='replace')[-3000:]}")


def free_port() -> int:
    """A port for servers that cannot bind port 0 themselves (nginx); racy only in theory on
    a machine that is not handing out ports as fast as we are."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")
