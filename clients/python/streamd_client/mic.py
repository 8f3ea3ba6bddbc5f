"""Microphone audio as pcm_s16le chunks (the `mic` extra: sounddevice / PortAudio).

The device is opened at its own default rate; the daemon resamples (it accepts 8-48 kHz), so no
resampler is needed here and no device is refused for not doing 16 kHz.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from streamd_client.errors import AudioError, MissingExtraError

CHUNK_S = 0.1
MAX_QUEUED_S = 10.0  # audio captured but not yet taken by the sender


def _sounddevice() -> Any:
    try:
        import sounddevice
    except ImportError as exc:
        raise MissingExtraError("mic", "microphone input") from exc
    except OSError as exc:  # the module imports, but the PortAudio library is missing
        raise AudioError(f"PortAudio is not available ({exc}); install libportaudio2") from exc
    return sounddevice


def list_devices() -> str:
    """The input devices PortAudio sees, one per line, as `index: name (rate Hz)`."""
    sd = _sounddevice()
    lines = [
        f"{i}: {d['name']} ({d['default_samplerate']:g} Hz)"
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]
    return "\n".join(lines) or "no input devices"


class Microphone:
    """Mono 16-bit capture from `device` (index or name substring; None: the default).

    `async with Microphone() as mic: async for chunk in mic: ...` — `sample_rate` is what to
    declare in `connect()`. If the consumer falls more than MAX_QUEUED_S behind, iteration
    raises AudioError rather than silently dropping audio.
    """

    def __init__(self, device: int | str | None = None, *, chunk_s: float = CHUNK_S) -> None:
        sd = _sounddevice()
        try:
            info = sd.query_devices(device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            raise AudioError(f"no input device {device!r}: {exc}") from exc
        self.device = device
        self.name: str = info["name"]
        self.sample_rate = int(info["default_samplerate"])
        self._blocksize = max(1, round(chunk_s * self.sample_rate))
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(max(1, round(MAX_QUEUED_S / chunk_s)))
        self._overflow: AudioError | None = None
        self._stream: Any = None
        self._sd = sd

    async def __aenter__(self) -> Microphone:
        loop = asyncio.get_running_loop()

        def put(data: bytes) -> None:
            try:
                self._queue.put_nowait(data)
            except asyncio.QueueFull:
                self._overflow = AudioError(
                    f"microphone audio backed up by more than {MAX_QUEUED_S:g} s: "
                    "the connection cannot keep up"
                )

        def callback(indata: Any, frames: int, time: Any, status: Any) -> None:
            # PortAudio's thread: hand the bytes to the loop, never block here
            loop.call_soon_threadsafe(put, bytes(indata))

        try:
            self._stream = self._sd.RawInputStream(
                samplerate=self.sample_rate,
                channels=1,
                dtype="int16",
                blocksize=self._blocksize,
                device=self.device,
                callback=callback,
            )
            self._stream.start()
        except (ValueError, self._sd.PortAudioError) as exc:
            raise AudioError(f"cannot open input device {self.name!r}: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._overflow is not None:
            raise self._overflow
        return await self._queue.get()
