"""The daemon against real clients: protocol v1 (DESIGN.md §5), limits and bad input, the
journal, resume, graceful shutdown, and the HTTP endpoints.

Every test talks to the real `streamd serve` (tests/daemon.py) on loopback with model tiny.en
and real audio from ../shared/audio. Daemons are shared per module where tests cannot disturb
each other (a start costs ~10 s of model loading); the shutdown tests get their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jiwer
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.audio_fixtures import shared_audio_dir
from tests.daemon import Daemon, running_daemon
from tests.ws_client import (
    WAIT_S,
    StreamClient,
    pcm_of,
    run,
    stream_client,
    words,
)

pytestmark = pytest.mark.slow

AUDIO_DIR = shared_audio_dir()  # fails clearly if ../shared/audio is missing

JFK = AUDIO_DIR / "en" / "jfk.flac"  # 11.0 s
JFK_S = 11.0
ASK_NOT = "ask not what your country can do for you"
ASK_WHAT = "ask what you can do for your country"
MAN_SAID = AUDIO_DIR / "en" / "librispeech_a_man_said.flac"  # 4.65 s
HARVARD_8K = AUDIO_DIR / "en" / "osr_harvard_list72_8khz.wav"  # 35.55 s, 8 kHz
# jfk is cut here for "mid-utterance": inside "what your country can do for you" (5.5-7.7 s),
# after "ask not" (3.7-4.3 s), before "ask what you can do for your country" (8.3-10.4 s)
CUT_S = 7.0
MAX_FRAME_BYTES = 4096  # the shared daemon's max_frame_bytes; its hard limit is 4x this
TOKEN = "s3cret"
DAEMON_ARGS = ("--threads", "1")  # two cores, shared: one torch thread decodes faster here
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
PROMPT_CLOSE_S = 10.0  # an idle connection is closed in milliseconds; this is generous
STOP_S = 60.0  # SIGTERM -> exit, with sessions to finalize


# --- daemons ---------------------------------------------------------------------------------


def _no_tracebacks(daemon: Daemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log and "exception was never retrieved" not in log, log[-6000:]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Open to all, 16 sessions, frames up to MAX_FRAME_BYTES."""
    tmp = tmp_path_factory.mktemp("daemon")
    with running_daemon(tmp, *DAEMON_ARGS, "--set", f"max_frame_bytes={MAX_FRAME_BYTES}") as d:
        yield d
    _no_tracebacks(d)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """--token s3cret --max-sessions 1."""
    tmp = tmp_path_factory.mktemp("guarded")
    with running_daemon(tmp, *DAEMON_ARGS, "--token", TOKEN, "--max-sessions", "1") as d:
        yield d
    _no_tracebacks(d)


# --- helpers ---------------------------------------------------------------------------------


def journal(d: Daemon, session: str) -> list[dict[str, Any]]:
    path = d.journal_dir / f"{session}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def closed_journal(d: Daemon, session: str) -> list[dict[str, Any]]:
    """The session's journal once its stream is over (the `closed` record written)."""
    wait_until(lambda: journal(d, session)[-1]["type"] == "closed", f"closed record of {session}")
    return journal(d, session)


def journal_finals(d: Daemon, session: str) -> list[dict[str, Any]]:
    return [r for r in journal(d, session) if r["type"] == "final"]


def assert_seq_increasing(client: StreamClient) -> None:
    assert all(isinstance(m.get("seq"), int) for m in client.messages), client.brief()
    seqs = [int(m["seq"]) for m in client.messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), (
        f"seq not strictly increasing over the connection: {seqs}\n{client.brief()}"
    )


def text_of(finals: list[dict[str, Any]]) -> str:
    return words(" ".join(f["text"] for f in finals))


def http_get(d: Daemon, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET `path` sent verbatim (no client-side normalisation of `..` or %-escapes)."""
    netloc = urlsplit(d.http_url).netloc
    conn = http.client.HTTPConnection(netloc, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def metrics(d: Daemon) -> dict[str, Any]:
    """name -> family, from GET /metrics."""
    status, headers, body = http_get(d, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain"), headers
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of sample `name` (e.g. streamd_errors_total) with `labels`; 0 if absent."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def healthz(d: Daemon) -> dict[str, Any]:
    status, headers, body = http_get(d, "/healthz")
    assert status == 200, body
    assert headers["Content-Type"] == "application/json", headers
    data: dict[str, Any] = json.loads(body)
    return data


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)  # polling interval of a deadline-bounded wait


async def wait_sessions(d: Daemon, count: int, timeout_s: float = 60.0) -> None:
    """Poll /healthz until it reports `count` sessions (sessions still finishing count)."""
    deadline = time.monotonic() + timeout_s
    while (got := (await asyncio.to_thread(healthz, d))["sessions"]) != count:
        assert time.monotonic() < deadline, f"/healthz sessions stayed {got}, expected {count}"
        await asyncio.sleep(0.05)  # polling interval of a deadline-bounded wait


async def attempt_session(url: str) -> str:
    """Try to open a session: "refused", "closed <code>" or "ready"."""
    try:
        async with stream_client(url) as client:
            await client.send_json({"type": "start"})
            try:
                reply = await client.wait_for(lambda m: m["type"] in ("ready", "error"))
            except AssertionError:
                return f"closed {client.close_code}"
            return "ready" if reply["type"] == "ready" else f"error {reply['code']}"
    except (OSError, InvalidHandshake, ConnectionClosed) as exc:
        return f"refused ({type(exc).__name__})"


async def transcribe(
    url: str, pcm: bytes, *, realtime: float | None = None, **start: Any
) -> tuple[StreamClient, dict[str, Any], dict[str, Any]]:
    """Stream `pcm` in one session: (client, ready, closed)."""
    async with stream_client(url) as client:
        ready = await client.start(**start)
        await client.send_audio(pcm, realtime=realtime)
        closed = await client.end()
    return client, ready, closed


# --- the happy path --------------------------------------------------------------------------


def test_jfk_finals_are_journaled_before_they_are_sent(daemon: Daemon) -> None:
    """start -> jfk (s16le 16 kHz) -> end: ready, increasing seq, the words, closed{end}; the
    journal holds exactly the finals received, and each was on disk when it arrived."""
    pcm = pcm_of(JFK)
    not_yet_journaled: list[dict[str, Any]] = []
    session: list[str] = []

    def on_message(message: dict[str, Any]) -> None:
        if message["type"] == "ready":
            session.append(message["session"])
        elif message["type"] == "final":
            seqs = {r.get("seq") for r in journal_finals(daemon, session[0])}
            if message["seq"] not in seqs:
                not_yet_journaled.append(message)

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url, on_message=on_message) as client:
            await client.start(sample_rate=16_000, encoding="pcm_s16le", channels=1)
            await client.send_audio(pcm)
            await client.end()
        return client

    client = run(scenario())
    ready = client.messages[0]
    assert ready["type"] == "ready", client.brief()  # the first message; its seq is checked below
    assert ready["protocol"] == 1 and ready["model"] == "tiny.en"
    assert ready["sample_rate"] == 16_000 and ready["resumed"] is False
    assert ready["audio_s"] == 0.0  # a new session: nothing heard yet
    assert isinstance(ready["session"], str) and ready["session"]
    assert_seq_increasing(client)
    assert client.binary_frames == 0
    closed = client.messages[-1]
    assert closed["type"] == "closed" and closed["reason"] == "end", client.brief()
    assert client.close_code == 1000
    assert not client.of_type("error"), client.brief()
    assert ASK_NOT in words(client.text()), client.text()
    assert ASK_WHAT in words(client.text()), client.text()
    for final in client.finals():
        assert final["words"] and final["language"] == "en"
        assert 0.0 <= final["start"] <= final["end"] <= JFK_S + 0.05, final
        assert "".join(w["word"] for w in final["words"]).strip() == final["text"].strip()
    segments = [f["segment"] for f in client.finals()]
    assert segments == sorted(set(segments)), segments
    assert not not_yet_journaled, f"finals sent before they were journaled: {not_yet_journaled}"

    records = closed_journal(daemon, ready["session"])
    assert records[0]["type"] == "session" and records[0]["session"] == ready["session"]
    assert records[0]["model"] == "tiny.en"
    assert [r for r in records if r["type"] == "final"] == client.finals()
    assert records[-1]["type"] == "closed" and records[-1]["reason"] == "end", records[-1]
    assert records[-1]["seq"] == closed["seq"]
    assert records[-1]["audio_s"] == pytest.approx(JFK_S, abs=0.01)
    assert records[-1]["next_segment"] == max(segments) + 1


def test_journal_is_closed_before_the_client_is_told(daemon: Daemon) -> None:
    """When `closed{end}` arrives, the journal already ends with its `closed` record (same
    seq): journal first, then tell the client, for the end of a stream as for its finals. A
    client that resumes right after `closed` finds the session's full state."""
    on_disk_at_closed: list[dict[str, Any]] = []
    session: list[str] = []

    def on_message(message: dict[str, Any]) -> None:
        if message["type"] == "ready":
            session.append(message["session"])
        elif message["type"] == "closed":
            on_disk_at_closed.append(journal(daemon, session[0])[-1])

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url, on_message=on_message) as client:
            await client.start()
            await client.send_audio(pcm_of(MAN_SAID))
            await client.end()
        return client

    client = run(scenario())
    closed = client.messages[-1]
    assert closed["type"] == "closed", client.brief()
    (last,) = on_disk_at_closed
    assert last["type"] == "closed" and last["seq"] == closed["seq"], last


def test_f32le_48k_stereo_is_resampled_and_downmixed(daemon: Daemon) -> None:
    """pcm_f32le at 48 kHz, two channels: speech plus and minus loud noise, so that only
    their mean is clean speech (either channel alone, or the two read as one, is mostly
    noise). The words come through, and the session heard exactly 11 s of 16 kHz audio."""
    mono = np.frombuffer(pcm_of(JFK, rate=48_000, encoding="pcm_f32le"), dtype="<f4")
    noise = np.random.default_rng(7).normal(0.0, 3 * float(np.std(mono)), mono.shape)
    stereo = np.stack([mono + noise, mono - noise], axis=1)  # interleaved L, R
    pcm = stereo.astype("<f4").tobytes()

    client, ready, closed = run(
        transcribe(daemon.ws_url, pcm, sample_rate=48_000, encoding="pcm_f32le", channels=2)
    )
    assert ready["sample_rate"] == 48_000
    assert closed["reason"] == "end" and not client.of_type("error"), client.brief()
    text = words(client.text())
    assert ASK_NOT in text and ASK_WHAT in text, text
    reference = words(_manifest_reference("en/jfk.flac")[0])
    assert jiwer.wer(reference, text) <= 0.15, text
    for final in client.finals():
        assert final["end"] <= JFK_S + 0.05, final  # 48 kHz taken for 16 kHz would stretch
    state = closed_journal(daemon, ready["session"])[-1]
    assert state["audio_s"] == pytest.approx(JFK_S, abs=0.02), state


def test_8khz_telephone_audio(daemon: Daemon) -> None:
    """The 8 kHz Harvard sentences, s16le at 8 kHz: transcribed with a low WER."""
    pcm = pcm_of(HARVARD_8K, rate=8_000)
    client, ready, closed = run(transcribe(daemon.ws_url, pcm, sample_rate=8_000))
    assert ready["sample_rate"] == 8_000
    assert closed["reason"] == "end" and not client.of_type("error"), client.brief()
    text = words(client.text())
    reference = words(_manifest_reference("en/osr_harvard_list72_8khz.wav")[0])
    error_rate = jiwer.wer(reference, text)
    assert error_rate <= 0.25, (error_rate, text)
    assert "gold ring" in text and "come quickly" in text, text
    duration_s = len(pcm) / (8_000 * 2)
    assert closed_journal(daemon, ready["session"])[-1]["audio_s"] == pytest.approx(
        duration_s, abs=0.02
    )


def test_a_quiet_microphone_says_its_level_in_start(daemon: Daemon) -> None:
    """The same telephone sentences 6 dB quieter: the VAD's level thresholds miss whole
    sentences, unless the client's `start` says its input is 6 dB down (`level_offset_db`);
    then they come through as at full level. The offset is the session's own. A client that
    did not say is told, once, by a non-fatal `quiet_input` error with the offset to send."""
    loud = np.frombuffer(pcm_of(HARVARD_8K, rate=8_000), dtype="<i2")
    pcm = (loud // 2).astype("<i2").tobytes()
    reference = words(_manifest_reference("en/osr_harvard_list72_8khz.wav")[0])

    levels: list[float] = []
    notices: list[dict[str, Any]] = []

    def error_rate(**start: Any) -> float:
        client, _, closed = run(transcribe(daemon.ws_url, pcm, sample_rate=8_000, **start))
        assert closed["reason"] == "end", client.brief()
        notices[:] = client.of_type("error")
        assert all(n["code"] == "quiet_input" and not n["fatal"] for n in notices), notices
        levels[:] = [m["level_dbfs"] for m in client.of_type("speech_ended")]
        return float(jiwer.wer(reference, words(client.text())))

    told = error_rate(level_offset_db=-6)
    # speech_ended says how loud the talker was: ~6 dB under the clip's -17..-24 dBFS
    assert levels and -29.0 <= float(np.median(levels)) <= -23.0, levels
    assert notices == []  # the level was said
    untold = error_rate()
    print(f"quiet Harvard WER: told {told:.3f}, untold {untold:.3f}")
    assert told <= 0.25
    assert untold >= told + 0.1
    (notice,) = notices
    found = re.search(r"speech at (-\d+) dBFS.*level_offset_db (-\d+) in start", notice["message"])
    assert found and int(found[2]) == int(found[1]) + 20, notice
    assert f"streamd-client: --level-offset-db {found[2]}" in notice["message"], notice


def _manifest_reference(file: str) -> list[str]:
    entries = json.loads((AUDIO_DIR / "manifest.json").read_text(encoding="utf-8"))
    return [e["reference"] for e in entries if e["file"] == file]


# --- auth and capacity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("", None),
        ("?token=wrong", None),
        ("", {"Authorization": "Bearer wrong"}),
        ("", {"Authorization": f"Basic {TOKEN}"}),
        (f"?token={TOKEN}x", None),
    ],
    ids=["no-token", "wrong-query", "wrong-bearer", "not-bearer", "token-prefix"],
)
def test_unauthorized_is_refused_before_any_audio(
    guarded: Daemon, path: str, headers: dict[str, str] | None
) -> None:
    """error{unauthorized, fatal} and close 1008; the start and audio sent at once are never
    processed: no ready, no session, no journal file, no audio counted."""
    before = metrics(guarded)
    journals_before = set(guarded.journal_dir.glob("*.jsonl"))

    async def scenario() -> StreamClient:
        async with stream_client(guarded.ws_url + path, headers=headers) as client:
            try:  # the server may close before all of this arrives
                await client.send_json({"type": "start"})
                await client.send_audio(pcm_of(MAN_SAID))
            except ConnectionClosed:
                pass
            error = await client.wait_error("unauthorized")
            assert error["fatal"] is True, error
            assert await client.wait_disconnected() == CLOSE_POLICY
        return client

    client = run(scenario())
    assert [m["type"] for m in client.messages] == ["error"], client.brief()
    after = metrics(guarded)
    assert sample(after, "streamd_audio_in_seconds_total") == sample(
        before, "streamd_audio_in_seconds_total"
    )
    assert sample(after, "streamd_sessions_total") == sample(before, "streamd_sessions_total")
    assert sample(after, "streamd_errors_total", code="unauthorized") == (
        sample(before, "streamd_errors_total", code="unauthorized") + 1
    )
    assert set(guarded.journal_dir.glob("*.jsonl")) == journals_before


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"?token={TOKEN}", None),
        ("", {"Authorization": f"Bearer {TOKEN}"}),
        ("", {"Authorization": f"bearer {TOKEN}"}),
    ],
    ids=["query", "bearer", "bearer-lowercase"],
)
def test_the_token_lets_a_client_in(
    guarded: Daemon, path: str, headers: dict[str, str] | None
) -> None:
    async def scenario() -> tuple[StreamClient, dict[str, Any]]:
        await wait_sessions(guarded, 0)  # the one slot is free (earlier tests' sessions gone)
        async with stream_client(guarded.ws_url + path, headers=headers) as client:
            await client.start()
            closed = await client.end()
        return client, closed

    client, closed = run(scenario())
    assert closed["reason"] == "end" and not client.of_type("error"), client.brief()


def test_busy_when_full_first_session_unaffected(guarded: Daemon) -> None:
    """--max-sessions 1: a second client gets error{busy, fatal} and close 1013 (a tokenless
    one still gets unauthorized: auth comes first); the first session's transcript is whole;
    once it has left, a new client gets in."""
    pcm = pcm_of(JFK)
    half = len(pcm) // 2 // 2 * 2
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def scenario() -> tuple[StreamClient, StreamClient, StreamClient, str]:
        await wait_sessions(guarded, 0)
        async with stream_client(guarded.ws_url, headers=auth) as first:
            await first.start()
            await first.send_audio(pcm[:half])
            async with stream_client(guarded.ws_url, headers=auth) as second:
                busy = await second.wait_error("busy")
                assert busy["fatal"] is True, busy
                assert await second.wait_disconnected() == CLOSE_TRY_AGAIN
            async with stream_client(guarded.ws_url) as stranger:
                await stranger.wait_error("unauthorized")
                assert await stranger.wait_disconnected() == CLOSE_POLICY
            await first.send_audio(pcm[half:])
            await first.end()
        after = await attempt_session(guarded.ws_url + f"?token={TOKEN}")
        return first, second, stranger, after

    first, second, stranger, after = run(scenario())
    assert [m["type"] for m in second.messages] == ["error"], second.brief()
    assert [m["type"] for m in stranger.messages] == ["error"], stranger.brief()
    assert first.messages[-1]["type"] == "closed", first.brief()
    assert first.messages[-1]["reason"] == "end", first.brief()
    assert not first.of_type("error"), first.brief()
    text = words(first.text())
    assert ASK_NOT in text and ASK_WHAT in text, text
    assert after == "ready"


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "this is not json",
        '{"type": "start"',
        "[1, 2, 3]",
        '"start"',
        "42",
        "null",
        "{}",
        '{"type": "bogus"}',
        '{"type": 7}',
        '{"type": "start", "sample_rate": 16000, "colour": "blue"}',
        '{"type": "start", "task": "summarize"}',
        '{"type": "start", "prompt": 12}',
        '{"type": "start", "language": ""}',
        '{"type": "start", "resume": "abc"}',
        '{"type": "start", "resume": {"session": "../../etc/passwd", "after_seq": 0}}',
        '{"type": "start", "resume": {"session": "0123456789abcdef", "after_seq": -1}}',
    ],
)
def test_bad_message_before_start_is_not_fatal(daemon: Daemon, bad: str) -> None:
    """error{bad_message, fatal:false}; the connection stays usable: a start then works."""

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            mark = await client.send_json(bad)
            error = await client.wait_type("error", since=mark)
            assert error["code"] == "bad_message" and error["fatal"] is False, error
            assert error["message"], error
            await client.start()
            assert (await client.end())["reason"] == "end"
        return client

    client = run(scenario())
    assert [m["type"] for m in client.messages] == ["error", "ready", "closed"], client.brief()


def test_bad_messages_mid_stream_do_not_disturb_transcription(daemon: Daemon) -> None:
    """Malformed JSON, an array, an unknown type and a second start mid-stream each get a
    non-fatal bad_message, counted in /metrics; the stream's words all come through."""
    pcm = pcm_of(JFK)
    third = len(pcm) // 3 // 2 * 2
    before = sample(metrics(daemon), "streamd_errors_total", code="bad_message")

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            await client.start()
            await client.send_audio(pcm[:third])
            for bad in ("{nope", "[]", '{"type": "pause"}'):
                mark = await client.send_json(bad)
                error = await client.wait_type("error", since=mark)
                assert error["code"] == "bad_message" and error["fatal"] is False, error
            await client.send_audio(pcm[third : 2 * third])
            mark = await client.send_json({"type": "start"})
            error = await client.wait_type("error", since=mark)
            assert error["code"] == "bad_message" and error["fatal"] is False, error
            await client.send_audio(pcm[2 * third :])
            await client.end()
        return client

    client = run(scenario())
    assert client.messages[-1]["reason"] == "end"
    assert_seq_increasing(client)
    text = words(client.text())
    assert ASK_NOT in text and ASK_WHAT in text, text
    after = sample(metrics(daemon), "streamd_errors_total", code="bad_message")
    assert after >= before + 4


def test_audio_and_finalize_before_start_are_not_started_errors(daemon: Daemon) -> None:
    """Audio or finalize before start: error{not_started, fatal:false}; the audio is dropped
    (not transcribed, not counted in the session), and a start then works normally."""
    early = pcm_of(JFK)  # would be transcribed as "ask not ..." if it were not dropped
    pcm = pcm_of(MAN_SAID)

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            await client.ws.send(early[:3_200])
            error = await client.wait_error("not_started")
            assert error["fatal"] is False, error
            mark = await client.send_json({"type": "finalize"})
            error = await client.wait_error("not_started", since=mark)
            assert error["fatal"] is False, error
            await client.start()
            await client.send_audio(pcm)
            await client.end()
        return client

    client = run(scenario())
    assert client.messages[-1]["reason"] == "end", client.brief()
    text = words(client.text())
    assert "a man said to the universe" in text, text
    assert "americans" not in text, text
    session = client.of_type("ready")[0]["session"]
    state = closed_journal(daemon, session)[-1]
    assert state["audio_s"] == pytest.approx(len(pcm) / 32_000, abs=0.01), state


def test_partial_sample_frames_and_non_finite_floats_are_bad_audio(daemon: Daemon) -> None:
    """An s16le frame of an odd byte count, and f32le frames holding NaN/inf/huge values, get
    error{bad_audio, fatal:false} and are dropped whole; good frames around them transcribe."""
    s16 = pcm_of(MAN_SAID)
    f32 = pcm_of(MAN_SAID, encoding="pcm_f32le")
    nan = np.full(800, np.nan, dtype="<f4").tobytes()
    inf = np.full(800, np.inf, dtype="<f4").tobytes()
    huge = np.full(800, 1e6, dtype="<f4").tobytes()

    async def one(start: dict[str, Any], pcm: bytes, bad: list[bytes]) -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            await client.start(**start)
            half = len(pcm) // 2 // 4 * 4
            await client.send_audio(pcm[:half])
            for frame in bad:
                mark = len(client.messages)
                await client.ws.send(frame)
                error = await client.wait_error("bad_audio", since=mark)
                assert error["fatal"] is False, error
                assert "byte" in error["message"] or "NaN" in error["message"], error
            await client.send_audio(pcm[half:])
            await client.end()
        return client

    async def scenario() -> list[tuple[StreamClient, bytes]]:
        odd = s16[:3_201]
        stereo_misaligned = s16[:3_202]  # whole s16 samples, but not whole stereo frames
        return [
            (await one({}, s16, [odd, b"\x00"]), s16),
            (await one({"encoding": "pcm_f32le"}, f32, [nan, inf, huge, f32[:3_202]]), f32),
            (await one({"channels": 2}, _stereo(s16), [stereo_misaligned]), s16),
        ]

    for client, pcm in run(scenario()):
        assert client.messages[-1]["reason"] == "end", client.brief()
        text = words(client.text())
        assert "a man said to the universe" in text, (client.start_fields, text)
        session = client.of_type("ready")[0]["session"]
        width = 4 if client.start_fields.get("encoding") == "pcm_f32le" else 2
        state = closed_journal(daemon, session)[-1]
        # every bad frame dropped whole: the session heard exactly the good audio
        assert state["audio_s"] == pytest.approx(len(pcm) / width / 16_000, abs=0.01), state


def _stereo(s16_mono: bytes) -> bytes:
    mono = np.frombuffer(s16_mono, dtype="<i2")
    return np.repeat(mono, 2).astype("<i2").tobytes()


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        ({"sample_rate": 4_000}, "4000"),
        ({"sample_rate": 96_000}, "96000"),
        ({"sample_rate": "abc"}, "abc"),
        ({"sample_rate": 16_000.5}, "16000.5"),
        ({"sample_rate": True}, "True"),
        ({"encoding": "mp3"}, "mp3"),
        ({"encoding": "pcm_s24le"}, "pcm_s24le"),
        ({"channels": 3}, "3"),
        ({"channels": 0}, "0"),
    ],
)
def test_unsupported_audio_format_then_a_corrected_start(
    daemon: Daemon, fields: dict[str, Any], mentions: str
) -> None:
    """error{bad_audio_format, fatal:false} naming the bad value; a corrected start works."""

    async def scenario() -> tuple[dict[str, Any], StreamClient]:
        async with stream_client(daemon.ws_url) as client:
            mark = await client.send_json({"type": "start", **fields})
            error = await client.wait_type("error", since=mark)
            await client.start(sample_rate=8_000)
            await client.send_audio(pcm_of(MAN_SAID, rate=8_000))
            await client.end()
        return error, client

    error, client = run(scenario())
    assert error["code"] == "bad_audio_format" and error["fatal"] is False, error
    assert mentions in error["message"], error
    assert client.of_type("ready")[0]["sample_rate"] == 8_000
    assert "a man said to the universe" in words(client.text()), client.text()


def test_oversized_frames(daemon: Daemon) -> None:
    """A frame over max_frame_bytes: error{frame_too_large, fatal:false}, dropped whole, the
    stream goes on (a frame of exactly the limit is fine); one beyond the hard limit (4x)
    closes the connection with 1009."""
    pcm = pcm_of(MAN_SAID)
    half = len(pcm) // 2 // 2 * 2
    before = sample(metrics(daemon), "streamd_errors_total", code="frame_too_large")

    async def scenario() -> tuple[StreamClient, StreamClient]:
        async with stream_client(daemon.ws_url) as client:
            await client.start()
            await client.send_audio(pcm[:half], chunk_bytes=MAX_FRAME_BYTES)  # exactly the limit
            await client.ws.send(pcm[: MAX_FRAME_BYTES + 2])
            error = await client.wait_error("frame_too_large")
            assert error["fatal"] is False, error
            assert str(MAX_FRAME_BYTES) in error["message"], error
            await client.send_audio(pcm[half:])
            await client.end()
        async with stream_client(daemon.ws_url) as huge:
            await huge.start()
            await huge.ws.send(bytes(4 * MAX_FRAME_BYTES + 2))
            code = await huge.wait_disconnected()
            assert code == CLOSE_TOO_BIG, (code, huge.brief())
        return client, huge

    client, _ = run(scenario())
    assert len(client.of_type("error")) == 1, client.brief()
    assert "a man said to the universe" in words(client.text()), client.text()
    session = client.of_type("ready")[0]["session"]
    assert closed_journal(daemon, session)[-1]["audio_s"] == pytest.approx(
        len(pcm) / 32_000, abs=0.01
    )
    after = sample(metrics(daemon), "streamd_errors_total", code="frame_too_large")
    assert after == before + 1


@pytest.mark.parametrize(
    "fields",
    [{"language": "ja"}, {"language": "Japanese"}, {"language": "xx"}, {"task": "translate"}],
    ids=["ja", "japanese", "unknown-language", "translate"],
)
def test_english_only_model_refuses_other_languages(daemon: Daemon, fields: dict[str, Any]) -> None:
    """tiny.en cannot do Japanese or translation: error{bad_message, fatal:false}; a start
    with language en then works."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with stream_client(daemon.ws_url) as client:
            mark = await client.send_json({"type": "start", **fields})
            error = await client.wait_type("error", since=mark)
            ready = await client.start(language="en")
            await client.end()
        return error, ready

    error, ready = run(scenario())
    assert error["code"] == "bad_message" and error["fatal"] is False, error
    assert ready["model"] == "tiny.en"


# --- vanishing clients, resume ---------------------------------------------------------------


def test_vanished_client_does_not_disturb_others_and_its_finals_are_journaled(
    daemon: Daemon,
) -> None:
    """A streams jfk at real-time pace; B sends jfk up to mid-utterance and drops its TCP
    connection without a close frame. A's transcript is whole; B's journal holds the finals of
    everything B sent (the open utterance included) and closed{reason: client_gone}."""
    pcm = pcm_of(JFK)
    cut = round(CUT_S * 16_000) * 2

    async def steady(going: asyncio.Event) -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            await client.start()
            going.set()
            await client.send_audio(pcm, realtime=1.0)
            await client.end()
        return client

    async def scenario() -> tuple[StreamClient, StreamClient, list[Any]]:
        going = asyncio.Event()
        steady_task = asyncio.create_task(steady(going))
        await going.wait()
        async with stream_client(daemon.ws_url) as b:
            await b.start()
            await b.send_audio(pcm[:cut])
            await b.sync()
            b_finals_before = list(b.finals())
            assert not steady_task.done(), "B should vanish while A is still streaming"
            b.abort()
            await b.wait_disconnected()
        a = await steady_task
        return a, b, b_finals_before

    a, b, b_finals_before = run(scenario())
    # A: whole and correct
    assert a.messages[-1]["type"] == "closed" and a.messages[-1]["reason"] == "end"
    assert not a.of_type("error"), a.brief()
    text = words(a.text())
    assert ASK_NOT in text and ASK_WHAT in text, text
    assert_seq_increasing(a)
    a_session = a.of_type("ready")[0]["session"]
    assert journal_finals(daemon, a_session) == a.finals()
    # B vanished mid-utterance: nothing of "what your country ..." was final yet
    assert all(f["end"] < 5.0 for f in b_finals_before), b_finals_before
    b_session = b.of_type("ready")[0]["session"]

    records = closed_journal(daemon, b_session)  # B's open utterance, finalized after it left
    closed = records[-1]
    assert closed["reason"] == "client_gone", closed
    assert closed["audio_s"] == pytest.approx(CUT_S, abs=0.01), closed
    finals = [r for r in records if r["type"] == "final"]
    assert finals[: len(b_finals_before)] == b_finals_before
    b_text = text_of(finals)
    assert "fellow americans" in b_text and "ask not what your country" in b_text, b_text
    assert "for your country" not in b_text, b_text  # never sent
    assert all(f["end"] <= CUT_S + 0.05 for f in finals), finals
    assert [r["type"] for r in records[1:-1]] == ["final"] * len(finals)


def test_resume_replays_missed_finals_and_continues(daemon: Daemon) -> None:
    """Stream jfk up to mid-utterance, vanish, reconnect with start.resume{session, after_seq:
    the first final's seq}: ready{same session, resumed}, then every journaled final after
    after_seq (those finalized after the drop included) with its original seq and text; the
    rest of jfk then continues the session's seq, segment ids and audio time."""
    pcm = pcm_of(JFK)
    cut = round(CUT_S * 16_000) * 2

    async def scenario() -> tuple[StreamClient, StreamClient, int, list[dict[str, Any]]]:
        async with stream_client(daemon.ws_url) as first:
            ready = await first.start()
            await first.send_audio(pcm[:cut])
            await first.sync()
            await first.wait_type("final")
            first.abort()
            await first.wait_disconnected()
        session = ready["session"]
        after_seq = first.finals()[0]["seq"]
        async with stream_client(daemon.ws_url) as second:
            deadline = time.monotonic() + 60
            while True:  # session_in_use until the server has noticed the drop
                mark = await second.send_json(
                    {"type": "start", "resume": {"session": session, "after_seq": after_seq}}
                )
                reply = await second.wait_for(
                    lambda m: m["type"] == "ready" or m["type"] == "error", since=mark
                )
                if reply["type"] == "ready":
                    break
                assert reply["code"] == "session_in_use", reply
                assert reply["fatal"] is False and time.monotonic() < deadline, reply
            before = journal(daemon, session)  # the old stream is over when ready comes
            await second.send_audio(pcm[cut:])
            await second.end()
        return first, second, after_seq, before

    first, second, after_seq, before = run(scenario())
    session = first.of_type("ready")[0]["session"]
    old_closed = before[-1]
    assert old_closed["type"] == "closed" and old_closed["reason"] == "client_gone", before
    old_finals = [r for r in before if r["type"] == "final"]
    assert old_finals[: len(first.finals())] == first.finals()
    expected_replay = [f for f in old_finals if f["seq"] > after_seq]
    assert expected_replay, "pick after_seq below some finals"
    assert "what your country" in text_of(expected_replay), expected_replay

    ready_at = next(i for i, m in enumerate(second.messages) if m["type"] == "ready")
    ready = second.messages[ready_at]
    assert ready["session"] == session and ready["resumed"] is True, ready
    assert ready["protocol"] == 1 and ready["model"] == "tiny.en"
    replayed = second.messages[ready_at + 1 : ready_at + 1 + len(expected_replay)]
    assert replayed == expected_replay, second.brief()
    new = second.messages[ready_at + 1 + len(expected_replay) :]
    assert new and new[-1]["type"] == "closed" and new[-1]["reason"] == "end", second.brief()
    assert all(m["seq"] > old_closed["seq"] for m in new), (old_closed, second.brief())
    assert_seq_increasing_from(new)
    new_finals = [m for m in new if m["type"] == "final"]
    assert new_finals, second.brief()
    assert min(f["segment"] for f in new_finals) >= old_closed["next_segment"]
    assert old_closed["audio_s"] == pytest.approx(CUT_S, abs=0.01)
    # where the client's resent audio joins the timeline: exactly what the first connection heard
    assert ready["audio_s"] == old_closed["audio_s"], (ready, old_closed)
    for m in new:
        for key in ("t", "start"):
            if key in m:
                assert m[key] >= CUT_S - 0.01, m
        if m["type"] == "final":
            assert m["end"] <= JFK_S + 0.05, m
            assert all(w["start"] >= CUT_S - 0.01 for w in m["words"]), m
    assert ASK_WHAT in text_of(new_finals), new_finals
    records = closed_journal(daemon, session)
    assert [r for r in records if r["type"] == "final"] == old_finals + new_finals
    assert records[-1]["type"] == "closed" and records[-1]["reason"] == "end"
    assert records[-1]["audio_s"] == pytest.approx(JFK_S, abs=0.01)
    assert [r["type"] for r in records].count("session") == 1


def assert_seq_increasing_from(messages: list[dict[str, Any]]) -> None:
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(set(seqs)), seqs


def test_resume_of_an_unknown_session_starts_a_fresh_one(daemon: Daemon) -> None:
    """error{unknown_session, fatal:false}, then ready with a new session id, not resumed."""
    unknown = uuid.uuid4().hex[:16]

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            mark = await client.send_json(
                {"type": "start", "resume": {"session": unknown, "after_seq": 5}}
            )
            await client.wait_type("ready", since=mark)
            await client.end()
        return client

    client = run(scenario())
    types = [m["type"] for m in client.messages]
    assert types == ["error", "ready", "closed"], client.brief()
    error, ready, _ = client.messages
    assert error["code"] == "unknown_session" and error["fatal"] is False, error
    assert ready["session"] != unknown and ready["resumed"] is False, ready
    assert not (daemon.journal_dir / f"{unknown}.jsonl").exists()


def test_seq_increases_across_errors_before_start(daemon: Daemon) -> None:
    """Every message of a connection has a larger seq than the one before, the errors sent
    before `ready` (not_started, bad_message, unknown_session) included: a client that orders
    or de-duplicates by seq must not lose `ready`."""

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            await client.ws.send(bytes(3_200))
            await client.wait_error("not_started")
            await client.send_json("{nope")
            await client.wait_error("bad_message")
            unknown = {"session": uuid.uuid4().hex[:16], "after_seq": 3}
            await client.send_json({"type": "start", "resume": unknown})
            await client.wait_type("ready")
            await client.send_audio(pcm_of(MAN_SAID))
            await client.end()
        return client

    client = run(scenario())
    types = [m["type"] for m in client.messages]
    assert types[:4] == ["error", "error", "error", "ready"], client.brief()
    assert client.finals(), client.brief()
    assert_seq_increasing(client)


# --- HTTP ------------------------------------------------------------------------------------


def test_healthz_counts_sessions(daemon: Daemon) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        await wait_sessions(daemon, 0)
        idle = await asyncio.to_thread(healthz, daemon)
        async with stream_client(daemon.ws_url) as client:
            await client.start()
            busy = await asyncio.to_thread(healthz, daemon)
            await client.end()
        await wait_sessions(daemon, 0)
        return idle, busy, await asyncio.to_thread(healthz, daemon)

    idle, busy, after = run(scenario())
    assert idle == {"status": "ok", "sessions": 0, "max_sessions": 16, "model": "tiny.en"}
    assert busy == {**idle, "sessions": 1}
    assert after == idle


def test_metrics_exposes_the_daemon_metrics(daemon: Daemon) -> None:
    """After a stream and a bad message: Prometheus text with the metric names of metrics.py,
    and counters that moved."""
    pcm = pcm_of(MAN_SAID)
    run(wait_sessions(daemon, 0))  # no earlier session still finishing moves the counters
    before = metrics(daemon)

    async def scenario() -> StreamClient:
        async with stream_client(daemon.ws_url) as client:
            await client.start()
            await client.send_audio(pcm)
            await client.send_json("{bad")
            await client.end()
        return client

    client = run(scenario())
    status, headers, body = http_get(daemon, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for name in (
        "streamd_active_sessions",
        "streamd_finalization_latency_seconds_bucket",
        "streamd_first_partial_latency_seconds_bucket",
        "streamd_decode_batch_size_bucket",
        "streamd_decode_step_seconds_bucket",
        "streamd_decode_queue_seconds_bucket",
        "streamd_scheduler_behind_seconds",
        "streamd_overloaded_steps_total",
        "streamd_engine_busy_seconds_total",
        "streamd_decoder_forward_passes_total",
        "streamd_audio_in_seconds_total",
        "streamd_sessions_total",
        "streamd_finals_total",
        "# TYPE streamd_guard_dropped_words_total counter",
        "streamd_context_resets_total",
        "streamd_pause_probes_total",
        "streamd_probe_finals_total",
        "streamd_cancelled_steps_total",
        "streamd_speech_level_dbfs_bucket",
        'streamd_errors_total{code="bad_message"}',
    ):
        assert name in text, f"{name} missing from /metrics:\n{text}"
    after = metrics(daemon)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("streamd_errors_total", code="bad_message") == 1
    assert delta("streamd_sessions_total") == 1
    assert delta("streamd_audio_in_seconds_total") == pytest.approx(len(pcm) / 32_000, abs=0.01)
    assert delta("streamd_finals_total") >= 1
    assert delta("streamd_finalization_latency_seconds_count") == delta("streamd_finals_total")
    assert delta("streamd_decode_batch_size_count") >= 1
    assert delta("streamd_decoder_forward_passes_total") >= 1
    # (whether a pause is probed depends on the engine's timing: tests/test_pause_probe.py)
    assert 0 <= delta("streamd_probe_finals_total") <= delta("streamd_pause_probes_total")
    ended = client.of_type("speech_ended")
    assert ended and delta("streamd_speech_level_dbfs_count") == len(ended)
    # (no _sum: prometheus_client leaves it out of histograms with negative buckets)
    for bound in ("-50.0", "-26.0", "-14.0", "-6.0"):
        below = sum(m["level_dbfs"] <= float(bound) for m in ended)
        assert delta("streamd_speech_level_dbfs_bucket", le=bound) == below, (bound, ended)
    assert sample(after, "streamd_active_sessions") >= 0
    for s in after["streamd_guard_dropped_words"].samples:
        assert s.labels.get("guard"), s  # one series per guard


@pytest.mark.parametrize(
    "path",
    [
        "/no/such/page",
        "/v1/nope",
        "/../pyproject.toml",
        "/../../pyproject.toml",
        "/../python/pyproject.toml",
        "/%2e%2e/%2e%2e/pyproject.toml",
        "/..%2f..%2fpyproject.toml",
        "//etc/passwd",
        "/../../../../../../etc/passwd",
        "/%2F%2E%2E%2F%2E%2E%2Fpyproject.toml",
    ],
)
def test_unknown_paths_and_traversal_are_404(daemon: Daemon, path: str) -> None:
    status, _, body = http_get(daemon, path)
    assert status == 404, (path, status, body[:200])
    assert b"[project]" not in body and b"root:" not in body


# --- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_mid_utterance_flushes_finals_then_exits_0(tmp_path: Path) -> None:
    """SIGTERM while a client is mid-utterance: the client gets the finals of everything it
    sent, closed{shutdown} and close 1001; the journal has them; new connections are refused
    during and after the shutdown; exit code 0."""
    pcm = pcm_of(JFK)
    cut = round(CUT_S * 16_000) * 2
    with running_daemon(tmp_path, *DAEMON_ARGS) as d:

        async def scenario() -> tuple[StreamClient, list[dict[str, Any]], str, int | None]:
            async with stream_client(d.ws_url) as client:
                await client.start()
                await client.send_audio(pcm[:cut])
                mark = await client.sync()
                finals_before = list(client.finals())
                d.process.send_signal(signal.SIGTERM)
                closed = await client.wait_type("closed", since=mark)
                assert closed["reason"] == "shutdown", closed
                during = await attempt_session(d.ws_url)
                code = await client.wait_disconnected()
            return client, finals_before, during, code

        client, finals_before, during, code = run(scenario())
        assert d.process.wait(STOP_S) == 0  # no second signal: the first must do
        after = run(attempt_session(d.ws_url))
    assert code == CLOSE_GOING_AWAY
    # during: the listener is closed (or a late handshake is closed with 1001); after: gone
    assert during.startswith("refused") or during == "closed 1001", during
    assert after.startswith("refused"), after
    assert all(f["end"] < 5.0 for f in finals_before), "the utterance was already final"
    text = words(client.text())
    assert "fellow americans" in text and "ask not what your country" in text, text
    assert not client.of_type("error")[1:], client.brief()  # the sync error only
    session = client.of_type("ready")[0]["session"]
    records = journal(d, session)
    assert [r for r in records if r["type"] == "final"] == client.finals()
    assert records[-1]["type"] == "closed" and records[-1]["reason"] == "shutdown"
    assert records[-1]["audio_s"] == pytest.approx(CUT_S, abs=0.01)
    assert "streamd: stopped" in d.log()
    _no_tracebacks(d)


def test_sigint_while_streaming_closes_promptly_and_exits_0(tmp_path: Path) -> None:
    """SIGINT while a client keeps streaming (10 ms frames at twice real time, so that dozens
    arrive while the shutdown finalizes): finals, closed{shutdown}, close 1001 with a prompt
    closing handshake (audio after the shutdown is dropped; the server keeps reading, so it
    sees the client's close frame), the journal closed with reason shutdown, exit code 0."""
    pcm = pcm_of(JFK)
    # "...fellow Americans" ends at 2.1 s: the signal comes once it has been sent (a faster
    # engine gives the first final sooner, and the shutdown then cut "Americans")
    heard_bytes = 3 * 16_000 * 2
    with running_daemon(tmp_path, *DAEMON_ARGS) as d:

        async def scenario() -> tuple[StreamClient, float, int | None]:
            async with stream_client(d.ws_url) as client:
                await client.start()
                heard = asyncio.Event()

                async def keep_streaming() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        # small frames at 2x: dozens arrive while the shutdown finalizes
                        await client.send_audio(pcm[:heard_bytes], chunk_bytes=320, realtime=2.0)
                        heard.set()
                        rest = pcm[heard_bytes:] + pcm
                        await client.send_audio(rest, chunk_bytes=320, realtime=2.0)

                sender = asyncio.create_task(keep_streaming())
                await client.wait_type("final")
                async with asyncio.timeout(WAIT_S):
                    await heard.wait()
                d.process.send_signal(signal.SIGINT)
                await client.wait_type("closed")
                closed_at = time.monotonic()
                code = await client.wait_disconnected()
                handshake_s = time.monotonic() - closed_at
                async with asyncio.timeout(PROMPT_CLOSE_S):
                    await sender
            return client, handshake_s, code

        client, handshake_s, code = run(scenario())
        assert d.process.wait(STOP_S) == 0
    assert client.messages[-1]["type"] == "closed", client.brief()
    assert client.messages[-1]["reason"] == "shutdown", client.brief()
    assert code == CLOSE_GOING_AWAY
    # 10 s = the server's close_timeout: it stopped reading frames, so never saw our close
    assert handshake_s < 5.0, f"closing handshake took {handshake_s:.1f} s"
    assert not client.of_type("error"), client.brief()
    assert "fellow americans" in words(client.text()), client.text()
    session = client.of_type("ready")[0]["session"]
    records = journal(d, session)
    assert [r for r in records if r["type"] == "final"] == client.finals()
    assert records[-1]["type"] == "closed" and records[-1]["reason"] == "shutdown"
    _no_tracebacks(d)


def test_shutdown_closes_a_client_that_never_started(tmp_path: Path) -> None:
    """A client connected but silent (no start yet) must not hold up the shutdown: it is
    closed with 1001 promptly and the daemon exits 0."""
    with running_daemon(tmp_path, *DAEMON_ARGS) as d:

        async def scenario() -> tuple[StreamClient, float, int | None]:
            async with stream_client(d.ws_url) as client:
                await wait_sessions(d, 1)  # the server has taken the connection
                signalled = time.monotonic()
                d.process.send_signal(signal.SIGTERM)
                code = await client.wait_disconnected(timeout_s=60)
                return client, time.monotonic() - signalled, code

        client, took_s, code = run(scenario())
        assert d.process.wait(STOP_S) == 0
    assert took_s < PROMPT_CLOSE_S, f"closed {took_s:.1f} s after SIGTERM: {client.brief()}"
    assert code == CLOSE_GOING_AWAY, (code, client.brief())
    assert not client.of_type("error"), client.brief()
