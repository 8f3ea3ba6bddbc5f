"""Audio for a stream: decode files to 16 kHz mono s16 chunks, and pace them like live speech.

Reading files needs the `files` extra (PyAV decodes anything FFmpeg reads, soxr resamples as
the daemon does); pacing is stdlib only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from streamd_client.errors import AudioError, MissingExtraError

SAMPLE_RATE = 16_000
SAMPLE_BYTES = 2  # pcm_s16le mono
BYTES_PER_S = SAMPLE_RATE * SAMPLE_BYTES
CHUNK_S = 0.1  # what a microphone driver typically hands over at a time
_INT16_MAX = 32767


def read_file(path: str | Path, *, chunk_s: float = CHUNK_S) -> Iterator[bytes]:
    """The audio of `path` as 16 kHz mono pcm_s16le chunks of `chunk_s` (the last is shorter).

    Any container/codec FFmpeg reads (wav, flac, mp3, ogg/opus, m4a, webm...). Decoding streams:
    a long file is not held in memory. Raises MissingExtraError without the `files` extra,
    AudioError (naming the file) for a missing, unreadable or audio-less file; errors found
    while decoding are raised by the iterator.
    """
    try:
        import av
        import numpy  # noqa: F401  (PyAV's to_ndarray needs it)
        import soxr  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("files", "reading audio files") from exc
    if chunk_s <= 0:
        raise ValueError(f"chunk_s must be positive, got {chunk_s}")
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({_reason(exc)})") from exc
    if not container.streams.audio:
        container.close()
        raise AudioError(f"{path}: contains no audio stream")
    return _chunks(container, path, round(chunk_s * SAMPLE_RATE) * SAMPLE_BYTES)


def _chunks(container: Any, path: Path, chunk_bytes: int) -> Iterator[bytes]:
    import av
    import numpy as np
    import soxr

    pending = bytearray()
    resampler: Any = None
    rate = 0

    def convert(samples: Any, last: bool = False) -> bytes:
        y = resampler.resample_chunk(samples, last=last)
        # clip, not wrap: a decoder's overshoot past full scale must not flip sign
        return bytes((np.clip(y, -1.0, 1.0) * _INT16_MAX).round().astype("<i2").tobytes())

    with container:
        stream = container.streams.audio[0]
        # planar float at the native rate; channels are averaged here and soxr resamples
        # (swresample's mono downmix adds +3 dB and its default filter is worse)
        to_float = av.AudioResampler(format="fltp")
        try:
            for frame in container.decode(stream):
                for out in to_float.resample(frame):
                    if resampler is None:
                        rate = out.sample_rate
                        resampler = soxr.ResampleStream(
                            rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"
                        )
                    elif out.sample_rate != rate:
                        raise AudioError(f"{path}: sample rate changes mid-file")
                    mono = out.to_ndarray().mean(axis=0).astype(np.float32)
                    if not np.all(np.isfinite(mono)):
                        raise AudioError(f"{path}: decoded audio contains NaN or infinity")
                    pending += convert(mono)
                    while len(pending) >= chunk_bytes:
                        yield bytes(pending[:chunk_bytes])
                        del pending[:chunk_bytes]
        except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
            raise AudioError(f"{path}: corrupt or truncated audio ({_reason(exc)})") from exc
        # Junk that FFmpeg took for a format on the strength of its extension (text named
        # .flac) decodes to nothing and declares no rate; a real empty stream declares one.
        if resampler is None and not stream.rate:
            raise AudioError(f"{path}: not a readable audio file (no audio parameters)")
    if resampler is not None:
        pending += convert(np.zeros(0, dtype=np.float32), last=True)
    for i in range(0, len(pending), chunk_bytes):
        yield bytes(pending[i : i + chunk_bytes])


class Pacer:
    """When each chunk of a recording would be available from a live source.

    A microphone hands over a chunk once it has been spoken, so chunk i is due at
    `start + (audio before it + its own duration) / speed`. Pure arithmetic; the caller owns
    the clock.
    """

    def __init__(self, start: float, *, bytes_per_s: int = BYTES_PER_S, speed: float = 1.0):
        if speed <= 0 or bytes_per_s <= 0:
            raise ValueError("speed and bytes_per_s must be positive")
        self.start = start
        self.bytes_per_s = bytes_per_s
        self.speed = speed
        self.sent_bytes = 0

    def due(self, chunk_bytes: int) -> float:
        """The clock time at which the next chunk, of `chunk_bytes`, is due; counts it as sent."""
        self.sent_bytes += chunk_bytes
        return self.start + self.sent_bytes / self.bytes_per_s / self.speed


async def paced(
    chunks: Iterable[bytes], *, bytes_per_s: int = BYTES_PER_S, speed: float = 1.0
) -> AsyncIterator[bytes]:
    """`chunks`, each yielded no earlier than real-time pace (`speed` times faster) allows.

    A consumer that falls behind is not made to wait further: the schedule is absolute, so
    pacing never drifts.
    """
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop.time(), bytes_per_s=bytes_per_s, speed=speed)
    for chunk in chunks:
        delay = pacer.due(len(chunk)) - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield chunk


def paced_sync(
    chunks: Iterable[bytes], *, bytes_per_s: int = BYTES_PER_S, speed: float = 1.0
) -> Iterator[bytes]:
    """The blocking twin of `paced`, for the sync API."""
    pacer = Pacer(time.monotonic(), bytes_per_s=bytes_per_s, speed=speed)
    for chunk in chunks:
        delay = pacer.due(len(chunk)) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield chunk


def _reason(exc: BaseException) -> str:
    """The error's own message on one line, without FFmpeg's errno and file name."""
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(text.split()) or type(exc).__name__
