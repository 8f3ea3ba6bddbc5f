"""The streamd-client SDK (clients/python): parsing, PCM conversion, pacing and captions; the
reconnect machinery against scripted protocol v1 servers on real localhost sockets; and the
async API, the sync wrapper and the CLI against the real daemon.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import streamd_client
from streamd_client import (
    BufferOverflowError,
    BusyError,
    Closed,
    ConnectError,
    ConnectionLostError,
    Error,
    Final,
    MissingExtraError,
    Partial,
    ProtocolError,
    Ready,
    ReconnectPolicy,
    ServerError,
    SpeechEnded,
    SpeechStarted,
    StreamClosedError,
    UnauthorizedError,
    Unknown,
    Word,
    event_to_dict,
    parse_event,
    parse_message,
)
from streamd_client.audio import BYTES_PER_S, Pacer, paced, read_file
from streamd_client.captions import Captions
from streamd_client.cli import main as cli_main
from streamd_client.pcm import PcmEncoder
from streamd_client.stream import Stream
from websockets.asyncio.server import ServerConnection, serve

from tests.daemon import Daemon, running_daemon

AUDIO = (Path(__file__).resolve().parents[1] / ".." / "shared" / "audio").resolve()
JFK = AUDIO / "en" / "jfk.flac"
PHRASE = "ask not what your country can do for you"
JFK_PAUSE_S = 4.8  # inside the silence between "ask not" and "what your country"
CLIENT = Path(sys.executable).with_name("streamd-client")
SCENARIO_S = 120.0  # one scenario against the daemon; the machine is small and shared
WAIT_S = 10.0  # a scripted server's step
FAST = ReconnectPolicy(initial_delay_s=0.05, max_delay_s=0.2, jitter=0.0, give_up_after_s=20.0)

T = TypeVar("T")


def run(scenario: Coroutine[Any, Any, T], timeout_s: float = SCENARIO_S) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await scenario

    return asyncio.run(bounded())


def words(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: what 'contains the phrase' compares."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


async def until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll `condition` until true, failing after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


# -- events --------------------------------------------------------------------------------------

FINAL_MESSAGE = {
    "type": "final",
    "seq": 7,
    "segment": 2,
    "start": 3.74,
    "end": 4.34,
    "text": " Ask not.",
    "words": [
        {"word": " Ask", "start": 3.74, "end": 3.86, "probability": 0.9},
        {"word": " not.", "start": 3.86, "end": 4.34, "probability": 0.8},
    ],
    "language": "en",
    "avg_logprob": -0.25,
    "no_speech_prob": 0.01,
}
MESSAGES = [
    {"type": "ready", "seq": 0, "session": "ab12", "protocol": 1, "model": "tiny.en",
     "sample_rate": 16000, "resumed": True, "audio_s": 2.5},
    {"type": "speech_started", "seq": 1, "t": 0.0},
    {"type": "speech_ended", "seq": 2, "t": 2, "level_dbfs": -21.5},
    {"type": "partial", "seq": 3, "segment": 0, "start": 0.0, "end": 0.96, "text": " And so"},
    FINAL_MESSAGE,
    {"type": "error", "seq": 8, "code": "bad_audio", "message": "odd bytes", "fatal": False},
    {"type": "closed", "seq": 9, "reason": "end"},
]  # fmt: skip


def test_parse_gives_typed_events_with_every_field() -> None:
    events = [parse_message(json.dumps(m)) for m in MESSAGES]
    assert events[0] == Ready(0, "ab12", 1, "tiny.en", 16000, resumed=True, audio_s=2.5)
    older = {k: v for k, v in MESSAGES[0].items() if k != "audio_s"}  # a daemon from before it
    assert parse_event(older) == Ready(0, "ab12", 1, "tiny.en", 16000, resumed=True, audio_s=None)
    assert events[1] == SpeechStarted(1, 0.0)
    assert events[2] == SpeechEnded(2, 2.0, -21.5) and isinstance(events[2].t, float)
    older_end = {k: v for k, v in MESSAGES[2].items() if k != "level_dbfs"}
    assert parse_event(older_end) == SpeechEnded(2, 2.0, None)
    assert parse_event({**MESSAGES[2], "level_dbfs": None}) == SpeechEnded(2, 2.0, None)
    assert events[3] == Partial(3, 0, 0.0, 0.96, " And so")
    assert events[4] == Final(
        seq=7,
        segment=2,
        start=3.74,
        end=4.34,
        text=" Ask not.",
        words=(Word(" Ask", 3.74, 3.86, 0.9), Word(" not.", 3.86, 4.34, 0.8)),
        language="en",
        avg_logprob=-0.25,
        no_speech_prob=0.01,
    )
    assert events[5] == Error(8, "bad_audio", "odd bytes", False)
    assert events[6] == Closed(9, "end")


def test_event_to_dict_is_the_wire_form() -> None:
    for message in MESSAGES:
        assert parse_event(event_to_dict(parse_event(message))) == parse_event(message)
    assert event_to_dict(parse_event(FINAL_MESSAGE)) == FINAL_MESSAGE


def test_an_unknown_type_is_an_unknown_event_not_an_error() -> None:
    message = {"type": "overload", "seq": 4, "behind_s": 1.5}
    assert parse_event(message) == Unknown(4, "overload", message)
    assert event_to_dict(parse_event(message)) == message


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"seq": 1}', "no string 'type'"),
        ('{"type": "partial", "seq": 1, "segment": 0, "start": 0, "end": 1}', "'text'"),
        ('{"type": "partial", "seq": true, "segment": 0, "start": 0, "end": 1, "text": ""}', "seq"),
        ('{"type": "speech_started", "seq": 1, "t": "0.5"}', "'t' should be a number"),
        ('{"type": "error", "seq": 1, "code": "busy", "fatal": "yes"}', "'fatal'"),
        (json.dumps({**FINAL_MESSAGE, "words": [{"word": " x", "start": 0}]}), "word"),
        (json.dumps({**FINAL_MESSAGE, "language": 3}), "'language'"),
        (json.dumps({**MESSAGES[0], "audio_s": "2.5"}), "'audio_s' should be a number"),
        (json.dumps({**MESSAGES[2], "level_dbfs": "loud"}), "'level_dbfs' should be a number"),
    ],
)
def test_a_malformed_known_message_is_a_protocol_error(message: str, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(complaint)):
        parse_message(message)


# -- PCM -----------------------------------------------------------------------------------------


def int16s(data: bytes) -> list[int]:
    out = array("h")
    out.frombytes(data)
    if sys.byteorder == "big":
        out.byteswap()
    return out.tolist()


def float32s(data: bytes) -> list[float]:
    out = array("f")
    out.frombytes(data)
    if sys.byteorder == "big":
        out.byteswap()
    return out.tolist()


def test_float_samples_become_clipped_rounded_s16() -> None:
    samples = [0.0, 1.0, -1.0, 2.0, -2.0, 0.25, -0.5]
    expected = [0, 32767, -32767, 32767, -32767, 8192, -16384]
    s16 = PcmEncoder("pcm_s16le", 1)
    assert int16s(s16.encode(samples)) == expected
    assert int16s(s16.encode(array("d", samples))) == expected
    assert int16s(s16.encode(np.array(samples, dtype=np.float32))) == expected
    assert int16s(s16.encode(np.array(samples, dtype=np.float64))) == expected


def test_f32_encoding_and_int16_input() -> None:
    f32 = PcmEncoder("pcm_f32le", 1)
    assert float32s(f32.encode([0.5, -0.25, 1.5])) == [0.5, -0.25, 1.5]  # f32 is not clipped
    assert float32s(f32.encode(array("h", [16384, -32768]))) == [0.5, -1.0]
    assert float32s(f32.encode(np.array([16384, -32768], dtype=np.int16))) == [0.5, -1.0]
    s16 = PcmEncoder("pcm_s16le", 1)
    assert int16s(s16.encode(np.array([7, -7], dtype=">i2"))) == [7, -7]  # byte order fixed


def test_stereo_frames_and_shapes() -> None:
    stereo = PcmEncoder("pcm_s16le", 2)
    frames = np.array([[0.5, -0.5], [1.0, 0.0]], dtype=np.float32)
    assert int16s(stereo.encode(frames)) == [16384, -16384, 32767, 0]
    with pytest.raises(ValueError, match="channel"):
        stereo.encode(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="whole number"):
        stereo.encode([0.1, 0.2, 0.3])


def test_bad_samples_are_refused_not_sent() -> None:
    s16 = PcmEncoder("pcm_s16le", 1)
    with pytest.raises(ValueError, match="NaN"):
        s16.encode([0.0, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        s16.encode(np.array([0.0, np.inf], dtype=np.float32))
    with pytest.raises(TypeError, match="str"):
        s16.encode("0.5")
    with pytest.raises(TypeError, match="int32"):
        s16.encode(np.zeros(4, dtype=np.int32))


def test_raw_bytes_cut_inside_a_sample_are_rejoined() -> None:
    s16 = PcmEncoder("pcm_s16le", 1)
    assert s16.encode(b"\x01") == b""
    assert s16.pending_bytes == 1
    assert s16.encode(b"\x02\x03\x04\x05") == b"\x01\x02\x03\x04"
    assert s16.encode(bytearray(b"\x06")) == b"\x05\x06"


# -- pacing, reconnect policy, captions ----------------------------------------------------------


def test_pacer_schedules_each_chunk_when_it_has_been_spoken() -> None:
    pacer = Pacer(100.0, bytes_per_s=32_000)
    assert [pacer.due(3200) for _ in range(3)] == pytest.approx([100.1, 100.2, 100.3])
    fast = Pacer(0.0, bytes_per_s=32_000, speed=4.0)
    assert fast.due(32_000) == pytest.approx(0.25)


def test_paced_never_runs_ahead_of_real_time() -> None:
    chunks = [bytes(3200)] * 5  # 0.5 s of audio

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        got = [chunk async for chunk in paced(chunks, bytes_per_s=BYTES_PER_S, speed=2.0)]
        assert got == chunks
        return loop.time() - start

    assert run(scenario()) >= 0.25


def test_reconnect_delays_start_immediate_then_grow_to_the_cap() -> None:
    policy = ReconnectPolicy(initial_delay_s=0.1, max_delay_s=0.5, jitter=0.2)
    delays = policy.delays(random.Random(7))
    first = [next(delays) for _ in range(8)]
    assert first[0] == 0.0
    for delay, nominal in zip(first[1:], [0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5], strict=True):
        assert nominal * 0.8 <= delay <= nominal * 1.2
    with pytest.raises(ValueError):
        ReconnectPolicy(initial_delay_s=0.0)


def caption_events() -> list[Any]:
    final = parse_event(FINAL_MESSAGE)
    assert isinstance(final, Final)
    return [
        SpeechStarted(1, 0.0),
        SpeechEnded(2, 2.73),  # the VAD runs ahead of the decoder: boundaries come first
        SpeechStarted(3, 2.97),
        SpeechEnded(4, 4.89),
        Partial(5, 0, 0.0, 0.9, " And so"),
        Final(6, 0, 0.0, 2.1, " And so my fellow Americans.", (), "en", -0.2, 0.0),
        Partial(7, 1, 3.74, 3.9, " Ask"),
        final,  # " Ask not." at 3.74-4.34
        Partial(8, 2, 5.5, 5.9, " What"),
        Closed(9, "end"),
    ]


def test_captions_on_a_pipe_are_one_committed_line_per_utterance() -> None:
    out = io.StringIO()
    captions = Captions(out)
    for event in caption_events():
        captions.show(event)
    assert out.getvalue() == "And so my fellow Americans.\nAsk not.\n"


def test_captions_on_a_tty_rewrite_the_partial_in_place() -> None:
    out = io.StringIO()
    captions = Captions(out, tty=True)
    for event in caption_events():
        captions.show(event)
    text = out.getvalue()
    assert "\r\x1b[K\x1b[2m And so\x1b[0m" in text  # the partial, dimmed
    assert "\r\x1b[KAnd so my fellow Americans.\n" in text  # committed, then a new line
    assert "\r\x1b[KAsk not.\x1b[2m What" not in text  # next utterance's partial: new line
    assert text.endswith("\r\x1b[K\x1b[2m What\x1b[0m")  # an unfinished partial commits nothing


# -- reading files -------------------------------------------------------------------------------


def test_read_file_gives_16k_mono_s16_chunks_matching_an_independent_decode() -> None:
    from streamd.audio import load_audio

    chunks = list(read_file(JFK, chunk_s=0.1))
    assert all(len(c) == 3200 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 3200
    got = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32767
    want = load_audio(JFK)
    assert abs(len(got) - len(want)) <= 16  # the resamplers' edges may differ by a millisecond
    n = min(len(got), len(want))
    assert float(np.sqrt(np.mean((got[:n] - want[:n]) ** 2))) < 1e-3
    assert float(np.sqrt(np.mean(want**2))) > 0.05  # the comparison is of real signal


def test_read_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(streamd_client.AudioError, match="no such file"):
        read_file(tmp_path / "missing.wav")
    junk = tmp_path / "junk.flac"
    junk.write_text("not audio at all\n" * 20)
    with pytest.raises(streamd_client.AudioError, match=re.escape("junk.flac")):
        list(read_file(junk))


def test_read_file_without_the_files_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "soxr", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'streamd-client[files]'")):
        read_file(JFK)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [(["stream"], "file"), (["stream", "x.wav", "--url", "http://h/"], "ws://HOST")],
)
def test_cli_usage_errors_exit_2(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["stream", "/nonexistent/talk.wav"], "/nonexistent/talk.wav: no such file"),
        (["stream", str(JFK), "--url", "ws://127.0.0.1:9/v1/stream"], "cannot connect"),
        (["mic", "--device", "999"], "999"),  # no such device, or no PortAudio at all
    ],
)
def test_cli_errors_are_one_line_and_exit_1(args: list[str], complaint: str) -> None:
    result = subprocess.run(
        [CLIENT, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 1
    assert result.stderr.startswith("streamd-client: ") and "Traceback" not in result.stderr
    if args[0] == "mic" and "PortAudio" in result.stderr:
        return
    assert complaint in result.stderr, result.stderr


# -- scripted servers: the reconnect machinery ---------------------------------------------------

Script = Callable[["ScriptedServer", ServerConnection, dict[str, Any]], Awaitable[None]]


class ScriptedServer:
    """A protocol v1 server on a real localhost socket; connection i runs `scripts[i]`.

    Records each connection's `start` message, its audio and its control messages, and the
    loop time at which each connection arrived.
    """

    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts
        self.starts: list[dict[str, Any]] = []
        self.audio: list[bytearray] = []
        self.arrivals: list[float] = []
        self.url = ""
        self._index: dict[ServerConnection, int] = {}

    async def __aenter__(self) -> ScriptedServer:
        self.server = await serve(self._handle, "127.0.0.1", 0, compression=None)
        port = next(iter(self.server.sockets)).getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/stream"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        index = len(self.arrivals)
        self.arrivals.append(asyncio.get_running_loop().time())
        self.audio.append(bytearray())
        self._index[ws] = index
        start = json.loads(await ws.recv())
        self.starts.append(start)
        await self.scripts[index](self, ws, start)

    @staticmethod
    async def send(ws: ServerConnection, **message: Any) -> None:
        await ws.send(json.dumps(message))

    async def ready(
        self,
        ws: ServerConnection,
        session: str,
        resumed: bool = False,
        audio_s: float | None = None,
    ) -> None:
        """`audio_s` defaults to what the daemon says: the audio of the connections before."""
        if audio_s is None:
            audio_s = heard_s(*self.audio[: self._index[ws]]) if resumed else 0.0
        await self.send(
            ws, type="ready", seq=0, session=session, protocol=1, model="fake",
            sample_rate=16000, resumed=resumed, audio_s=audio_s,
        )  # fmt: skip

    async def final(self, ws: ServerConnection, seq: int, segment: int, text: str) -> None:
        await self.send(ws, **{**FINAL_MESSAGE, "seq": seq, "segment": segment, "text": text})

    async def receive_until(self, ws: ServerConnection, control: str) -> None:
        """Collect audio until the client sends `{"type": control}`."""
        async for frame in ws:
            if isinstance(frame, bytes):
                self.audio[self._index[ws]] += frame
            elif json.loads(frame)["type"] == control:
                return
        raise AssertionError(f"connection ended before {control}")

    async def receive_frames(self, ws: ServerConnection, count: int) -> None:
        """Collect `count` audio frames (the daemon hears them)."""
        for _ in range(count):
            frame = await ws.recv()
            assert isinstance(frame, bytes), frame
            self.audio[self._index[ws]] += frame

    @staticmethod
    async def miss_frame(ws: ServerConnection) -> None:
        """Take one audio frame off the socket unheard, as one still in the daemon's receive
        buffer when the connection dies (so the client surely handed it to this connection)."""
        assert isinstance(await ws.recv(), bytes)

    @staticmethod
    def drop(ws: ServerConnection) -> None:
        """Kill the TCP connection without a close frame, as a crash or a network cut does."""
        assert ws.transport is not None
        ws.transport.abort()


def heard_s(*audio: bytes | bytearray) -> float:
    """The session's audio_s after these connections' audio, kept as the daemon keeps it
    (rounded to the ms, per connection)."""
    total = 0.0
    for part in audio:
        total = round(total + len(part) / BYTES_PER_S, 3)
    return total


async def busy(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
    await server.send(ws, type="error", seq=1, code="busy", message="full", fatal=True)
    await ws.close(1013, "busy")


async def events_of(stream: Stream) -> list[Any]:
    return [event async for event in stream]


def test_refusals_before_ready_raise_typed_errors() -> None:
    async def unauthorized(server: ScriptedServer, ws: ServerConnection, _: Any) -> None:
        await server.send(ws, type="error", seq=1, code="unauthorized", message="no", fatal=True)
        await ws.close(1008, "unauthorized")

    async def close_1008_only(server: ScriptedServer, ws: ServerConnection, _: Any) -> None:
        await ws.close(1008, "")

    async def bad_start(server: ScriptedServer, ws: ServerConnection, _: Any) -> None:
        await server.send(ws, type="error", seq=1, code="bad_message", message="x", fatal=False)
        await ws.wait_closed()

    async def scenario() -> None:
        async with ScriptedServer(unauthorized, close_1008_only, busy, bad_start) as server:
            for expected, code in [
                (UnauthorizedError, "unauthorized"),
                (UnauthorizedError, "unauthorized"),
                (BusyError, "busy"),
                (ServerError, "bad_message"),
            ]:
                with pytest.raises(expected) as info:
                    async with streamd_client.connect(server.url):
                        pass
                assert info.value.code == code
        with pytest.raises(ConnectError, match="cannot connect"):
            async with streamd_client.connect(server.url):  # nothing listens there any more
                pass

    run(scenario(), WAIT_S * 3)


def test_resume_after_a_drop_skips_finals_already_delivered() -> None:
    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.final(ws, 1, 0, " one")
        await server.final(ws, 2, 1, " two")
        await server.receive_until(ws, "finalize")  # the client has both finals
        server.drop(ws)

    async def resumed(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1", resumed=True)
        await server.final(ws, 2, 1, " two")  # already delivered: must not come out again
        await server.final(ws, 3, 2, " three")
        await server.receive_until(ws, "end")
        await server.send(ws, type="closed", seq=4, reason="end")
        await ws.close()

    async def scenario() -> None:
        async with (
            ScriptedServer(first, resumed) as server,
            streamd_client.connect(server.url, reconnect=FAST, level_offset_db=-6.0) as stream,
        ):
            got: list[Any] = []
            async for event in stream:
                got.append(event)
                if isinstance(event, Final) and event.seq == 2:
                    await stream.finalize()
                    await stream.end()  # sent on the dying connection; re-sent after resume
            assert [type(e).__name__ for e in got] == ["Ready", "Final", "Final", "Final", "Closed"]
            assert [e.text for e in got if isinstance(e, Final)] == [" one", " two", " three"]
            assert server.starts[1]["resume"] == {"session": "s1", "after_seq": 2}
            # the microphone is the same after a resume
            assert [start["level_offset_db"] for start in server.starts] == [-6.0, -6.0]
            assert stream.session == "s1" and stream.reconnects == 1 and stream.last_seq == 4

    run(scenario(), WAIT_S * 3)


def test_an_unknown_session_on_resume_starts_a_new_one_visibly() -> None:
    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.final(ws, 5, 0, " old")
        await server.receive_until(ws, "finalize")
        server.drop(ws)

    async def fresh(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.send(ws, type="error", seq=1, code="unknown_session", message="?", fatal=False)
        await server.ready(ws, "s2")
        await server.final(ws, 1, 0, " new")  # seq starts over in the new session
        await server.receive_until(ws, "end")
        await server.send(ws, type="closed", seq=2, reason="end")
        await ws.close()

    async def scenario() -> None:
        async with (
            ScriptedServer(first, fresh) as server,
            streamd_client.connect(server.url, reconnect=FAST) as stream,
        ):
            got: list[Any] = []
            async for event in stream:
                got.append(event)
                if isinstance(event, Final) and event.text == " old":
                    await stream.finalize()
                    await stream.end()
            kinds = [type(e).__name__ for e in got]
            assert kinds == ["Ready", "Final", "Error", "Ready", "Final", "Closed"]
            assert got[2].code == "unknown_session" and got[3].session == "s2"
            assert got[4].text == " new" and stream.session == "s2"

    run(scenario(), WAIT_S * 3)


def test_audio_sent_while_disconnected_is_bounded_then_delivered_in_order() -> None:
    may_resume = asyncio.Event()

    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.receive_until(ws, "finalize")
        server.drop(ws)

    async def resumed(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await may_resume.wait()
        await server.ready(ws, "s1", resumed=True)
        await server.receive_until(ws, "end")
        await server.send(ws, type="closed", seq=1, reason="end")
        await ws.close()

    def audio(value: int, seconds: float) -> bytes:
        return bytes([value]) * int(seconds * BYTES_PER_S)

    async def scenario() -> None:
        async with (
            ScriptedServer(first, resumed) as server,
            streamd_client.connect(server.url, reconnect=FAST, max_buffer_s=1.0) as stream,
        ):
            await stream.send(audio(1, 0.5))
            await stream.finalize()
            await until(lambda: not stream.connected)
            await stream.send(audio(2, 0.6))
            with pytest.raises(BufferOverflowError, match="max_buffer_s=1"):
                await stream.send(audio(3, 0.6))
            assert stream.buffered_s == pytest.approx(0.6)
            may_resume.set()
            await stream.send(audio(4, 0.3))
            await stream.end()
            assert [type(e) for e in await events_of(stream)] == [Ready, Closed]
            assert bytes(server.audio[0]) == audio(1, 0.5)
            assert bytes(server.audio[1]) == audio(2, 0.6) + audio(4, 0.3)
            assert stream.buffered_s == 0

    run(scenario(), WAIT_S * 3)


def test_audio_the_daemon_did_not_hear_is_resent_first_once_and_in_order() -> None:
    """Frames written to a connection that died unheard go out again after the resume, cut
    where `ready.audio_s` says, ahead of the audio held while disconnected and of `end`; twice,
    so the stream's positions carry over from one resume to the next."""
    frame = 1100  # 34.375 ms: where the daemon stops hearing is not on a whole millisecond
    sent = random.Random(3).randbytes(frame * 60)
    all_queued = asyncio.Event()

    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.receive_frames(ws, 5)
        await server.miss_frame(ws)
        server.drop(ws)

    async def second(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await all_queued.wait()  # the rest of the audio and `end` wait in the client
        audio_s = heard_s(server.audio[0])
        assert audio_s * BYTES_PER_S > len(server.audio[0])  # rounded up: floor would skip
        await server.ready(ws, "s1", resumed=True, audio_s=audio_s)
        await server.receive_frames(ws, 7)
        await server.miss_frame(ws)
        server.drop(ws)

    async def third(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1", resumed=True, audio_s=heard_s(*server.audio[:2]))
        await server.receive_until(ws, "end")
        await server.send(ws, type="closed", seq=1, reason="end")
        await ws.close()

    async def scenario() -> None:
        async with (
            ScriptedServer(first, second, third) as server,
            streamd_client.connect(server.url, reconnect=FAST) as stream,
        ):
            for i in range(0, len(sent), frame):
                if i == 10 * frame:
                    await until(lambda: not stream.connected)
                await stream.send(sent[i : i + frame])
            await stream.end()
            all_queued.set()
            assert [type(e) for e in await events_of(stream)] == [Ready, Closed]
            assert stream.reconnects == 2
            # every byte heard exactly once, in order, across the three connections
            assert bytes(server.audio[0] + server.audio[1] + server.audio[2]) == sent
            assert stream.resent_s >= 2 * frame / BYTES_PER_S  # at least the missed frames
            assert stream.lost_s == 0.0 and stream.buffered_s == 0.0

    run(scenario(), WAIT_S * 3)


def test_unheard_audio_older_than_the_kept_history_is_counted_as_lost() -> None:
    frame = 1100
    sent = random.Random(4).randbytes(frame * 10)

    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.receive_frames(ws, 2)
        for _ in range(8):
            await server.miss_frame(ws)
        server.drop(ws)

    async def resumed(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1", resumed=True)
        await server.receive_until(ws, "end")
        await server.send(ws, type="closed", seq=1, reason="end")
        await ws.close()

    async def scenario() -> None:
        async with (
            ScriptedServer(first, resumed) as server,
            streamd_client.connect(server.url, reconnect=FAST, max_buffer_s=0.1) as stream,
        ):
            for i in range(0, len(sent), frame):
                await stream.send(sent[i : i + frame])
            await stream.end()
            assert [type(e) for e in await events_of(stream)] == [Ready, Closed]
            # 0.1 s of history holds the last two whole frames: those are resent
            assert bytes(server.audio[1]) == sent[-2 * frame :]
            assert stream.resent_s == 2 * frame / BYTES_PER_S
            # the six frames before them are gone; the stream knows where the daemon stopped
            # only to the ms audio_s is rounded to
            assert stream.lost_s == pytest.approx(6 * frame / BYTES_PER_S, abs=0.0005)

    run(scenario(), WAIT_S * 3)


def test_reconnect_backs_off_while_busy_and_retries_a_session_still_in_use() -> None:
    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.receive_until(ws, "finalize")
        server.drop(ws)

    async def in_use(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.send(ws, type="error", seq=1, code="session_in_use", message="", fatal=False)
        await ws.wait_closed()

    async def resumed(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1", resumed=True)
        await server.receive_until(ws, "end")
        await server.send(ws, type="closed", seq=1, reason="end")
        await ws.close()

    async def scenario() -> None:
        async with (
            ScriptedServer(first, busy, busy, in_use, resumed) as server,
            streamd_client.connect(server.url, reconnect=FAST) as stream,
        ):
            await stream.finalize()
            await until(lambda: len(server.arrivals) == 5)
            await stream.end()
            assert [type(e) for e in await events_of(stream)] == [Ready, Closed]
            gaps = np.diff(server.arrivals[1:])
            # FAST waits 0, 0.05, 0.1, 0.2 s before attempts 1..4: never a hot loop
            assert gaps[0] >= 0.05 * 0.9 and gaps[1] >= 0.1 * 0.9 and gaps[2] >= 0.2 * 0.9
            assert stream.reconnects == 1

    run(scenario(), WAIT_S * 3)


def test_after_a_shutdown_the_stream_resumes_on_the_restarted_daemon() -> None:
    async def stopping(server: ScriptedServer, ws: ServerConnection, _: Any) -> None:
        await server.ready(ws, "s1")
        await server.final(ws, 1, 0, " before")
        await server.send(ws, type="closed", seq=2, reason="shutdown")
        await ws.close(1001, "shutdown")

    async def restarted(server: ScriptedServer, ws: ServerConnection, _: Any) -> None:
        await server.ready(ws, "s1", resumed=True)
        await server.final(ws, 3, 1, " after")
        await server.receive_until(ws, "end")
        await server.send(ws, type="closed", seq=4, reason="end")
        await ws.close()

    async def scenario() -> None:
        async with (
            ScriptedServer(stopping, busy, restarted) as server,
            streamd_client.connect(server.url, reconnect=FAST) as stream,
        ):
            got: list[Any] = []
            async for event in stream:
                got.append(event)
                if isinstance(event, Final) and event.text == " after":
                    await stream.end()
            assert [e.text for e in got if isinstance(e, Final)] == [" before", " after"]
            assert got[-1] == Closed(4, "end") and not any(
                e.reason == "shutdown" for e in got if isinstance(e, Closed)
            )
            assert server.starts[2]["resume"] == {"session": "s1", "after_seq": 2}

    run(scenario(), WAIT_S * 3)


def test_without_reconnect_a_drop_fails_the_stream() -> None:
    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.receive_until(ws, "finalize")
        server.drop(ws)

    async def scenario() -> None:
        async with (
            ScriptedServer(first) as server,
            streamd_client.connect(server.url, reconnect=False) as stream,
        ):
            await stream.finalize()
            with pytest.raises(ConnectionLostError, match="reconnect is off"):
                await events_of(stream)
            with pytest.raises(ConnectionLostError):
                await stream.send(b"\0\0")

    run(scenario(), WAIT_S * 3)


def test_reconnecting_gives_up_after_the_policy_time() -> None:
    async def first(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.receive_until(ws, "finalize")
        server.server.close(close_connections=False)  # nothing listens any more
        server.drop(ws)

    policy = ReconnectPolicy(initial_delay_s=0.05, max_delay_s=0.1, give_up_after_s=0.5)

    async def scenario() -> None:
        # timed from before connecting: the policy's clock starts somewhere after that (at the
        # last contact), so a busy machine cannot make this look shorter than it was
        started = asyncio.get_running_loop().time()
        async with (
            ScriptedServer(first) as server,
            streamd_client.connect(server.url, reconnect=policy) as stream,
        ):
            await stream.finalize()
            with pytest.raises(ConnectionLostError, match=r"within 0\.5 s"):
                await events_of(stream)
            # it stops when the next delay (<= max_delay_s plus 20% jitter) would pass the
            # deadline: not before give_up_after_s less one such delay
            assert asyncio.get_running_loop().time() - started >= 0.5 - 0.1 * 1.2

    run(scenario(), WAIT_S * 3)


def test_a_fatal_error_mid_stream_is_raised_not_yielded() -> None:
    async def failing(server: ScriptedServer, ws: ServerConnection, start: dict[str, Any]) -> None:
        await server.ready(ws, "s1")
        await server.send(ws, type="error", seq=1, code="engine_error", message="oom", fatal=True)
        await server.send(ws, type="closed", seq=2, reason="error")
        await ws.close()

    async def scenario() -> None:
        async with (
            ScriptedServer(failing) as server,
            streamd_client.connect(server.url) as stream,
        ):
            got: list[Any] = []
            with pytest.raises(ServerError, match="engine_error: oom"):
                async for event in stream:
                    got.append(event)
            assert [type(e) for e in got] == [Ready]
            with pytest.raises(ServerError):
                await stream.send(b"\0\0")

    run(scenario(), WAIT_S * 3)


# -- the real daemon -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("sdk"), "--threads", "1") as d:
        yield d


async def stream_file(stream: Stream, path: Path) -> None:
    """Send `path` as fast as the connection takes it (pacing does not matter here)."""
    await send_pcm(stream, b"".join(read_file(path)))
    await stream.end()


async def send_pcm(stream: Stream, pcm: bytes, frame_s: float = 0.5) -> None:
    """Send in frames of `frame_s`, as a live client would (not one multi-second frame)."""
    step = int(frame_s * 16_000) * 2
    for i in range(0, len(pcm), step):
        await stream.send(pcm[i : i + step])


def transcript(events: list[Any]) -> str:
    return words("".join(e.text for e in events if isinstance(e, Final)))


def assert_well_ordered(events: list[Any]) -> None:
    """Each final exactly once: seqs strictly increase, segment ids go up by one."""
    seqs = [e.seq for e in events if not isinstance(e, Ready)]
    assert seqs == sorted(set(seqs)), seqs
    segments = [e.segment for e in events if isinstance(e, Final)]
    assert segments == list(range(segments[0], segments[0] + len(segments))), segments


def test_async_api_transcribes_a_file(daemon: Daemon) -> None:
    async def scenario() -> list[Any]:
        async with streamd_client.connect(daemon.ws_url, language="en") as stream:
            sender = asyncio.create_task(stream_file(stream, JFK))
            events = await events_of(stream)
            await sender
            assert isinstance(events[0], Ready) and events[0].session == stream.session
            assert events[0].protocol == 1 and not events[0].resumed
            return events

    events = run(scenario())
    assert events[-1] == Closed(events[-1].seq, "end")
    assert PHRASE in transcript(events), transcript(events)
    assert_well_ordered(events)
    finals = [e for e in events if isinstance(e, Final)]
    assert all(0 <= f.start <= f.end <= 11.1 and f.words for f in finals)
    assert all(f.language == "en" for f in finals)


def test_sync_api_with_float_samples(daemon: Daemon) -> None:
    samples = np.frombuffer(b"".join(read_file(JFK)), dtype="<i2").astype(np.float32) / 32768
    with streamd_client.connect_sync(
        daemon.ws_url, language="en", encoding="pcm_f32le", reconnect=False
    ) as stream:
        for i in range(0, len(samples), 8000):
            stream.send(samples[i : i + 8000])  # numpy float32, sent as pcm_f32le
        stream.end()
        events: list[Any] = list(stream)
        assert stream.session is not None and events[0].session == stream.session
        with pytest.raises(StreamClosedError):
            stream.send(samples[:100])
    assert isinstance(events[-1], Closed) and events[-1].reason == "end"
    assert PHRASE in transcript(events), transcript(events)
    assert_well_ordered(events)


def test_cli_prints_the_words(daemon: Daemon) -> None:
    result = subprocess.run(
        [CLIENT, "stream", JFK, "--url", daemon.ws_url, "--no-realtime", "--language", "en"],
        capture_output=True,
        text=True,
        timeout=SCENARIO_S,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert PHRASE in words(result.stdout), result.stdout
    assert len(lines) >= 2 and not any("\x1b" in line for line in lines)  # a pipe: plain lines


def test_cli_jsonl_at_real_time_pace(daemon: Daemon) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [CLIENT, "stream", JFK, "--url", daemon.ws_url, "--speed", "4", "--jsonl"],
        capture_output=True,
        text=True,
        timeout=SCENARIO_S,
        env={**os.environ, "STREAMD_URL": "ws://127.0.0.1:9/unused"},  # the flag wins
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 11.0 / 4  # paced, not sent at once
    events = [parse_message(line) for line in result.stdout.splitlines()]
    assert isinstance(events[0], Ready) and events[-1] == Closed(events[-1].seq, "end")
    assert PHRASE in transcript(events), transcript(events)


def test_reconnect_and_resume_after_the_connection_is_killed(daemon: Daemon) -> None:
    pcm = b"".join(read_file(JFK))
    cut = int(JFK_PAUSE_S * 16_000) * 2

    async def scenario() -> tuple[list[Any], str | None, Stream]:
        async with streamd_client.connect(
            daemon.ws_url, language="en", reconnect=FAST, frame_bytes=1 << 20
        ) as stream:
            session = stream.session
            await stream.send(pcm[:cut])  # one frame: any event after it means it arrived
            events = [await anext(stream), await anext(stream)]
            assert isinstance(events[0], Ready) and not isinstance(events[1], Ready)
            connection = stream.connection
            assert connection is not None and connection.transport is not None
            connection.transport.abort()  # no close frame: the server sees the client vanish
            # The rest goes out at once: its first frame is written to the dead socket (the
            # client cannot have noticed yet), the resumed `ready.audio_s` says it was not
            # heard, and it is sent again.
            await send_pcm(stream, pcm[cut:])
            await stream.end()
            events += await events_of(stream)
            return events, session, stream

    events, session, stream = run(scenario())
    assert stream.reconnects == 1 and stream.session == session
    assert stream.resent_s >= 0.5 and stream.lost_s == 0.0
    # the daemon heard the file once: its session timeline is exactly the file's length
    journal = (daemon.journal_dir / f"{session}.jsonl").read_text().splitlines()
    closed = [r for r in map(json.loads, journal) if r["type"] == "closed"]
    assert [r["audio_s"] for r in closed] == [JFK_PAUSE_S, round(len(pcm) / 32_000, 3)]
    assert not any(isinstance(e, Error) for e in events), events
    assert events[-1] == Closed(events[-1].seq, "end")
    text = transcript(events)
    for part in ("fellow americans", PHRASE, "ask what you can do for your country"):
        assert part in text, text  # nothing lost on either side of the cut
    assert text.count("country") == 2, text  # nothing delivered twice
    assert_well_ordered(events)
    finals = [e for e in events if isinstance(e, Final)]
    assert max(f.end for f in finals) > JFK_PAUSE_S + 3  # the second half is on one timeline


def test_daemon_closes_after_end_when_audio_came_in_one_large_frame(tmp_path: Path) -> None:
    """Protocol v1: binary frames of any size up to max_frame_bytes. A file's worth of audio in
    one frame, then `end`, must still get every final and `closed`. (Its own daemon: a stream
    that never closes also keeps the daemon from shutting down.)"""
    tail = b"".join(read_file(JFK))[int(JFK_PAUSE_S * 16_000) * 2 :]  # 6.2 s, 198 KB

    async def scenario(url: str) -> list[Any]:
        async with streamd_client.connect(
            url, language="en", frame_bytes=1 << 20, reconnect=False
        ) as stream:
            await stream.send(tail)
            await stream.end()
            events: list[Any] = []
            try:
                async with asyncio.timeout(30):
                    async for event in stream:
                        events.append(event)
            except TimeoutError:
                kinds = [type(e).__name__ for e in events]
                raise AssertionError(f"no closed within 30 s after end; got {kinds}") from None
            return events

    with running_daemon(tmp_path, "--threads", "1") as daemon:
        for _ in range(3):  # the failure this guards against was intermittent
            events = run(scenario(daemon.ws_url))
            assert events[-1] == Closed(events[-1].seq, "end")
            assert "ask what you can do for your country" in transcript(events)


def test_token_is_required_and_checked(tmp_path: Path) -> None:
    short = b"".join(read_file(AUDIO / "en" / "librispeech_a_man_said.flac"))

    async def scenario(url: str) -> None:
        for token in (None, "wrong"):
            with pytest.raises(UnauthorizedError) as info:
                async with streamd_client.connect(url, token=token):
                    pass
            assert info.value.code == "unauthorized"
        for connect in (
            streamd_client.connect(url, token="s3cret", language="en"),
            streamd_client.connect(url + "?token=s3cret", language="en"),
        ):
            async with connect as stream:
                await send_pcm(stream, short)
                await stream.end()
                events = await events_of(stream)
            assert isinstance(events[0], Ready) and events[-1].reason == "end"
            assert "universe" in transcript(events), transcript(events)

    with running_daemon(tmp_path, "--threads", "1", "--token", "s3cret") as daemon:
        run(scenario(daemon.ws_url))
        result = subprocess.run(
            [CLIENT, "stream", JFK, "--url", daemon.ws_url, "--no-realtime"],
            capture_output=True,
            text=True,
            timeout=SCENARIO_S,
            env={**os.environ, "STREAMD_TOKEN": "wrong"},
        )
        assert result.returncode == 1
        assert "unauthorized" in result.stderr and "STREAMD_TOKEN" in result.stderr
        threads = threading.active_count()
        with pytest.raises(UnauthorizedError):
            streamd_client.connect_sync(daemon.ws_url, token="wrong")
        assert threading.active_count() == threads  # the sync wrapper's thread is gone


def test_daemon_shutdown_mid_stream_is_a_closed_shutdown(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> list[Any]:
        async with streamd_client.connect(daemon.ws_url, language="en", reconnect=False) as stream:

            async def send() -> bool:
                try:
                    async for chunk in paced(read_file(JFK)):
                        await stream.send(chunk)
                except StreamClosedError:
                    return True  # the daemon ended the stream while audio still flowed
                return False

            sender = asyncio.create_task(send())
            events = []
            async for event in stream:
                events.append(event)
                if isinstance(event, Partial | Final) and event.text.strip() and not stopping:
                    stopping.append(event)
                    daemon.process.send_signal(signal.SIGTERM)
            assert await sender, "the whole file was sent before the daemon shut down"
            return events

    stopping: list[Any] = []

    with running_daemon(tmp_path, "--threads", "1") as daemon:
        events = run(scenario(daemon))
        assert daemon.process.wait(SCENARIO_S) == 0
    assert events[-1] == Closed(events[-1].seq, "shutdown")
    assert any(isinstance(e, Final) for e in events)  # what it had heard was finalized
