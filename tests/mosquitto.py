"""A real mosquitto broker on a free loopback port, and a subscriber that records what it gets.

    with running_mosquitto(tmp_path) as broker:
        broker.url             # mqtt://127.0.0.1:PORT
        broker.kill()          # SIGKILL: the broker goes away without a goodbye
        broker.start()         # back on the same port
        with Subscriber(broker.port, "streamd/#") as sub:
            sub.wait_for(3)    # blocks until 3 messages arrived (or fails at the deadline)

`Subscriber` is a threaded paho client: it is subscribed when its constructor returns, without
yielding to an asyncio event loop, so a test can be sure it listens before any code on the loop
publishes again. From async code, wait with `await asyncio.to_thread(sub.wait_for, n)`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
WAIT_TIMEOUT_S = 15.0
POLL_S = 0.02
_TCP_ESTABLISHED = "01"  # st column of /proc/net/tcp


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """One mosquitto process at a time on a port fixed at construction; start() again reuses it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://{HOST}:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self._config = workdir / "mosquitto.conf"
        self._config.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        # stderr goes to a file we opened ourselves: mosquitto started as root drops to its own
        # user, which could not open a file under the test's private temp directory
        self._log_path = workdir / "mosquitto.log"
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def start(self) -> None:
        """Start the broker and return once it accepts TCP connections."""
        assert self._process is None, "broker already started"
        self._log = self._log_path.open("ab")
        self._process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self._config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1.0):
                    return
            except OSError as exc:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self._reap(signal.SIGKILL)
                    raise AssertionError(f"mosquitto did not start: {exc}\n{self.log()}") from exc
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Graceful stop (SIGTERM); also wakes a frozen broker so that it can act on it."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """The broker vanishes: SIGKILL, no DISCONNECT to anyone, in-flight messages gone."""
        self._reap(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is read or acknowledged. Returns once the
        process is stopped, not merely signalled."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self._process.pid}/stat")
        deadline = time.monotonic() + START_TIMEOUT_S
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "mosquitto did not stop on SIGSTOP"
            time.sleep(POLL_S)

    def unread_bytes(self) -> int:
        """Bytes clients sent that the broker has not read yet (Linux; shows a frozen broker's
        backlog, e.g. a PUBLISH that will never be acknowledged)."""
        total = 0
        with open("/proc/net/tcp") as table:
            next(table)
            for row in table:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == self.port and fields[3] == _TCP_ESTABLISHED:
                    total += int(fields[4].split(":")[1], 16)
        return total

    def _reap(self, sig: int) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(sig)
                if sig != signal.SIGKILL:
                    os.kill(process.pid, signal.SIGCONT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


@contextmanager
def running_mosquitto(workdir: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload.decode("utf-8"))


class Subscriber:
    """A paho client on its own thread, subscribed to `topic` (QoS 2, so the QoS a message
    arrives with is the QoS it was published with) by the time the constructor returns."""

    def __init__(self, port: int, topic: str, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        self.messages: list[Received] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.connect(HOST, port)
        self._client.loop_start()
        try:
            self._client.subscribe(topic, qos=2)
            if not self._subscribed.wait(timeout_s):
                raise AssertionError(f"no SUBACK for {topic!r} within {timeout_s} s")
        except BaseException:
            self.close()
            raise

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        received = Received(message.topic, bytes(message.payload), message.qos, message.retain)
        with self._changed:
            self.messages.append(received)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = WAIT_TIMEOUT_S) -> list[Received]:
        """Block until at least `count` messages arrived; all of them so far."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.messages) >= count, timeout_s):
                raise AssertionError(
                    f"{len(self.messages)} of {count} messages within {timeout_s} s: "
                    f"{[m.topic for m in self.messages]}"
                )
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
