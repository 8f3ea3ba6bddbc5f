"""systemd's notify protocol: tell the service manager we are ready, alive, or stopping.

    notifier = Notifier.from_env()          # a no-op outside systemd (no $NOTIFY_SOCKET)
    notifier.ready("listening on ws://...")  # after the model is loaded and warmed up
    task = asyncio.create_task(notifier.watchdog_loop(healthy))
    ...
    notifier.stopping("finalizing 3 sessions")

No library (python-systemd, sdnotify): the protocol is one datagram of `KEY=VALUE` lines sent to
the AF_UNIX socket named by $NOTIFY_SOCKET (sd_notify(3)), which is less code than a dependency
and works in a venv without libsystemd headers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

from streamd.errors import ConfigError

log = logging.getLogger(__name__)

# systemd asks for pings at least every WATCHDOG_USEC; sd_watchdog_enabled(3) recommends half
WATCHDOG_FRACTION = 0.5
# A datagram send blocks only while the manager's queue is full. Waiting a little keeps READY=1
# from being lost to a busy PID 1 (a lost READY means a restart after TimeoutStartSec=), and
# the bound keeps a wedged manager from stalling the event loop.
SEND_TIMEOUT_S = 0.5
_USEC_PER_S = 1_000_000


class Notifier:
    """Sends sd_notify messages to one socket address; every method is a no-op without one.

    Send errors (the manager went away, its queue is full) never reach the caller: the first is
    logged as a warning and later ones at debug level, because the daemon must keep serving
    clients whether or not anyone listens for its notifications.
    """

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        """address: a filesystem path, or bytes starting with NUL for an abstract socket;
        None for a notifier that sends nothing. watchdog_usec: systemd's WatchdogSec=."""
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._send_failed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through $NOTIFY_SOCKET, $WATCHDOG_USEC, $WATCHDOG_PID.

        Without $NOTIFY_SOCKET (not started by systemd, or not Type=notify) it sends nothing.
        The watchdog is on only when $WATCHDOG_PID is unset or names this process: a child that
        inherited the variables must not ping on its parent's behalf.
        Raises ConfigError for an address or interval this code cannot use, rather than leaving
        systemd to time out the start many minutes later.
        """
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls(None)
        address: str | bytes
        if raw.startswith("@"):
            # abstract namespace: the name is the bytes after a leading NUL, not NUL-terminated
            address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            address = raw
        else:
            # vsock: (systemd >= 253, for VMs) and relative paths are not ours to guess at
            raise ConfigError(f"NOTIFY_SOCKET={raw!r}: only /path and @abstract are supported")
        return cls(address, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """True when messages go somewhere (we run under systemd with Type=notify)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call `watchdog()` (half of WatchdogSec=); None when no watchdog is on."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec * WATCHDOG_FRACTION / _USEC_PER_S

    def ready(self, status: str = "") -> None:
        """READY=1: startup is done; systemd starts dependent units and stops the start timer."""
        self._send("READY=1", status)

    def stopping(self, status: str = "") -> None:
        """STOPPING=1: shutdown began (say so before finalizing sessions, which takes time)."""
        self._send("STOPPING=1", status)

    def status(self, text: str) -> None:
        """STATUS=: one line shown by `systemctl status`."""
        self._send(None, text)

    def watchdog(self) -> None:
        """WATCHDOG=1: we are alive; systemd kills and restarts us if these stop coming."""
        self._send("WATCHDOG=1", "")

    async def watchdog_loop(self, healthy: Callable[[], bool]) -> None:
        """Ping the watchdog every `watchdog_interval_s` while `healthy()` says so; run until
        cancelled. Returns at once when there is no watchdog.

        An unhealthy daemon (a wedged engine, a stuck scheduler) gets no ping, so systemd
        restarts it after WatchdogSec=; a `healthy` that raises counts as unhealthy.
        """
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        was_healthy = True
        while True:
            try:
                ok = healthy()
            except Exception:
                log.exception("health check failed; not pinging the watchdog")
                ok = False
            if ok:
                self.watchdog()
            if ok != was_healthy:
                log.warning(
                    "healthy again: watchdog pings resumed"
                    if ok
                    else "unhealthy: withholding watchdog pings, systemd will restart us"
                )
            was_healthy = ok
            await asyncio.sleep(interval_s)

    def _send(self, state: str | None, status: str) -> None:
        if self._address is None:
            return
        lines = [state] if state else []
        if status:
            # a newline would end the STATUS= field and start a bogus assignment
            lines.append("STATUS=" + " ".join(status.splitlines()))
        if not lines:
            return
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT_S)
                sock.sendto(payload, self._address)
        except OSError as exc:
            level = logging.DEBUG if self._send_failed else logging.WARNING
            log.log(level, "cannot notify systemd at %r: %s", self._address, exc)
            self._send_failed = True


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError as exc:
            raise ConfigError(f"WATCHDOG_PID={pid!r} is not a process id") from exc
    try:
        usec = int(raw)
    except ValueError as exc:
        raise ConfigError(f"WATCHDOG_USEC={raw!r} is not a number of microseconds") from exc
    if usec <= 0:
        raise ConfigError(f"WATCHDOG_USEC={raw!r} must be positive")
    return usec
