"""Publish transcripts to an MQTT broker, losing no final while the broker is away.

    sink = MqttSink(config.mqtt, journal_dir / "mqtt-spool.jsonl")
    task = asyncio.create_task(sink.run())       # connects, and reconnects forever
    sink.offer_final(session_id, final_message)   # from the event loop; never blocks
    await sink.close(timeout_s=5.0)               # flush what it can, spool the rest; run() ends

Finals go to `<topic_prefix>/<session>/final` as the protocol v1 `final` JSON, at `qos`, at
least once and in the order offered (consumers dedupe on session + `seq`). Pending finals wait
in memory, at most `queue_size` of them; beyond that they are appended to the spool file, and
while anything is in the spool new finals go there too, so order survives the spill. A spool left
by a previous run is published before anything new. Partials (when enabled) are QoS 0 and
ephemeral: the newest one per session is sent after pending finals, or dropped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

from streamd.errors import ConfigError
from streamd.server.config import MqttConfig

DEFAULT_PORT = 1883
CANCEL_AGAIN_S = 1.0  # a cancel not acted on within this was swallowed; send another
log = logging.getLogger("streamd.mqtt")
paho_log = logging.getLogger("streamd.mqtt.paho")  # paho's own lines, e.g. a reset socket


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # what logs show: never the credentials
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> BrokerAddress:
    """`mqtt://[user[:password]@]host[:port]` (port 1883 by default); ConfigError otherwise.
    Messages never repeat the URL, which may hold a password."""
    form = "mqtt.url must look like mqtt://[user:password@]host[:port]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{form}: {exc}") from exc
    if parts.scheme != "mqtt":
        raise ConfigError(f"{form}; scheme {parts.scheme!r} is not supported")
    if not parts.hostname:
        raise ConfigError(f"{form}; it names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{form}; it has a path, query or fragment")
    if port == 0:
        raise ConfigError(f"{form}; port 0 is not a broker's port")
    return BrokerAddress(
        parts.hostname,
        DEFAULT_PORT if port is None else port,
        None if parts.username is None else unquote(parts.username),
        None if parts.password is None else unquote(parts.password),
    )


class MqttSink:
    """Publishes finals (and optionally partials) for every session; see the module docstring.

    Counters for metrics: published_finals, published_partials, dropped_partials, spooled_finals
    (lines written to the spool file; close() writes queued ones again, even those that came
    from the spool), lost_finals (not JSON, topic refused by paho, or the spool unwritable: each
    logged at ERROR), reconnects (connections made after the first); and `connected`.
    """

    def __init__(self, config: MqttConfig, spool_path: Path) -> None:
        if config.url is None:
            raise ConfigError("mqtt.url is not set")
        self.broker = parse_mqtt_url(config.url)
        if config.qos not in (0, 1, 2):
            raise ConfigError(f"mqtt.qos must be 0, 1 or 2, got {config.qos}")
        if config.queue_size < 0 or config.reconnect_s <= 0:
            raise ConfigError("mqtt.queue_size must be >= 0 and mqtt.reconnect_s > 0")
        if not config.topic_prefix or "+" in config.topic_prefix or "#" in config.topic_prefix:
            raise ConfigError(f"mqtt.topic_prefix {config.topic_prefix!r} is not a topic")
        self._config = config
        self._spool_path = spool_path
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()  # oldest first
        self._partials: dict[str, bytes] = {}  # newest unsent partial per session
        self._spool_offset = 0  # bytes at the start of the spool that are already published
        self._spool_pending = self._adopt_spool()
        self._wakeup = asyncio.Event()  # something was offered
        self._drained = asyncio.Event()  # no final is pending
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self.published_finals = self.published_partials = self.dropped_partials = 0
        self.spooled_finals = self.lost_finals = self.reconnects = 0
        self.connected = False

    def offer_final(self, session_id: str, message: dict[str, Any]) -> None:
        """Queue a `final` for publishing. Never blocks on the network and never raises."""
        try:
            payload = _encode(message)
        except (TypeError, ValueError) as exc:
            self._lose(1, f"final of session {session_id} is not JSON ({exc})")
            return
        if self._partials.pop(session_id, None) is not None:
            self.dropped_partials += 1  # superseded: a partial after its final would mislead
        if self._closing or self._spool_pending or len(self._queue) >= self._config.queue_size:
            self._spool([(session_id, payload)])
        else:
            self._queue.append((session_id, payload))
        self._drained.clear()
        self._wakeup.set()

    def offer_partial(self, session_id: str, message: dict[str, Any]) -> None:
        """Send a `partial` soon if connected and not backlogged; otherwise drop (and count) it."""
        if not self._config.partials:
            return
        if not self.connected or self._spool_pending or self._closing:
            self.dropped_partials += 1
            return
        try:
            payload = _encode(message)
        except (TypeError, ValueError):
            self.dropped_partials += 1
            return
        if self._partials.pop(session_id, None) is not None:
            self.dropped_partials += 1
        self._partials[session_id] = payload
        self._wakeup.set()

    async def run(self) -> None:
        """Publish until close() (then return) or cancellation. Broker errors never end it: each
        is logged at WARNING and the connection retried every `reconnect_s`."""
        if self._closing:
            return
        task = asyncio.create_task(self._connection_loop())
        self._loop_task = task
        try:
            await asyncio.wait({task})
        finally:
            await _cancel(task)
        if not task.cancelled():
            task.result()  # the loop only ends by cancellation; anything else is a bug to surface

    async def close(self, timeout_s: float) -> None:
        """Publish pending finals for up to `timeout_s`, stop run(), and write what is still
        unpublished to the spool, which the next MqttSink on that path publishes first."""
        self._closing = True  # finals offered from now on go to the spool, behind pending ones
        task = self._loop_task
        if task is not None and not task.done():
            if self._queue or self._spool_pending:
                try:
                    async with asyncio.timeout(timeout_s):
                        await self._drained.wait()
                except TimeoutError:
                    pass
            await _cancel(task)
        self._spool_queue()
        self.dropped_partials += len(self._partials)
        self._partials.clear()
        if self._spool_pending:
            log.info("mqtt: closed with unpublished finals in %s", self._spool_path)

    async def _connection_loop(self) -> None:
        connections = 0
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    username=self.broker.username,
                    password=self.broker.password,
                    logger=paho_log,
                ) as client:
                    self.connected = True
                    if connections:
                        self.reconnects += 1
                    connections += 1
                    log.info(
                        "mqtt: connected to broker %s (%d finals queued%s)",
                        self.broker,
                        len(self._queue),
                        ", more in the spool" if self._spool_pending else "",
                    )
                    await self._serve(client)
            except (aiomqtt.MqttError, OSError) as exc:
                state = "lost" if self.connected else "unreachable"
                self.connected = False
                self.dropped_partials += len(self._partials)
                self._partials.clear()
                log.warning(
                    "mqtt: broker %s %s (%s); retrying in %s s",
                    self.broker,
                    state,
                    _describe(exc),
                    self._config.reconnect_s,
                )
            await asyncio.sleep(self._config.reconnect_s)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until the connection drops (MqttError) or this task is cancelled.

        Not a TaskGroup: on Python 3.11 a TaskGroup whose child fails can swallow a cancel
        that arrives at the same moment (close() then waits forever)."""
        watch = asyncio.create_task(self._watch(client))
        pump = asyncio.create_task(self._pump(client))
        try:
            done, _ = await asyncio.wait({watch, pump}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            pump.cancel()
            await asyncio.wait({watch, pump})
        for task in done:
            task.result()  # the MqttError that ended the connection, or a bug

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        # We subscribe to nothing, so this only ends by raising MqttError when the connection
        # drops; _serve then cancels a publish waiting for its PUBACK, which would otherwise
        # wait out aiomqtt's whole timeout on a dead connection.
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as exc:
            raise aiomqtt.MqttError("disconnected") from exc.__cause__

    async def _pump(self, client: aiomqtt.Client) -> None:
        while True:
            if not self._queue and self._spool_pending:
                self._refill_from_spool()
            elif self._queue:
                session, payload = self._queue[0]
                topic = self._topic(session, "final")
                try:
                    # for QoS 1/2 this returns once the broker acknowledged the message
                    # (paho's on_publish after PUBACK/PUBCOMP): only then is it published
                    await client.publish(topic, payload, qos=self._config.qos)
                    self.published_finals += 1
                except ValueError as exc:  # paho refuses the topic (a wildcard in the session)
                    self._lose(1, f"cannot publish to {topic!r} ({exc})")
                self._queue.popleft()  # only now: a publish cut short is sent again
            elif self._partials:
                session = next(iter(self._partials))
                payload = self._partials.pop(session)
                try:
                    await client.publish(self._topic(session, "partial"), payload, qos=0)
                    self.published_partials += 1
                except ValueError:
                    self.dropped_partials += 1
            else:
                self._drained.set()
                self._wakeup.clear()
                await self._wakeup.wait()

    def _refill_from_spool(self) -> None:
        """Move the spool's next lines into the (empty) queue; remove the spool once all of it
        is published. Lines are split on b"\\n" only: the JSON may hold U+2028 and the like."""
        try:
            with self._spool_path.open("rb") as spool:
                spool.seek(self._spool_offset)
                lines = [spool.readline() for _ in range(max(1, self._config.queue_size))]
        except FileNotFoundError:  # removed by hand: nothing left to publish
            lines = []
        if not any(lines):
            self._spool_path.unlink(missing_ok=True)
            self._spool_offset = 0
            self._spool_pending = False  # new finals may queue in memory again
            return
        for line in filter(None, lines):
            self._spool_offset += len(line)
            try:
                entry = json.loads(line)
                self._queue.append((str(entry["session"]), _encode(entry["message"])))
            except (ValueError, TypeError, KeyError):
                log.warning("mqtt: skipped an unreadable line in %s", self._spool_path)

    def _spool(self, finals: list[tuple[str, bytes]]) -> None:
        data = b"".join(_spool_line(session, payload) for session, payload in finals)
        try:
            self._spool_path.parent.mkdir(parents=True, exist_ok=True)
            with self._spool_path.open("ab") as spool:
                spool.write(data)
        except OSError as exc:
            self._lose(len(finals), f"cannot append to {self._spool_path} ({exc})")
            return
        self.spooled_finals += len(finals)
        self._spool_pending = True

    def _spool_queue(self) -> None:
        """Rewrite the spool as the queued finals, then its unpublished rest (they are newer)."""
        if not self._queue and self._spool_offset == 0:
            return  # the spool file, if any, already holds exactly what is unpublished
        queued = [_spool_line(session, payload) for session, payload in self._queue]
        temp = self._spool_path.with_name(self._spool_path.name + ".tmp")
        try:
            rest = b""
            if self._spool_pending and self._spool_path.exists():
                with self._spool_path.open("rb") as spool:
                    spool.seek(self._spool_offset)
                    rest = spool.read()
            data = b"".join(queued) + rest
            if data:
                self._spool_path.parent.mkdir(parents=True, exist_ok=True)
                with temp.open("wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())  # this runs at shutdown, before the process goes
                os.replace(temp, self._spool_path)
            else:
                self._spool_path.unlink(missing_ok=True)
        except OSError as exc:
            self._lose(len(queued), f"cannot write {self._spool_path} ({exc})")
            return
        self._queue.clear()
        self.spooled_finals += len(queued)
        self._spool_offset = 0
        self._spool_pending = bool(data)

    def _adopt_spool(self) -> bool:
        """Whether a previous run left finals in the spool (they will be published first)."""
        try:
            with self._spool_path.open("rb") as spool:
                if spool.seek(0, os.SEEK_END) == 0:
                    return False
                spool.seek(-1, os.SEEK_END)
                torn = spool.read(1) != b"\n"
            if torn:  # a crash mid-line: end it, or the next final would be glued onto it
                with self._spool_path.open("ab") as spool:
                    spool.write(b"\n")
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ConfigError(f"mqtt spool {self._spool_path}: {exc}") from exc
        log.info("mqtt: %s holds finals from a previous run; they go first", self._spool_path)
        return True

    def _topic(self, session: str, kind: str) -> str:
        return f"{self._config.topic_prefix}/{session}/{kind}"

    def _lose(self, count: int, why: str) -> None:
        self.lost_finals += count
        log.error("mqtt: %d final(s) lost: %s", count, why)


def _encode(message: Any) -> bytes:
    # the same text the websocket sends (connection.py), so consumers parse one format
    return json.dumps(message, ensure_ascii=False).encode("utf-8")


def _spool_line(session: str, payload: bytes) -> bytes:
    return b'{"session": ' + _encode(session) + b', "message": ' + payload + b"}\n"


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it is done, whatever happens to the first cancel."""
    while not task.done():
        # again if need be: on Python 3.11 asyncio.wait_for (inside aiomqtt's publish) returns
        # normally, swallowing the cancel, when its future completes at the same moment
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_S)


def _describe(error: BaseException | None) -> str:
    # aiomqtt puts the reason (refused, reset, timed out) in the cause of a generic message
    parts: list[str] = []
    while error is not None:
        parts.append(str(error) or type(error).__name__)
        error = error.__cause__
    return ": ".join(parts) or "connection closed"
