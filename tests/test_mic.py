"""`streamd mic`: the capture path with an injected input stream, device selection, the
no-device case on this machine's real PortAudio, and live transcription with tiny.en.

The fake stream plays a real recording through the source's PortAudio callback from its own
thread, block by block, exactly as sounddevice would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sounddevice
import soxr

from streamd import mic
from streamd.audio import load_audio
from streamd.cli import main
from streamd.errors import AudioError, ConfigError
from streamd.mic import (
    NO_INPUT_DEVICE,
    InputDevice,
    SoundDeviceSource,
    select_input_device,
)
from streamd.streaming.events import Final
from streamd.streaming.replay import run_live
from streamd.streaming.session import Session
from streamd.streaming.window_decoder import WindowDecoder
from tests.audio_fixtures import shared_audio_dir

ROOT = Path(__file__).resolve().parents[1]
JFK_PHRASE = "ask not what your country can do for you"
JFK_END = "ask not what your country can do for you ask what you can do for your country"
MIC_48K = InputDevice(
    index=4, name="Fake USB Mic", hostapi="ALSA", max_channels=2, default_rate_hz=48000
)
MIC_16K = InputDevice(
    index=5, name="Fake Headset", hostapi="ALSA", max_channels=1, default_rate_hz=16000
)


class FakeInputStream:
    """A `sounddevice.InputStream` stand-in playing `frames` [n, channels] through `callback`.

    speed: times real time (None: as fast as the thread goes). pause_after: blocks delivered
    before it sets `paused` and waits for `resume`. overflow_blocks: blocks flagged
    input_overflow. then: "end" stops like a callback raising CallbackStop (finished_callback);
    "silence" goes on with zeros until stop(), like a microphone in a quiet room; "nothing"
    delivers no block at all (a dead device).
    """

    def __init__(
        self,
        frames: np.ndarray,
        *,
        speed: float | None = None,
        pause_after: int | None = None,
        overflow_blocks: frozenset[int] = frozenset(),
        then: str = "end",
        **opened: Any,
    ) -> None:
        self.frames = frames
        self.speed = speed
        self.pause_after = pause_after
        self.overflow_blocks = overflow_blocks
        self.then = then
        self.opened = opened
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.delivered_s = 0.0  # audio delivered so far
        self.stopped = self.closed = False
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._play, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self.resume.set()
        self._thread.join()
        self.stopped = True

    def close(self) -> None:
        self.closed = True

    def _play(self) -> None:
        rate, size = self.opened["samplerate"], self.opened["blocksize"]
        callback: Callable[..., None] = self.opened["callback"]
        started = time.perf_counter()
        blocks = 0

        def deliver(block: np.ndarray) -> None:
            nonlocal blocks, started
            flags = sounddevice.CallbackFlags()
            flags.input_overflow = blocks in self.overflow_blocks
            callback(block, len(block), None, flags)
            blocks += 1
            self.delivered_s += len(block) / rate
            if self.speed is not None:
                lag = started + self.delivered_s / self.speed - time.perf_counter()
                time.sleep(max(lag, 0.0))
            if blocks == self.pause_after:
                self.paused.set()
                self.resume.wait()
                if self.speed is not None:  # go on at pace, no burst to catch up
                    started = time.perf_counter() - self.delivered_s / self.speed

        if self.then == "nothing":
            self._halt.wait()
            return
        for start in range(0, len(self.frames), size):
            if self._halt.is_set():
                return
            block = self.frames[start : start + size]
            # PortAudio always hands over whole blocks
            deliver(np.pad(block, ((0, size - len(block)), (0, 0))))
        while self.then == "silence" and not self._halt.is_set():
            deliver(np.zeros((size, self.frames.shape[1]), np.float32))
        if self.then == "end":
            self.opened["finished_callback"]()


class Injected:
    """A stream factory for `SoundDeviceSource` that keeps the streams it made."""

    def __init__(self, frames: np.ndarray, **options: Any) -> None:
        self.frames = frames
        self.options = options
        self.streams: list[FakeInputStream] = []

    def __call__(self, **opened: Any) -> FakeInputStream:
        stream = FakeInputStream(self.frames, **self.options, **opened)
        self.streams.append(stream)
        return stream


@pytest.fixture(scope="module")
def jfk_16k() -> np.ndarray:
    return load_audio(shared_audio_dir() / "en" / "jfk.flac")


@pytest.fixture(scope="module")
def jfk_48k_stereo(jfk_16k: np.ndarray) -> np.ndarray:
    """jfk.flac at 48 kHz, as two channels that are the speech plus and minus noise 3x as loud:
    only their average is the speech itself."""
    up = soxr.resample(jfk_16k, 16000, 48000, quality="HQ")
    noise = 3 * np.random.default_rng(0).standard_normal(len(up)) * np.sqrt(np.mean(up**2))
    return np.stack([up + noise, up - noise], axis=1).astype(np.float32)


def _collect(source: SoundDeviceSource, on_chunk: Callable[[int], Any] | None = None) -> np.ndarray:
    async def go() -> list[np.ndarray]:
        chunks = []
        async with aclosing(source.__aiter__()) as it:
            async for chunk in it:
                assert chunk.dtype == np.float32 and chunk.ndim == 1
                chunks.append(chunk)
                if on_chunk is not None:
                    await on_chunk(len(chunks))
        return chunks

    return np.concatenate(asyncio.run(go()))


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def test_capture_downmixes_and_resamples_a_48khz_stereo_device(
    jfk_16k: np.ndarray, jfk_48k_stereo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_16k(*, device: int, channels: int, dtype: str, samplerate: int) -> None:
        if samplerate != 48000:
            raise sounddevice.PortAudioError("Invalid sample rate", -9997)

    monkeypatch.setattr(sounddevice, "check_input_settings", no_16k)
    injected = Injected(jfk_48k_stereo, overflow_blocks=frozenset({7}))
    source = SoundDeviceSource(MIC_48K, max_queued_s=60.0, stream_factory=injected)
    assert source.rate_hz == 48000  # the device's own rate, since 16 kHz was refused
    got = _collect(source)

    (stream,) = injected.streams
    assert stream.opened | {"callback": None, "finished_callback": None} == {
        "device": 4,
        "samplerate": 48000,
        "channels": 2,
        "dtype": "float32",
        "blocksize": 960,  # 20 ms
        "callback": None,
        "finished_callback": None,
    }
    assert stream.stopped and stream.closed
    assert abs(len(got) - len(jfk_16k)) <= 320  # within one 20 ms block
    n = min(len(got), len(jfk_16k))
    assert np.corrcoef(got[:n], jfk_16k[:n])[0, 1] > 0.999
    # the noise is loud enough that one channel alone would not pass
    left = soxr.resample(jfk_48k_stereo[:, 0], 48000, 16000)[:n]
    assert np.corrcoef(left, jfk_16k[:n])[0, 1] < 0.8
    blocks = -(-len(jfk_48k_stereo) // 960)
    assert source.stats.blocks == blocks
    assert source.stats.dropped_blocks == 0
    assert source.stats.input_overflows == 1


def test_a_stalled_consumer_drops_blocks_counts_them_and_keeps_time(
    jfk_16k: np.ndarray,
) -> None:
    pause_after = 300  # blocks 1..299 arrive while the consumer is stalled
    queued = 100  # 2 s
    # at 10x real time the queue holds 200 ms of wall time before it drops: only the stall does
    injected = Injected(jfk_16k[:, None], speed=10.0, pause_after=pause_after)
    reports: list[float] = []
    source = SoundDeviceSource(
        MIC_16K,
        rate_hz=16000,
        max_queued_s=queued * 0.02,
        stream_factory=injected,
        on_drop=lambda stats: reports.append(stats.dropped_s),
    )

    async def stall_after_first(count: int) -> None:
        if count == 1:
            (stream,) = injected.streams
            await asyncio.to_thread(stream.paused.wait)
            await asyncio.sleep(0.1)  # the loop hands the queued callbacks over
            stream.resume.set()

    got = _collect(source, stall_after_first)
    stats = source.stats
    blocks = -(-len(jfk_16k) // 320)
    assert stats.blocks == blocks
    # the first block was taken (or not quite yet), the queue filled, the rest was dropped
    assert pause_after - 1 - queued <= stats.dropped_blocks <= pause_after - queued
    assert stats.dropped_s == pytest.approx(stats.dropped_blocks * 0.02)
    assert reports == [pytest.approx(0.02)]  # one report when the burst began
    # silence stands in for the dropped blocks, so everything after them is on time
    expected = np.pad(jfk_16k, (0, blocks * 320 - len(jfk_16k)))
    gap = slice((pause_after - stats.dropped_blocks) * 320, pause_after * 320)
    expected[gap] = 0.0
    np.testing.assert_array_equal(got, expected)


def test_a_device_that_delivers_nothing_is_an_audio_error(jfk_16k: np.ndarray) -> None:
    injected = Injected(jfk_16k[:, None], then="nothing")
    source = SoundDeviceSource(MIC_16K, rate_hz=16000, stall_s=0.2, stream_factory=injected)
    with pytest.raises(AudioError, match=r"delivered nothing for 0\.2 s"):
        _collect(source)
    assert injected.streams[0].stopped and injected.streams[0].closed


def test_device_selection_by_index_or_name() -> None:
    devices = [
        InputDevice(0, "HDA Intel PCH: ALC257 Analog (hw:0,0)", "ALSA", 2, 44100),
        InputDevice(3, "USB Mic", "ALSA", 1, 48000, is_default=True),
        InputDevice(7, "USB Mic (2)", "ALSA", 1, 48000),
        InputDevice(9, "pulse", "ALSA", 32, 44100),
    ]
    assert select_input_device(devices, None).index == 3
    assert select_input_device([devices[0], devices[3]], None).index == 0  # no default input
    assert select_input_device(devices, "9").index == 9
    assert select_input_device(devices, "  alc257 ").index == 0
    assert select_input_device(devices, "usb mic").index == 3  # exact name beats the longer
    assert select_input_device(devices, "(2)").index == 7
    with pytest.raises(
        ConfigError, match=r"'USB' matches several .*3 'USB Mic'.*7 'USB Mic \(2\)'"
    ):
        select_input_device(devices, "USB")
    with pytest.raises(ConfigError, match="no audio input device with index 4; `streamd mic"):
        select_input_device(devices, "4")
    with pytest.raises(ConfigError, match="no audio input device matches 'webcam'"):
        select_input_device(devices, "webcam")
    with pytest.raises(ConfigError) as no_device:
        select_input_device([], "USB")
    assert str(no_device.value) == NO_INPUT_DEVICE


def test_list_devices_marks_the_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = [MIC_48K, InputDevice(7, "USB Mic", "ALSA", 1, 44100, is_default=True)]
    monkeypatch.setattr(mic, "list_input_devices", lambda: devices)
    assert main(["mic", "--list-devices"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "   4  Fake USB Mic  [ALSA, 2 ch, 48000 Hz]",
        "*  7  USB Mic  [ALSA, 1 ch, 44100 Hz]",
        "(* default input; choose one with --device INDEX or part of its name)",
    ]


class _NoPortAudio:
    """An import hook that fails the way sounddevice does without libportaudio."""

    def find_spec(self, name: str, *args: Any) -> None:
        if name == "sounddevice":
            raise OSError("PortAudio library not found")


def test_missing_portaudio_or_sounddevice_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice")
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    with pytest.raises(ConfigError, match="apt install libportaudio2"):
        mic.list_input_devices()
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # not installed
    with pytest.raises(ConfigError, match="pip install sounddevice"):
        mic.open_input(None)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamd", "mic", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_without_an_input_device_says_so() -> None:
    if mic.list_input_devices():
        pytest.skip("this machine has an audio input device")
    done = _cli("--model", "tiny.en")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"streamd: error: {NO_INPUT_DEVICE}\n"
    done = _cli("--device", "USB")
    assert (done.returncode, done.stderr) == (1, f"streamd: error: {NO_INPUT_DEVICE}\n")
    listed = _cli("--list-devices")
    assert (listed.returncode, listed.stderr) == (0, "")
    assert listed.stdout == "no audio input devices found (PortAudio sees none)\n"


@pytest.mark.slow
def test_run_live_transcribes_a_live_stream_with_tiny(
    jfk_48k_stereo: np.ndarray, one_torch_thread: None
) -> None:
    from streamd.models.loader import load_model
    from streamd.streaming.window_decoder import WindowDecoder

    decoder = WindowDecoder(load_model("tiny.en"))
    injected = Injected(jfk_48k_stereo, speed=1.0)  # real time, as a microphone delivers
    source = SoundDeviceSource(MIC_48K, rate_hz=48000, stream_factory=injected)
    session = Session(language="en")
    seen: list[float] = []
    started = time.perf_counter()
    emitted = asyncio.run(
        run_live(source, session, decoder.decode, lambda e: seen.append(e.emitted_at))
    )
    wall = time.perf_counter() - started

    assert session.finished
    assert seen == [e.emitted_at for e in emitted]
    finals = [e.event for e in emitted if isinstance(e.event, Final)]
    assert JFK_PHRASE in _words("".join(f.text for f in finals))
    assert wall >= len(jfk_48k_stereo) / 48000 - 0.05  # paced by the source, not faster
    # computation-aware: no word comes out before the microphone has delivered it
    for e in emitted:
        assert e.emitted_at >= getattr(e.event, "end", getattr(e.event, "t", 0.0)) - 0.05
    assert injected.streams[0].closed


@pytest.mark.slow
def test_cli_captions_until_ctrl_c_then_flushes_the_last_words(
    jfk_48k_stereo: np.ndarray,
    one_torch_thread: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a microphone that hears jfk.flac at twice real time, then a quiet room until stopped
    injected = Injected(jfk_48k_stereo, speed=2.0, then="silence")
    speech_s = len(jfk_48k_stereo) / 48000

    def open_input(spec: str | None, on_drop: Any = None) -> SoundDeviceSource:
        assert spec == "Fake"
        return SoundDeviceSource(MIC_48K, rate_hz=48000, stream_factory=injected, on_drop=on_drop)

    def press_ctrl_c() -> None:
        while not injected.streams or injected.streams[0].delivered_s < speech_s:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    # the first decode's lazy initialisation is paid before the microphone starts
    warmed: list[int] = []
    real_warm_up = WindowDecoder.warm_up

    def warm_up(self: WindowDecoder) -> float:
        warmed.append(len(injected.streams))
        return real_warm_up(self)

    monkeypatch.setattr(WindowDecoder, "warm_up", warm_up)
    monkeypatch.setattr(mic, "open_input", open_input)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    code = main(["mic", "--model", "tiny.en", "--language", "en", "--device", "Fake", "--jsonl"])
    assert warmed == [0]  # once, and no input stream had been opened yet

    out, err = capsys.readouterr()
    assert code == 0
    assert "listening on 4 'Fake USB Mic' (ALSA)" in err and "stopping" in err
    messages = [json.loads(line) for line in out.splitlines()]
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    finals = [m for m in messages if m["type"] == "final"]
    # Ctrl-C came as the last word ended: only the flush can have made the last words final
    assert _words("".join(m["text"] for m in finals)).endswith(JFK_END)
    assert injected.streams[0].stopped and injected.streams[0].closed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
