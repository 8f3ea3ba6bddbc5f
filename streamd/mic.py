"""Live audio capture (PortAudio via sounddevice) and the driver that feeds it into a Session.

Data flow: PortAudio's callback thread -> downmix to mono -> `loop.call_soon_threadsafe` ->
bounded `asyncio.Queue` -> soxr `ResampleStream` to 16 kHz -> `run_live` -> `Session`, with
decoding in a worker thread. Nothing here needs the model; `streamd mic` (mic_cli.py) wires a
`WindowDecoder` in.

Overload policy of the queue: PortAudio's thread must never block, so when the queue is full a
block is dropped and counted (`CaptureStats`), and the consumer later gets the same number of
zero samples in its place: stream time stays equal to wall time, and the VAD hears a pause
rather than two pieces of speech spliced together.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import soxr

from streamd.audio import SAMPLE_RATE
from streamd.errors import AudioError, ConfigError

NO_INPUT_DEVICE = (
    "no audio input device found; `streamd mic --list-devices` lists what PortAudio sees"
)
BLOCK_MS = 20  # PortAudio callback period: the granularity at which audio reaches the VAD
MAX_QUEUED_S = 5.0  # audio waiting for the event loop before blocks are dropped
STALL_S = 5.0  # a running input stream that delivers nothing this long has died
# Interfaces with many inputs usually carry the microphone on the first ones; averaging eight
# mostly silent channels would cost ~18 dB of level.
MAX_DOWNMIX_CHANNELS = 2


class AudioSource(Protocol):
    """Live audio: iterating gives float32 mono chunks at 16 kHz, in order, as they arrive.

    Each iteration opens the source (starts the device) and closing the iterator stops it; the
    iteration ends when the source does (a microphone only on error or when stopped).
    """

    def __aiter__(self) -> AsyncIterator[np.ndarray]: ...


class InputStreamLike(Protocol):
    """What the source needs of `sounddevice.InputStream` (tests inject a fake)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


# Called like `sounddevice.InputStream(device=, samplerate=, channels=, dtype=, blocksize=,
# callback=, finished_callback=)`; the callback gets (indata[frames, channels], frames, time,
# status) on a foreign thread.
StreamFactory = Callable[..., InputStreamLike]


@dataclass(frozen=True)
class InputDevice:
    """A PortAudio device with input channels, as `--list-devices` shows it."""

    index: int
    name: str
    hostapi: str
    max_channels: int
    default_rate_hz: int
    is_default: bool = False

    @property
    def label(self) -> str:
        return f"{self.index} {self.name!r} ({self.hostapi})"


@dataclass
class CaptureStats:
    """Counters of one source (mutable, read by the CLI and tests)."""

    blocks: int = 0  # delivered by PortAudio
    dropped_blocks: int = 0  # the event loop fell behind: replaced by silence
    dropped_s: float = 0.0
    input_overflows: int = 0  # PortAudio itself lost input (reported by its status flags)


def _sounddevice() -> ModuleType:
    """The sounddevice module, or a ConfigError saying what to install."""
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises this when libportaudio cannot be loaded
        raise ConfigError(
            "PortAudio library not found; install it (Debian/Ubuntu: apt install libportaudio2)"
        ) from exc
    except ImportError as exc:
        raise ConfigError(
            "audio capture needs the sounddevice package: pip install sounddevice"
        ) from exc
    return sounddevice


def list_input_devices() -> list[InputDevice]:
    """Every device PortAudio sees that has input channels (empty if there is none)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise ConfigError(f"PortAudio cannot list audio devices: {exc}") from exc
    return [
        InputDevice(
            index=int(d["index"]),
            name=str(d["name"]),
            hostapi=str(hostapis[d["hostapi"]]["name"]),
            max_channels=int(d["max_input_channels"]),
            default_rate_hz=round(d["default_samplerate"]),
            is_default=d["index"] == default,
        )
        for d in devices
        if d["max_input_channels"] > 0
    ]


def select_input_device(devices: Sequence[InputDevice], spec: str | None) -> InputDevice:
    """The device `spec` names: an index, or a case-insensitive substring of one name.

    None picks PortAudio's default input (else the first). Raises ConfigError when there is no
    input device, nothing matches, or a substring matches several names and none exactly.
    """
    if not devices:
        raise ConfigError(NO_INPUT_DEVICE)
    if spec is None:
        return next((d for d in devices if d.is_default), devices[0])
    spec = spec.strip()
    hint = "`streamd mic --list-devices` lists them"
    if spec.isdigit():
        for d in devices:
            if d.index == int(spec):
                return d
        raise ConfigError(f"no audio input device with index {spec}; {hint}")
    matches = [d for d in devices if spec.lower() in d.name.lower()]
    exact = [d for d in matches if d.name.lower() == spec.lower()]
    if len(matches) == 1 or len(exact) == 1:
        return (exact or matches)[0]
    if not matches:
        raise ConfigError(f"no audio input device matches {spec!r}; {hint}")
    names = ", ".join(d.label for d in matches)
    raise ConfigError(f"{spec!r} matches several input devices ({names}); give its index")


class _PortAudioStream:
    """`sounddevice.InputStream` with its errors converted to ConfigError at this boundary."""

    def __init__(self, label: str, **kwargs: Any) -> None:
        self._sd = _sounddevice()
        self._label = label
        with self._errors("cannot open"):
            self._stream = self._sd.InputStream(**kwargs)

    def start(self) -> None:
        with self._errors("cannot start"):
            self._stream.start()

    def stop(self) -> None:
        with self._errors("cannot stop"):
            self._stream.stop()

    def close(self) -> None:
        with self._errors("cannot close"):
            self._stream.close()

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except self._sd.PortAudioError as exc:
            raise ConfigError(f"{doing} audio input {self._label}: {exc}") from exc


def _supported_rate(device: InputDevice, channels: int) -> int:
    """16 kHz if the device captures at that rate, else its default rate (resampled later)."""
    sd = _sounddevice()
    for rate in (SAMPLE_RATE, device.default_rate_hz):
        try:
            sd.check_input_settings(
                device=device.index, channels=channels, dtype="float32", samplerate=rate
            )
        except (sd.PortAudioError, ValueError) as exc:
            error = exc
            continue
        return rate
    raise ConfigError(f"cannot capture from audio input {device.label}: {error}")


class SoundDeviceSource:
    """An `AudioSource` on a PortAudio input device.

    rate_hz / channels: what to open the device with; by default 16 kHz if the device supports
        it (else its default rate, resampled with soxr) and up to `MAX_DOWNMIX_CHANNELS`
        channels, averaged to mono.
    stream_factory: builds the input stream (`sounddevice.InputStream` by default).
    on_drop: called on the event loop when the queue starts dropping audio (once per burst);
        `stats` has the totals.
    Raises AudioError from the iteration if a started device delivers nothing for `stall_s`.
    """

    def __init__(
        self,
        device: InputDevice,
        *,
        rate_hz: int | None = None,
        channels: int | None = None,
        block_ms: int = BLOCK_MS,
        max_queued_s: float = MAX_QUEUED_S,
        stall_s: float = STALL_S,
        stream_factory: StreamFactory | None = None,
        on_drop: Callable[[CaptureStats], None] | None = None,
    ) -> None:
        if block_ms <= 0 or max_queued_s <= 0 or stall_s <= 0:
            raise ConfigError("block_ms, max_queued_s and stall_s must be positive")
        self.device = device
        self.channels = channels or min(device.max_channels, MAX_DOWNMIX_CHANNELS)
        self.rate_hz = rate_hz or _supported_rate(device, self.channels)
        self.block_frames = max(self.rate_hz * block_ms // 1000, 1)
        self.max_queued_blocks = math.ceil(max_queued_s * 1000 / block_ms)
        self.stall_s = stall_s
        self.stats = CaptureStats()
        self._factory = stream_factory or partial(_PortAudioStream, device.label)
        self._on_drop = on_drop

    async def __aiter__(self) -> AsyncGenerator[np.ndarray, None]:
        loop = asyncio.get_running_loop()
        # one slot more than audio may take, so the end marker always fits
        queue: asyncio.Queue[tuple[int, np.ndarray] | None] = asyncio.Queue(
            self.max_queued_blocks + 1
        )
        gap_frames = 0  # dropped since the last queued block
        stats = self.stats

        def enqueue(block: np.ndarray, overflow: bool) -> None:  # on the loop's thread
            nonlocal gap_frames
            stats.blocks += 1
            stats.input_overflows += overflow
            if queue.qsize() < self.max_queued_blocks:
                queue.put_nowait((gap_frames, block))
                gap_frames = 0
                return
            burst_starts = gap_frames == 0
            gap_frames += len(block)
            stats.dropped_blocks += 1
            stats.dropped_s += len(block) / self.rate_hz
            if burst_starts and self._on_drop is not None:
                self._on_drop(stats)

        def end() -> None:
            if not queue.full():
                queue.put_nowait(None)

        def callback(indata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
            # PortAudio's thread: copy out of its buffer (reused after we return), never block
            if indata.shape[1] > 1:
                block = indata.mean(axis=1, dtype=np.float32)
            else:
                block = np.array(indata[:, 0], dtype=np.float32)
            with suppress(RuntimeError):  # the loop closed while the stream was stopping
                loop.call_soon_threadsafe(enqueue, block, bool(status.input_overflow))

        def finished() -> None:
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(end)

        resampler = (
            soxr.ResampleStream(self.rate_hz, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if self.rate_hz != SAMPLE_RATE
            else None
        )

        def to_16k(samples: np.ndarray, last: bool = False) -> np.ndarray:
            if resampler is None:
                return samples
            return np.asarray(resampler.resample_chunk(samples, last=last), dtype=np.float32)

        stream = self._factory(
            device=self.device.index,
            samplerate=self.rate_hz,
            channels=self.channels,
            dtype="float32",
            blocksize=self.block_frames,
            callback=callback,
            finished_callback=finished,
        )
        try:
            stream.start()
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.stall_s)
                except TimeoutError:
                    raise AudioError(
                        f"audio input {self.device.label} delivered nothing for "
                        f"{self.stall_s:g} s (unplugged, or taken by another program?)"
                    ) from None
                if item is None:
                    break
                gap, block = item
                for samples in (np.zeros(gap, np.float32), block):
                    if len(samples) and len(out := to_16k(samples)):
                        yield out
            if len(tail := to_16k(np.zeros(0, np.float32), last=True)):
                yield tail
        finally:
            try:
                stream.stop()
            finally:
                stream.close()


def open_input(
    spec: str | None, on_drop: Callable[[CaptureStats], None] | None = None
) -> SoundDeviceSource:
    """A source on the input device `spec` names (see `select_input_device`); ConfigError when
    PortAudio is missing, there is no input device, or the device cannot capture."""
    return SoundDeviceSource(select_input_device(list_input_devices(), spec), on_drop=on_drop)
