"""Decode any common audio file to 16 kHz mono float32, the only format the pipeline uses."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import soxr

from streamd.errors import AudioError

SAMPLE_RATE = 16_000

# WAVE format tags whose header fields have fixed relations we can check (PCM, IEEE float,
# A-law, mu-law, extensible). Compressed tags (ADPCM, MP3-in-WAV...) use block_align differently.
_WAV_PCM_TAGS = frozenset({0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE})
_WAV_MAX_CHUNKS = 64  # chunks to skip looking for "fmt " before leaving the file to FFmpeg


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 `samples` with soxr (high quality); identity when rates agree."""
    if from_rate <= 0 or to_rate <= 0:
        raise AudioError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if from_rate == to_rate or samples.size == 0:
        return samples
    return np.asarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def load_audio(path: str | Path) -> np.ndarray:
    """Samples of `path` as 16 kHz mono float32, nominally in [-1, 1] (nothing is clipped).

    Any container/codec FFmpeg (via PyAV) reads: wav, flac, mp3, m4a/aac, ogg/opus, webm...
    Channels are averaged to mono. Raises `AudioError` with a one-line reason naming `path` for a
    missing, empty, unreadable, corrupt, truncated or audio-less file; an empty stream gives an
    empty array.
    """
    import av  # heavy (FFmpeg); only needed when files are read

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    try:
        if path.stat().st_size == 0:
            raise AudioError(f"{path}: file is empty (0 bytes)")
        _check_wav_header(path)
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({_reason(exc)})") from exc
    chunks: list[np.ndarray] = []
    rate = 0
    with container:
        if not container.streams.audio:
            raise AudioError(f"{path}: contains no audio stream")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise AudioError(f"{path}: no decoder for this audio codec")
        # Decode to planar float32 at the native rate and layout; channels are averaged here and
        # soxr resamples (swresample's mono downmix adds +3 dB, and its default filter is worse).
        to_float = av.AudioResampler(format="fltp")
        try:
            for frame in container.decode(stream):
                rate = frame.sample_rate
                chunks.extend(out.to_ndarray().mean(axis=0) for out in to_float.resample(frame))
            chunks.extend(out.to_ndarray().mean(axis=0) for out in to_float.resample(None))
        except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
            at_s = sum(chunk.size for chunk in chunks) / max(rate, 1)
            raise AudioError(
                f"{path}: corrupt or truncated audio at {at_s:.2f} s ({_reason(exc)})"
            ) from exc
        if not chunks:
            # A real but empty stream still declares its rate; junk FFmpeg took for a format
            # on the strength of its file extension (text named .flac) declares nothing.
            if not stream.rate:
                raise AudioError(f"{path}: not a readable audio file (no audio parameters)")
            return np.zeros(0, dtype=np.float32)
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{path}: decoded audio contains NaN or infinite samples")
    return resample(samples, rate)


def _check_wav_header(path: Path) -> None:
    """Raise `AudioError` if a RIFF/WAVE file's format chunk contradicts itself.

    FFmpeg trusts such a header and decodes noise (a wrong bit depth reads 16-bit samples as
    8-bit ones); the fields of uncompressed formats are redundant, so a corrupt one shows.
    """
    fmt = _wav_format_chunk(path)
    if fmt is None:
        return
    if len(fmt) < 16:
        raise AudioError(f"{path}: WAV format chunk is truncated")
    tag, channels, rate, byte_rate, block_align, bits = struct.unpack("<HHIIHH", fmt)
    if tag not in _WAV_PCM_TAGS:
        return
    if (
        channels == 0
        or rate == 0
        or bits == 0
        or block_align != channels * math.ceil(bits / 8)
        or byte_rate != rate * block_align
        or (tag in (0x0006, 0x0007) and bits != 8)
    ):
        raise AudioError(
            f"{path}: corrupt WAV header ({channels} channels, {rate} Hz, {bits} bits, "
            f"block align {block_align}, byte rate {byte_rate} do not agree)"
        )


def _wav_format_chunk(path: Path) -> bytes | None:
    """First 16 bytes (fewer if cut short) of a RIFF/WAVE file's `fmt ` chunk; None if not WAV."""
    with path.open("rb") as f:
        riff = f.read(12)
        if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None  # not WAV, or not recognisably so: FFmpeg decides
        for _ in range(_WAV_MAX_CHUNKS):
            header = f.read(8)
            if len(header) < 8:
                return None
            size = int.from_bytes(header[4:], "little")
            if header[:4] == b"fmt ":
                return f.read(min(size, 16))
            f.seek(size + size % 2, 1)  # chunks are padded to even length
    return None


def _reason(exc: BaseException) -> str:
    """The error's own message on one line, without FFmpeg's errno and file name."""
    text = getattr(exc, "strerror", None) or str(exc)  # FFmpegError and OSError carry strerror
    return " ".join(text.split()) or type(exc).__name__
