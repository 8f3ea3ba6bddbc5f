"""Start the real daemon (`streamd serve`) as a subprocess for tests that talk to it.

    with running_daemon(tmp_path, "--max-sessions", "2") as d:
        d.ws_url      # ws://127.0.0.1:PORT/v1/stream
        d.http_url    # http://127.0.0.1:PORT

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
_LISTENING = re.compile(r"listening on (ws://[^\s]+)")


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
        """Send `sig` and wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"daemon did not stop within {timeout_s} s:\n{self.log()}"
            ) from None


@contextmanager
def running_daemon(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, check_exit: bool = True
) -> Iterator[Daemon]:
    """`streamd serve --port 0 --journal-dir tmp_path/journal ARGS`, ready to take clients."""
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
        raise AssertionError("daemon did not start:\n" + "".join(output))
    ws_url = found[0]
    http_url = "http://" + ws_url.removeprefix("ws://").split("/", 1)[0]
    daemon = Daemon(ws_url, http_url, process, journal, output)
    try:
        yield daemon
    finally:
        code = daemon.terminate()
        thread.join(5)
        process.stdout.close()
        if check_exit:
            assert code == 0, f"daemon exited {code}:\n{daemon.log()}"
