"""The real daemon (`streamd serve`) as a subprocess, as a user starts it, for tests and benches.

    with running_daemon(tmp_path, "--max-sessions", "2") as d:
        d.ws_url      # ws://127.0.0.1:PORT/v1/stream
        d.http_url    # http://127.0.0.1:PORT
        d.metrics()   # the /metrics text; scrape_metric(text, name) sums a series
        d.usage()     # (CPU seconds, peak RSS MiB) so far, from /proc

It listens on a free loopback port, journals under `tmp_path/journal`, and is stopped with
SIGTERM (the graceful path) when the block ends; the exit code is checked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from streamd.errors import StreamdError

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
METRICS_TIMEOUT_S = 10.0
_LISTENING = re.compile(r"listening on (ws://[^\s]+)")


class DaemonError(StreamdError):
    """The daemon did not start, did not stop, or exited with an error; the message holds its
    log."""


@dataclass
class Daemon:
    ws_url: str
    http_url: str
    process: subprocess.Popen[str]
    journal_dir: Path
    output: list[str] = field(default_factory=list)  # stdout+stderr lines so far

    def log(self) -> str:
        return "".join(self.output)

    def terminate(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send `sig` and wait; the exit code. Raises DaemonError (after a kill) on a timeout."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise DaemonError(f"daemon did not stop within {timeout_s} s:\n{self.log()}") from None

    def metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        with urllib.request.urlopen(self.http_url + "/metrics", timeout=METRICS_TIMEOUT_S) as r:
            return str(r.read().decode())

    def usage(self) -> tuple[float, float]:
        """(CPU seconds, peak RSS MiB) of the daemon process so far (Linux /proc)."""
        return process_usage(self.process.pid)


def scrape_metric(text: str, name: str) -> float:
    """Sum of every sample of series `name` (all label sets) in Prometheus text; 0 if absent."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def process_usage(pid: int) -> tuple[float, float]:
    """(user + system CPU seconds, peak RSS MiB) of a live process, from /proc/PID."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])
    return cpu_s, peak_kb / 1024


@contextmanager
def running_daemon(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, check_exit: bool = True
) -> Iterator[Daemon]:
    """`streamd serve --port 0 --journal-dir tmp_path/journal ARGS`, ready to take clients.

    Raises DaemonError if it does not print its address within READY_TIMEOUT_S, or (with
    `check_exit`) if it exits non-zero when the block ends.
    """
    journal = tmp_path / "journal"
    cmd = [
        sys.executable,
        "-m",
        "streamd",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--journal-dir",
        str(journal),
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
    )
    assert process.stdout is not None
    output: list[str] = []
    ready = threading.Event()
    found: list[str] = []

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if not found and (m := _LISTENING.search(line)):
                found.append(m.group(1))
                ready.set()
        ready.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    ready.wait(READY_TIMEOUT_S)
    if not found:
        process.kill()
        process.wait()
        thread.join(5)
        process.stdout.close()
        raise DaemonError("daemon did not start:\n" + "".join(output))
    ws_url = found[0]
    http_url = "http://" + ws_url.removeprefix("ws://").split("/", 1)[0]
    daemon = Daemon(ws_url, http_url, process, journal, output)
    try:
        yield daemon
    finally:
        code = daemon.terminate()
        thread.join(5)
        process.stdout.close()
        if check_exit and code != 0:
            raise DaemonError(f"daemon exited {code}:\n{daemon.log()}")
