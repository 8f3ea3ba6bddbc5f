"""The daemon with `--mqtt-url`: a websocket client's finals also reach a real mosquitto, and a
broker that is down at first loses none of them."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from tests.audio_fixtures import shared_audio_dir
from tests.daemon import running_daemon
from tests.mosquitto import Mosquitto, Subscriber, running_mosquitto
from tests.ws_client import StreamClient, pcm_of, run, stream_client, words

JFK = shared_audio_dir() / "en" / "jfk.flac"


def _stream_jfk(url: str) -> StreamClient:
    async def scenario() -> StreamClient:
        async with stream_client(url) as client:
            await client.start(sample_rate=16_000, encoding="pcm_s16le", channels=1)
            await client.send_audio(pcm_of(JFK))
            await client.end()
        return client

    return run(scenario())


def _metric(http_url: str, name: str) -> float:
    with urllib.request.urlopen(http_url + "/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_finals_are_published_to_mqtt_as_sent(tmp_path: Path) -> None:
    with (
        running_mosquitto(tmp_path / "broker") as broker,
        Subscriber(broker.port, "streamd/+/final") as subscriber,
        running_daemon(tmp_path, "--mqtt-url", broker.url, "--set", "mqtt.partials=1") as daemon,
    ):
        client = _stream_jfk(daemon.ws_url)
        finals = client.finals()
        assert "ask not what your country can do for you" in words(client.text())
        received = subscriber.wait_for(len(finals))
        session = client.messages[0]["session"]
        assert [m.topic for m in received] == [f"streamd/{session}/final"] * len(finals)
        assert [m.json() for m in received] == finals  # the same messages, in order
        assert all(m.qos == 1 for m in received)
        assert _metric(daemon.http_url, "streamd_mqtt_published_finals") == len(finals)
        assert _metric(daemon.http_url, "streamd_mqtt_connected") == 1.0


def test_a_broker_that_comes_up_late_still_gets_every_final(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # chosen port, not started yet
    retry_s = 5.0
    with running_daemon(
        tmp_path, "--mqtt-url", broker.url, "--set", f"mqtt.reconnect_s={retry_s}"
    ) as daemon:
        client = _stream_jfk(daemon.ws_url)
        finals = client.finals()
        assert finals
        assert _metric(daemon.http_url, "streamd_mqtt_connected") == 0.0
        assert "unreachable" in daemon.log()  # the visible retry loop
        broker.start()
        started = time.monotonic()
        try:
            with Subscriber(broker.port, "streamd/+/final") as subscriber:
                # the daemon retries every retry_s; still unconnected now means nothing was
                # published before we subscribed (it would fail ~1 run in 1000, never pass wrongly)
                assert time.monotonic() - started < retry_s
                assert _metric(daemon.http_url, "streamd_mqtt_connected") == 0.0
                received = subscriber.wait_for(len(finals), timeout_s=3 * retry_s)
            assert [m.json() for m in received] == finals
        finally:
            broker.stop()
    journal = next((tmp_path / "journal").glob("*.jsonl"))
    journaled = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r for r in journaled if r["type"] == "final"] == finals
