"""Make and find test audio: the shared real clips, PyAV transcodes, WAV files from arrays."""

from __future__ import annotations

import json
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest


def shared_audio_dir() -> Path:
    """`../shared/audio` beside the project root; fails the test run clearly if it is missing."""
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "audio").resolve()
    if not (path / "manifest.json").is_file():
        pytest.fail(
            f"shared test audio not found: expected {path}/manifest.json "
            "(the real clips live in ../shared/audio relative to the project root)",
            pytrace=False,
        )
    return path


def shared_manifest() -> list[dict[str, Any]]:
    """Entries of `manifest.json`: file (relative path), language, duration_s, reference..."""
    entries: list[dict[str, Any]] = json.loads(
        (shared_audio_dir() / "manifest.json").read_text(encoding="utf-8")
    )
    return entries


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """16-bit PCM WAV of float `samples` in [-1, 1], shape (n,) or (channels, n)."""
    frames = np.atleast_2d(np.asarray(samples, dtype=np.float64))
    pcm = np.round(np.clip(frames, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(frames.shape[0])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.T.tobytes())  # interleaved
    return path


def transcode(
    source: Path,
    dest: Path,
    codec: str,
    *,
    rate: int | None = None,
    layout: str | None = None,
) -> Path:
    """Re-encode `source` into `dest` with PyAV; the container follows `dest`'s extension.

    `rate` and `layout` ("mono", "stereo") default to the source's.
    """
    with av.open(str(source)) as src, av.open(str(dest), "w") as dst:
        in_stream = src.streams.audio[0]
        out_stream = _add_audio_stream(
            dst, codec, rate or in_stream.rate, layout or in_stream.layout
        )
        ctx = out_stream.codec_context
        ctx.open()  # fixes the encoder's sample format and frame size
        resampler = av.AudioResampler(
            format=ctx.format,
            layout=ctx.layout,
            rate=ctx.sample_rate,
            frame_size=ctx.frame_size or None,
        )
        for frame in [*src.decode(in_stream), None]:
            for out in resampler.resample(frame):
                dst.mux(out_stream.encode(out))
        dst.mux(out_stream.encode(None))
    return dest


def write_array(path: Path, samples: np.ndarray, rate: int, codec: str) -> Path:
    """Encode float32 `samples`, shape (channels, n), with `codec` (e.g. "pcm_f32le") via PyAV."""
    planes = np.ascontiguousarray(np.atleast_2d(samples), dtype=np.float32)
    layout = "mono" if planes.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as dst:
        stream = _add_audio_stream(dst, codec, rate, layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format)
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            dst.mux(stream.encode(out))
        dst.mux(stream.encode(None))
    return path


def write_video_only(path: Path) -> Path:
    """A short silent video (MPEG-4 Part 2, no audio stream) in the container `path` names."""
    with av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=25)
        assert isinstance(stream, av.video.stream.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            rgb = np.full((32, 32, 3), i * 40, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            dst.mux(stream.encode(frame))
        dst.mux(stream.encode(None))
    return path


def _add_audio_stream(
    container: av.container.OutputContainer, codec: str, rate: int, layout: str | av.AudioLayout
) -> av.audio.stream.AudioStream:
    stream = container.add_stream(codec, rate=rate)
    assert isinstance(stream, av.audio.stream.AudioStream), f"{codec} is not an audio codec"
    stream.layout = layout
    return stream
