"""Decode any common audio file to 16 kHz mono float32, the only format the pipeline uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soxr

from streamd.errors import AudioError

SAMPLE_RATE = 16_000


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 `samples` with soxr (high quality); identity when rates agree."""
    if from_rate <= 0:
        raise AudioError(f"sample rate must be positive, got {from_rate}")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if from_rate == to_rate or samples.size == 0:
        return samples
    return np.asarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def load_audio(path: str | Path) -> np.ndarray:
    """Samples of `path` as 16 kHz mono float32 in [-1, 1].

    Any container/codec FFmpeg (via PyAV) reads: wav, flac, mp3, m4a/aac, ogg/opus, webm...
    Multichannel audio is averaged to mono. Raises `AudioError` with a one-line reason for a
    missing, unreadable, corrupt or audio-less file; an empty stream gives an empty array.
    """
    import av  # heavy (FFmpeg); only needed when files are read

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    chunks: list[np.ndarray] = []
    rate = 0
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(f"{path}: contains no audio stream")
            stream = container.streams.audio[0]
            # Decode to planar float32 and let soxr do the resampling (better than swresample's
            # default filter, and one resampler for files and live streams alike).
            rate = stream.rate or stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray()[0])
    except AudioError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise AudioError(f"{path}: cannot decode audio ({_one_line(exc)})") from exc
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{path}: decoded audio contains NaN or infinite samples")
    return resample(samples, rate)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
