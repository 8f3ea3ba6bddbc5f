"""Start the real daemon (`streamd serve`) as a subprocess for tests that talk to it.

    with running_daemon(tmp_path, "--max-sessions", "2") as d:
        d.ws_url      # ws://127.0.0.1:PORT/v1/stream
        d.http_url    # http://127.0.0.1:PORT

The launcher lives in streamd.evaluation.daemon (`streamd bench` uses it from an installed
streamd); this module keeps the names tests import. A daemon that does not start, does not
stop or exits non-zero raises DaemonError with its log.
"""

from __future__ import annotations

from streamd.evaluation.daemon import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Daemon,
    DaemonError,
    running_daemon,
)

__all__ = ["READY_TIMEOUT_S", "STOP_TIMEOUT_S", "Daemon", "DaemonError", "running_daemon"]
