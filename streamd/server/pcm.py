"""Binary audio frames -> 16 kHz mono float32, as the client declared them in `start`."""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr

from streamd.audio import SAMPLE_RATE
from streamd.server.messages import ProtocolError, Start

_DTYPES: dict[str, np.dtype[Any]] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
_S16_SCALE = 1.0 / 32768.0
# float samples this far beyond full scale are not audio (wrong encoding declared, garbage)
_F32_LIMIT = 16.0


class PcmDecoder:
    """Decodes one stream's frames; keeps resampler state across frames."""

    def __init__(self, start: Start) -> None:
        self.dtype = _DTYPES[start.encoding]
        self.channels = start.channels
        self.frame_bytes = self.dtype.itemsize * self.channels
        self._resampler = (
            None
            if start.sample_rate == SAMPLE_RATE
            else soxr.ResampleStream(start.sample_rate, SAMPLE_RATE, 1, dtype="float32")
        )
        self.samples_in = 0  # at the client's rate, per channel

    def decode(self, frame: bytes) -> np.ndarray:
        """Samples of `frame`; ProtocolError(bad_audio) if it is not whole frames of sane PCM."""
        if len(frame) % self.frame_bytes:
            raise ProtocolError(
                "bad_audio",
                f"binary frame of {len(frame)} bytes is not a whole number of "
                f"{self.frame_bytes}-byte sample frames ({self.dtype.name} x {self.channels})",
            )
        raw = np.frombuffer(frame, dtype=self.dtype)
        if self.dtype.kind == "i":
            samples = raw.astype(np.float32) * _S16_SCALE
        else:
            samples = raw.astype(np.float32)
            if not np.all(np.isfinite(samples)) or np.any(np.abs(samples) > _F32_LIMIT):
                raise ProtocolError(
                    "bad_audio", "pcm_f32le frame holds NaN/inf or values far beyond [-1, 1]"
                )
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        self.samples_in += len(samples)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        return np.ascontiguousarray(samples, dtype=np.float32)

    def flush(self) -> np.ndarray:
        """What the resampler still holds, at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(
            self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True),
            dtype=np.float32,
        )
