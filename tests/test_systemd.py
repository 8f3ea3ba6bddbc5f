"""systemd integration: the sd_notify client, the unit file, the sample configuration, and the
daemon's READY/WATCHDOG/STOPPING messages seen by a fake service manager."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamd.errors import ConfigError
from streamd.server.app import SHUTDOWN_TIMEOUT_S
from streamd.server.config import Config, load_config
from streamd.server.notify import Notifier
from tests.daemon import running_daemon

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "streamd.service"
SAMPLE_ENV = SYSTEMD_DIR / "streamd.env"
SAMPLE_TOML = SYSTEMD_DIR / "streamd.toml"
RECV_TIMEOUT_S = 5.0
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes including the NUL


# --- a fake service manager ------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    fields: Mapping[str, str]
    pid: int  # the sender, from SCM_CREDENTIALS (what NotifyAccess=main checks)
    at: float  # time.monotonic() on receipt


class FakeManager:
    """The receiving end of $NOTIFY_SOCKET, as systemd binds it (SOCK_DGRAM, SO_PASSCRED)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.env_value = "@" + address[1:].decode() if isinstance(address, bytes) else address

    def recv(self, timeout_s: float = RECV_TIMEOUT_S) -> Notification:
        self.sock.settimeout(timeout_s)
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        return Notification(fields, pid, time.monotonic())

    def pending(self) -> list[Notification]:
        """Everything already queued, without waiting."""
        out: list[Notification] = []
        while True:
            try:
                out.append(self.recv(timeout_s=0.0))
            except (BlockingIOError, TimeoutError):
                return out

    def close(self) -> None:
        self.sock.close()


class Collector:
    """Receives in a thread so that a chatty daemon never finds the queue full.

    on_receive runs in that thread as each message arrives, to observe the sender's state at
    that moment."""

    def __init__(
        self, manager: FakeManager, on_receive: Callable[[Notification], None] | None = None
    ) -> None:
        self.manager = manager
        self.on_receive = on_receive
        self.received: list[Notification] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.manager.recv(timeout_s=0.05)
            except TimeoutError:
                continue
            if self.on_receive is not None:
                self.on_receive(n)
            with self._lock:
                self.received.append(n)

    def snapshot(self) -> list[Notification]:
        with self._lock:
            return list(self.received)

    def wait_for(
        self, what: str, predicate: Callable[[list[Notification]], bool], timeout_s: float
    ) -> list[Notification]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.snapshot()
            if predicate(got):
                return got
            self._stop.wait(0.02)  # polling a thread's list; the deadline is what bounds it
        raise AssertionError(f"no {what} within {timeout_s} s; got {self.snapshot()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, unless it is too long for an AF_UNIX path (deep pytest base directories)."""
    if len(str(tmp_path / "notify.sock")) <= _SUN_PATH_MAX:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="sdn") as short:
        yield Path(short)


@pytest.fixture
def manager(socket_dir: Path) -> Iterator[FakeManager]:
    m = FakeManager(str(socket_dir / "notify.sock"))
    yield m
    m.close()


# --- Notifier ----------------------------------------------------------------------------------


def test_messages_reach_a_filesystem_socket(manager: FakeManager) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": manager.env_value})
    assert notifier.enabled

    notifier.ready("model tiny.en loaded, listening on ws://127.0.0.1:8765/v1/stream")
    got = manager.recv()
    assert got.fields == {
        "READY": "1",
        "STATUS": "model tiny.en loaded, listening on ws://127.0.0.1:8765/v1/stream",
    }
    assert got.pid == os.getpid()

    notifier.ready()
    assert manager.recv().fields == {"READY": "1"}
    notifier.status("3 sessions\nline two")  # a newline must not start a new assignment
    assert manager.recv().fields == {"STATUS": "3 sessions line two"}
    notifier.watchdog()
    assert manager.recv().fields == {"WATCHDOG": "1"}
    notifier.stopping("finalizing 2 sessions")
    assert manager.recv().fields == {"STOPPING": "1", "STATUS": "finalizing 2 sessions"}
    assert manager.pending() == []


def test_messages_reach_an_abstract_socket() -> None:
    name = f"streamd-test-{uuid.uuid4().hex}"
    manager = FakeManager(b"\0" + name.encode())
    try:
        assert manager.env_value == "@" + name
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("up")
        notifier.stopping()
        assert manager.recv().fields == {"READY": "1", "STATUS": "up"}
        assert manager.recv().fields == {"STOPPING": "1"}
    finally:
        manager.close()


def test_watchdog_interval_is_half_of_watchdog_usec(manager: FakeManager) -> None:
    sock = manager.env_value

    def interval(**env: str) -> float | None:
        return Notifier.from_env({"NOTIFY_SOCKET": sock, **env}).watchdog_interval_s

    assert interval(WATCHDOG_USEC="30000000") == 15.0
    assert interval(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())) == 15.0
    # WatchdogSec= of another process (we are a child that inherited its environment)
    assert interval(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid() + 1)) is None
    assert interval() is None
    # no socket, no watchdog: nothing could receive the pings
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, "NOTIFY_SOCKET"),
        ({"NOTIFY_SOCKET": "run/notify"}, "NOTIFY_SOCKET"),
        ({"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "30s"}, "WATCHDOG_USEC"),
        ({"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "0"}, "WATCHDOG_USEC"),
        (
            {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"},
            "WATCHDOG_PID",
        ),
    ],
)
def test_unusable_environment_is_a_config_error(env: dict[str, str], named: str) -> None:
    # systemd would otherwise wait TimeoutStartSec= for a READY=1 that never comes
    with pytest.raises(ConfigError) as caught:
        Notifier.from_env(env)
    assert str(caught.value).startswith(f"{named}=")


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000")
    notifier = Notifier.from_env()  # reads os.environ
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping("x")
    calls: list[int] = []

    def healthy() -> bool:
        calls.append(1)
        return True

    asyncio.run(asyncio.wait_for(notifier.watchdog_loop(healthy), RECV_TIMEOUT_S))
    assert calls == []

    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert Notifier.from_env().enabled


def test_send_errors_are_logged_once_and_never_raised(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = socket_dir / "gone.sock"
    manager = FakeManager(str(path))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    notifier.ready()
    assert manager.recv().fields == {"READY": "1"}
    manager.close()  # the service manager went away
    path.unlink()
    with caplog.at_level(logging.DEBUG, logger="streamd.server.notify"):
        notifier.watchdog()
        notifier.watchdog()
        notifier.stopping()
    records = [r for r in caplog.records if r.name == "streamd.server.notify"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()
    assert len(records) == 3  # the repeats are still there at debug level


def test_watchdog_loop_withholds_pings_while_unhealthy(
    manager: FakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    usec = 40_000  # a 20 ms ping interval
    notifier = Notifier.from_env({"NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": str(usec)})
    assert notifier.watchdog_interval_s == 0.02
    # what healthy() answers on successive calls; "raise" is a broken health check
    script = [True, True, False, "raise", False, True]
    calls: list[float] = []

    async def scenario() -> None:
        done = asyncio.Event()

        def healthy() -> bool:
            calls.append(time.monotonic())
            if len(calls) > len(script):
                # Every earlier call's ping was sent (synchronously) before this call was made.
                done.set()
                return False
            answer = script[len(calls) - 1]
            if answer == "raise":
                raise RuntimeError("engine probe failed")
            return bool(answer)

        task = asyncio.create_task(notifier.watchdog_loop(healthy))
        try:
            await asyncio.wait_for(done.wait(), RECV_TIMEOUT_S)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.WARNING, logger="streamd.server.notify"):
        asyncio.run(scenario())
    pings = manager.pending()
    assert [p.fields for p in pings] == [{"WATCHDOG": "1"}] * script.count(True)
    # it sleeps one interval between checks instead of spinning
    assert calls[-1] - calls[0] >= len(script) * 0.02 * 0.9
    messages = [r.getMessage() for r in caplog.records]
    # once per turn to unhealthy: at call 3, and at the final call that ends the scenario
    assert sum("withholding watchdog pings" in m for m in messages) == 2
    assert sum("health check failed" in m for m in messages) == 1
    assert sum("pings resumed" in m for m in messages) == 1


# --- the unit file -----------------------------------------------------------------------------

# Directives that may appear more than once in a section (lists that accumulate).
_REPEATABLE = frozenset(
    {"Environment", "Wants", "After", "Before", "Requires", "SystemCallFilter", "WantedBy"}
)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A strict reading of systemd's unit syntax (systemd.syntax(7)): sections, `Key=value`,
    `#`/`;` comments, trailing-backslash continuations; anything else fails the test."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = (pending + " " + raw.strip()) if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            assert m.group(1) not in sections, f"line {number}: section [{m.group(1)}] repeated"
            current = sections.setdefault(m.group(1), [])
            continue
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert m, f"line {number}: not a section or Key=value: {raw!r}"
        assert current is not None, f"line {number}: {m.group(1)} before any section"
        current.append((m.group(1), m.group(2).strip()))
    assert not pending, "file ends in a line continuation"
    for name, items in sections.items():
        keys = [k for k, _ in items]
        repeated = {k for k in keys if keys.count(k) > 1} - _REPEATABLE
        assert not repeated, f"[{name}] sets {sorted(repeated)} more than once"
    return sections


def unit_values(section: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in parse_unit(UNIT.read_text())[section]:
        out.setdefault(key, []).append(value)
    return out


def test_unit_runs_the_daemon_as_a_notify_service() -> None:
    service = unit_values("Service")
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["ExecStart"] == (
        "/opt/streamd/.venv/bin/streamd serve --config /etc/streamd/streamd.toml"
    )
    assert one["EnvironmentFile"] == "/etc/streamd/streamd.env"  # required: no "-" prefix
    assert (one["User"], one["Group"], one["SupplementaryGroups"]) == (
        "streamd",
        "streamd",
        "neuron",
    )
    assert one["StateDirectory"] == "streamd" and one["CacheDirectory"] == "streamd"
    environment = dict(e.split("=", 1) for e in service["Environment"])
    assert environment["STREAMD_CACHE_DIR"] == "/var/cache/streamd"
    # a Neuron compile cache in PrivateTmp's throwaway /var/tmp would be rebuilt every start
    assert environment["NEURON_COMPILE_CACHE_URL"].startswith("/var/cache/streamd/")
    assert int(one["TimeoutStartSec"]) >= 600  # model load + Neuron compile
    assert one["Restart"] == "on-failure"
    assert one["KillSignal"] == "SIGTERM"
    # the daemon's own shutdown (finalize sessions, then MQTT and the engine) must finish first
    assert int(one["TimeoutStopSec"]) >= SHUTDOWN_TIMEOUT_S + 15
    assert 10 <= int(one["WatchdogSec"]) <= 120
    assert unit_values("Install")["WantedBy"] == ["multi-user.target"]


def test_unit_hardening_leaves_neuron_devices_reachable() -> None:
    service = {k: v[-1] for k, v in unit_values("Service").items()}
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}, want {value!r}"
    # Each of these closes /dev/neuron*: ProtectClock implies DeviceAllow=char-rtc, and any
    # DeviceAllow= switches DevicePolicy=auto to an allow list.
    for key in ("PrivateDevices", "DeviceAllow", "ProtectClock"):
        assert service.get(key, "no") == "no", f"{key}= would hide the Neuron devices"
    assert service.get("DevicePolicy", "auto") == "auto"
    assert "MemoryDenyWriteExecute" not in service  # oneDNN JIT-compiles torch's CPU kernels


def test_unit_command_line_is_accepted_by_streamd() -> None:
    from streamd.cli import build_parser

    argv = shlex.split(unit_values("Service")["ExecStart"][0])
    assert argv[0].endswith("/streamd")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert Path(args.config) == Path("/etc/streamd/streamd.toml")


# What a unit may say when systemd-analyze is not there to check it (systemd 252 names).
_KNOWN_DIRECTIVES = {
    "Unit": {
        "Description", "Documentation", "Wants", "Requires", "After", "Before", "BindsTo",
        "PartOf", "Conflicts", "ConditionPathExists", "AssertPathExists",
        "StartLimitIntervalSec", "StartLimitBurst", "StartLimitAction", "OnFailure",
    },
    "Service": {
        "Type", "NotifyAccess", "ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload",
        "ExecStop", "ExecStopPost", "Environment", "EnvironmentFile", "PassEnvironment",
        "User", "Group", "SupplementaryGroups", "DynamicUser", "WorkingDirectory",
        "StateDirectory", "StateDirectoryMode", "CacheDirectory", "CacheDirectoryMode",
        "LogsDirectory", "RuntimeDirectory", "ConfigurationDirectory", "TimeoutStartSec",
        "TimeoutStopSec", "TimeoutSec", "WatchdogSec", "WatchdogSignal", "Restart",
        "RestartSec", "RestartPreventExitStatus", "SuccessExitStatus", "KillSignal",
        "KillMode", "FinalKillSignal", "SendSIGKILL", "LimitNOFILE", "LimitMEMLOCK",
        "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem",
        "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateUsers", "PrivateNetwork",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset",
        "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
        "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RemoveIPC",
        "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber", "UMask",
        "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "DevicePolicy", "DeviceAllow",
        "IPAddressAllow", "IPAddressDeny", "Nice", "OOMScoreAdjust", "MemoryMax", "CPUQuota",
    },
    "Install": {"WantedBy", "RequiredBy", "Alias", "Also"},
}  # fmt: skip


def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds no unknown section, directive or bad value, and
    `systemd-analyze security` rates the sandbox OK. Without the tool, the unit is checked
    against the directive names above instead."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        for section, items in parse_unit(UNIT.read_text()).items():
            assert section in _KNOWN_DIRECTIVES, f"unknown section [{section}]"
            unknown = {k for k, _ in items} - _KNOWN_DIRECTIVES[section]
            assert not unknown, f"[{section}] has directives systemd may not know: {unknown}"
        return
    # The real ExecStart exists only on an installed machine, and verify refuses a missing
    # executable; everything else is checked as written.
    text = UNIT.read_text()
    unit = tmp_path / "streamd.service"
    unit.write_text(
        text.replace("ExecStart=/opt/streamd/.venv/bin/streamd ", f"ExecStart={sys.executable} ")
    )
    assert unit.read_text() != text

    def verify(path: Path) -> tuple[int, list[str]]:
        done = subprocess.run(
            [tool, "verify", "--man=no", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        lines = (done.stdout + done.stderr).splitlines()
        return done.returncode, [line for line in lines if path.name in line]

    code, complaints = verify(unit)
    assert code == 0 and not complaints, "\n".join(complaints)

    # this systemd-analyze does report mistakes (the check above can fail)
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomeDir=yes"))
    _code, complaints = verify(broken)
    assert any("ProtectHomeDir" in c for c in complaints), complaints

    security = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=25", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    overall = [line for line in security.stdout.splitlines() if "Overall exposure" in line]
    # exposure is 0.0 (locked down) .. 10.0; the unit rates 2.0 with systemd 252
    assert security.returncode == 0, overall or security.stderr


# --- the sample configuration ------------------------------------------------------------------


def _uncomment_examples(text: str, pattern: str) -> str:
    return re.sub(pattern, r"\1", text, flags=re.MULTILINE)


def test_sample_toml_is_valid_and_shows_the_defaults(tmp_path: Path) -> None:
    # "Values shown are the defaults": a changed default must be changed in the sample too
    assert load_config(SAMPLE_TOML, env={}) == Config()
    assert tomllib.loads(SAMPLE_TOML.read_text())["engine"] == "torch"

    # the commented-out examples are valid settings as well
    examples = tmp_path / "examples.toml"
    examples.write_text(_uncomment_examples(SAMPLE_TOML.read_text(), r"^# (\w+ = .*)$"))
    config = load_config(examples, env={})
    assert config.threads is not None and config.language is not None
    assert config.journal_dir == Path("/var/lib/streamd/journal")
    assert config.mqtt.url is not None and config.mqtt.url.startswith("mqtt://")


def read_env_file(text: str) -> dict[str, str]:
    """EnvironmentFile= as systemd reads this sample: KEY=VALUE lines, `#` comments."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        # no quotes, spaces or $: systemd and a shell would read those differently
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=[^\s\"'$`]*", line), line
        key, value = line.split("=", 1)
        out[key] = value
    return out


def test_sample_env_is_valid() -> None:
    text = SAMPLE_ENV.read_text()
    env = read_env_file(text)
    assert re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", env["NEURON_RT_VISIBLE_CORES"])
    config = load_config(SAMPLE_TOML, env=env)
    assert config.engine == "torch"  # the one engine that runs today

    # the commented-out STREAMD_* examples are settings config.py knows
    examples = read_env_file(_uncomment_examples(text, r"^#(STREAMD_\w+=.*)$"))
    assert {"STREAMD_TOKEN", "STREAMD_THREADS", "STREAMD_MQTT_URL"} <= examples.keys()
    config = load_config(SAMPLE_TOML, env=examples)
    assert config.threads is not None and config.mqtt.url is not None


# --- the daemon under a fake systemd -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path: Path, socket_dir: Path) -> None:
    manager = FakeManager(str(socket_dir / "notify.sock"))
    port = _free_port()
    listening_at_ready: list[bool] = []

    def on_receive(n: Notification) -> None:
        if n.fields.get("READY") == "1":
            # READY=1 lets systemd start the units that need us: the port must take
            # connections at that moment already, not a little later
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                listening_at_ready.append(True)
            except OSError:
                listening_at_ready.append(False)

    collector = Collector(manager, on_receive)
    watchdog_usec = 1_000_000  # pings every 0.5 s
    env = {"NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": str(watchdog_usec)}

    def count(key: str) -> Callable[[list[Notification]], int]:
        return lambda got: sum(n.fields.get(key) == "1" for n in got)

    try:
        with running_daemon(tmp_path, "--port", str(port), env=env) as daemon:
            got = collector.wait_for("READY=1", lambda g: count("READY")(g) >= 1, 60)
            ready = next(n for n in got if n.fields.get("READY") == "1")
            # from the main process: what NotifyAccess=main accepts
            assert ready.pid == daemon.process.pid
            assert daemon.http_url == f"http://127.0.0.1:{port}"
            assert listening_at_ready == [True]
            with urllib.request.urlopen(daemon.http_url + "/healthz", timeout=10) as response:
                assert response.status == 200

            def pings_after_ready(g: list[Notification]) -> int:
                return sum(n.fields.get("WATCHDOG") == "1" and n.at > ready.at for n in g)

            collector.wait_for("2 WATCHDOG=1 after READY", lambda g: pings_after_ready(g) >= 2, 30)
            assert daemon.terminate() == 0
            got = collector.wait_for("STOPPING=1", lambda g: count("STOPPING")(g) >= 1, 10)
        assert count("READY")(got) == 1
        stopping = next(n for n in got if n.fields.get("STOPPING") == "1")
        assert stopping.pid == daemon.process.pid and stopping.at > ready.at
    finally:
        collector.stop()
        manager.close()
