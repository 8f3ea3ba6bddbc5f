"""MqttSink against a real mosquitto broker (tests/mosquitto.py) and a real subscriber."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from streamd.errors import ConfigError
from streamd.server.config import MqttConfig
from streamd.server.mqtt import BrokerAddress, MqttSink, parse_mqtt_url
from tests.mosquitto import Mosquitto, Received, Subscriber, free_port, running_mosquitto

RECONNECT_S = 0.1
DEADLINE_S = 15.0
POLL_S = 0.01
CLOSE_TIMEOUT_S = 5.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "broker") as running:
        yield running


def final(seq: int, segment: int) -> dict[str, Any]:
    """A protocol v1 `final`, with non-ASCII text so the encoding is checked too."""
    return {
        "type": "final",
        "seq": seq,
        "segment": segment,
        "start": segment * 2.0,
        "end": segment * 2.0 + 1.5,
        "text": f" Café № {segment} — 日本語",
        "words": [
            {
                "word": " Café",
                "start": segment * 2.0,
                "end": segment * 2.0 + 0.4,
                "probability": 0.9,
            }
        ],
        "language": "en",
        "avg_logprob": -0.25,
        "no_speech_prob": 0.01,
    }


def partial(seq: int, segment: int) -> dict[str, Any]:
    return {
        "type": "partial",
        "seq": seq,
        "segment": segment,
        "start": 0.0,
        "end": 1.0,
        "text": " caf",
    }


def wire(message: dict[str, Any]) -> bytes:
    """What the websocket sends, byte for byte: the JSON consumers must get from MQTT too."""
    return json.dumps(message, ensure_ascii=False).encode("utf-8")


def sink_for(url: str, spool: Path, **options: Any) -> MqttSink:
    return MqttSink(MqttConfig(url=url, reconnect_s=RECONNECT_S, **options), spool)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(POLL_S)


async def received(subscriber: Subscriber, count: int) -> list[Received]:
    # the wait blocks a thread, not the event loop the sink publishes from
    return await asyncio.to_thread(subscriber.wait_for, count)


@asynccontextmanager
async def running(sink: MqttSink) -> AsyncIterator[None]:
    task = asyncio.create_task(sink.run())
    try:
        yield
    finally:
        await sink.close(CLOSE_TIMEOUT_S)
        await asyncio.wait_for(task, CLOSE_TIMEOUT_S)  # run() returns once closed


def per_session_seqs(messages: list[Received]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for m in messages:
        prefix, session, kind = m.topic.split("/")
        assert (prefix, kind) == ("streamd", "final")
        seqs.setdefault(session, []).append(m.json()["seq"])
    return seqs


def spool_lines(spool: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = [json.loads(line) for line in spool.read_bytes().split(b"\n") if line]
    return [(row["session"], row["message"]) for row in rows]


def test_finals_arrive_as_exact_json_at_qos_1_in_order(broker: Mosquitto, tmp_path: Path) -> None:
    async def scenario() -> None:
        offered = [(s, final(seq, seq)) for seq in range(5) for s in ("a", "b")]
        with Subscriber(broker.port, "streamd/#") as subscriber:
            sink = sink_for(broker.url, tmp_path / "spool.jsonl")
            for session, message in offered[:4]:  # queued before there is a connection
                sink.offer_final(session, message)
            async with running(sink):
                await until(lambda: sink.connected, "connected")
                for session, message in offered[4:]:
                    sink.offer_final(session, message)
                got = await received(subscriber, len(offered))
                await until(lambda: sink.published_finals == len(offered), "all counted")
        assert [(m.topic, m.payload) for m in got] == [
            (f"streamd/{s}/final", wire(message)) for s, message in offered
        ]
        # subscribed at QoS 2, so a message arrives with the QoS it was published with
        assert {(m.qos, m.retain) for m in got} == {(1, False)}
        assert (sink.spooled_finals, sink.lost_finals) == (0, 0)
        assert not (tmp_path / "spool.jsonl").exists()

    asyncio.run(scenario())


@pytest.mark.parametrize("partials", [True, False])
def test_partials_are_published_only_when_enabled(
    broker: Mosquitto, tmp_path: Path, partials: bool
) -> None:
    async def scenario() -> list[Received]:
        with Subscriber(broker.port, "streamd/#") as subscriber:
            sink = sink_for(broker.url, tmp_path / "spool.jsonl", partials=partials)
            async with running(sink):
                await until(lambda: sink.connected, "connected")
                sink.offer_partial("a", partial(3, 1))
                sink.offer_final("b", final(7, 2))
                # pending partials go out right after pending finals, so a later final is a
                # marker: a partial that was going to be sent arrives before it
                await until(lambda: sink.published_finals == 1, "first final published")
                sink.offer_final("c", final(8, 3))
                return await received(subscriber, 3 if partials else 2)

    got = asyncio.run(scenario())
    if partials:
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("streamd/b/final", wire(final(7, 2)), 1),
            ("streamd/a/partial", wire(partial(3, 1)), 0),
            ("streamd/c/final", wire(final(8, 3)), 1),
        ]
    else:
        assert [m.topic for m in got] == ["streamd/b/final", "streamd/c/final"]


def test_broker_killed_mid_publish_loses_no_final(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd.mqtt")
    spool = tmp_path / "mqtt-spool.jsonl"
    offered = {s: [final(seq, seq) for seq in range(8)] for s in ("a", "b")}

    def offer(seqs: range) -> None:
        for seq in seqs:
            for session in ("a", "b"):
                sink.offer_final(session, offered[session][seq])

    sink = sink_for(broker.url, spool, queue_size=4)

    async def scenario() -> list[Received]:
        with Subscriber(broker.port, "streamd/#") as before:
            async with running(sink):
                offer(range(2))
                # delivered, not just acknowledged: a killed broker loses what it has not
                # forwarded yet, which no publisher can prevent
                await received(before, 4)
                await until(lambda: sink.published_finals == 4, "first finals published")
                # a frozen broker reads nothing, so a2 is sent but never acknowledged
                broker.freeze()
                offer(range(2, 3))
                await until(lambda: broker.unread_bytes() > 0, "a2 sent to the frozen broker")
                assert sink.published_finals == 4  # not counted without its PUBACK
                broker.kill()
                # well within aiomqtt's 10 s publish timeout: the drop itself is noticed
                await until(lambda: not sink.connected, "disconnect noticed", timeout_s=5.0)
                offer(range(3, 8))  # a2 b2 a3 b3 fill the queue; the other 8 spill
                assert spool.exists() and sink.spooled_finals == 8
                broker.start()
                # subscribed before the event loop (and so the sink) runs again
                with Subscriber(broker.port, "streamd/#") as after:
                    await until(lambda: sink.published_finals == 16, "all published")
                    got_after = await received(after, 12)
                    await until(lambda: not spool.exists(), "spool drained and removed")
            return before.messages + got_after

    got = asyncio.run(scenario())
    seqs = per_session_seqs(got)
    for session, finals in offered.items():
        # at least once, in order: a re-sent final may repeat, nothing is missing or reordered
        assert seqs[session] == sorted(seqs[session]), seqs
        assert list(dict.fromkeys(seqs[session])) == list(range(8)), seqs
        payloads = {m.payload for m in got if m.topic == f"streamd/{session}/final"}
        assert payloads == {wire(message) for message in finals}
    assert sink.reconnects == 1 and sink.lost_finals == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"broker 127.0.0.1:{broker.port} lost (" in w for w in warnings), warnings


def test_sink_started_while_broker_is_down_retries_visibly_then_delivers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd.mqtt")
    broker = Mosquitto(tmp_path / "broker")  # its port is chosen but nothing listens yet
    sink = sink_for(broker.url, tmp_path / "spool.jsonl", partials=True)
    retry_line = f"mqtt: broker 127.0.0.1:{broker.port} unreachable ("

    def retries() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(retry_line)]

    async def scenario() -> list[Received]:
        async with running(sink):
            sink.offer_final("a", final(0, 0))
            await until(lambda: len(retries()) >= 2, "two retry lines")
            sink.offer_partial("a", partial(1, 1))  # nobody to send it to: dropped
            assert sink.dropped_partials == 1 and not sink.connected
            broker.start()
            with Subscriber(broker.port, "streamd/#") as subscriber:
                return await received(subscriber, 1)

    try:
        got = asyncio.run(scenario())
    finally:
        broker.stop()
    assert [(m.topic, m.payload) for m in got] == [("streamd/a/final", wire(final(0, 0)))]
    retry = next(r for r in caplog.records if r.getMessage().startswith(retry_line))
    assert retry.levelno == logging.WARNING
    assert retry.getMessage().endswith(f"); retrying in {RECONNECT_S} s")
    assert "Connection refused" in retry.getMessage()
    connected = [r for r in caplog.records if "connected to broker" in r.getMessage()]
    assert [r.levelno for r in connected] == [logging.INFO]
    assert sink.reconnects == 0  # the first connection is not a reconnect


def test_close_with_broker_down_writes_pending_finals_to_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd.mqtt")
    spool = tmp_path / "journal" / "mqtt-spool.jsonl"
    sink = sink_for(f"mqtt://127.0.0.1:{free_port()}", spool, queue_size=2)
    offered = [("a", final(0, 0)), ("b", final(0, 0)), ("a", final(1, 1))]

    async def scenario() -> None:
        task = asyncio.create_task(sink.run())
        for session, message in offered:
            sink.offer_final(session, message)
        assert spool_lines(spool) == offered[2:]  # the queue holds two; the third spilled
        await until(lambda: "unreachable" in caplog.text, "a connection attempt")
        await sink.close(timeout_s=0.2)
        await asyncio.wait_for(task, CLOSE_TIMEOUT_S)

    asyncio.run(scenario())
    assert spool_lines(spool) == offered  # queued ones first: they are older
    assert (sink.spooled_finals, sink.published_finals, sink.lost_finals) == (3, 0, 0)
    sink.offer_final("b", final(1, 1))  # after close: still not lost
    assert spool_lines(spool) == [*offered, ("b", final(1, 1))]


def test_spool_left_by_a_previous_run_is_published_first(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "mqtt-spool.jsonl"
    old = [("old", final(seq, seq)) for seq in range(3)]
    lines = [json.dumps({"session": s, "message": m}, ensure_ascii=False) for s, m in old]
    # the previous run died while writing a line: that line is skipped, not glued to the next
    spool.write_text("\n".join(lines) + '\n{"session": "old", "mess', encoding="utf-8")
    sink = sink_for(broker.url, spool)
    sink.offer_final("new", final(0, 0))  # offered before run(): still after the old ones

    async def scenario() -> list[Received]:
        with Subscriber(broker.port, "streamd/#") as subscriber:
            async with running(sink):
                await received(subscriber, 4)
                await until(lambda: not spool.exists(), "spool drained and removed")
                sink.offer_final("new", final(1, 1))
                return await received(subscriber, 5)

    got = asyncio.run(scenario())
    expected = [*old, ("new", final(0, 0)), ("new", final(1, 1))]
    assert [(m.topic, m.payload) for m in got] == [
        (f"streamd/{s}/final", wire(message)) for s, message in expected
    ]
    assert sink.published_finals == 5
    assert any("unreadable line" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", BrokerAddress("broker", 1883)),
        ("mqtt://10.0.0.5:1884", BrokerAddress("10.0.0.5", 1884)),
        ("mqtt://[::1]:1885/", BrokerAddress("::1", 1885)),
        ("mqtt://ann:p%40ss%3Aword@broker", BrokerAddress("broker", 1883, "ann", "p@ss:word")),
    ],
)
def test_good_urls(url: str, expected: BrokerAddress) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "broker:1883",
        "http://broker",
        "mqtts://broker",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://broker:0",
        "mqtt://broker:70000",
        "mqtt://ann:secret@broker:port",
        "mqtt://broker/topic",
        "mqtt://broker?qos=1",
    ],
)
def test_bad_urls_are_config_errors(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.url must look like mqtt://") as error:
        MqttSink(MqttConfig(url=url), tmp_path / "spool.jsonl")
    assert "secret" not in str(error.value)  # the URL may hold a password: never echoed


def test_unusable_settings_are_config_errors(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    for config in (
        MqttConfig(),
        MqttConfig(url="mqtt://broker", qos=3),
        MqttConfig(url="mqtt://broker", queue_size=-1),
        MqttConfig(url="mqtt://broker", reconnect_s=0),
        MqttConfig(url="mqtt://broker", topic_prefix="streamd/#"),
    ):
        with pytest.raises(ConfigError):
            MqttSink(config, spool)
