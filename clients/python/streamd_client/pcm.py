"""Turn what callers have (bytes, float samples, int16 samples) into protocol v1 PCM frames.

numpy is optional: its arrays are converted with their own methods, without importing numpy;
everything else uses the stdlib `array` module.
"""

from __future__ import annotations

import math
import sys
from array import array
from typing import Any

ENCODINGS = ("pcm_s16le", "pcm_f32le")
_SAMPLE_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4}
_INT16_MAX = 32767
_INT16_SCALE = 32768.0  # int16 -> float; the inverse of the daemon's decoding
_BIG_ENDIAN = sys.byteorder == "big"


def sample_bytes(encoding: str) -> int:
    """Bytes per sample of one channel in `encoding`."""
    try:
        return _SAMPLE_BYTES[encoding]
    except KeyError:
        raise ValueError(
            f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}"
        ) from None


class PcmEncoder:
    """Converts each `send()` argument to bytes in the stream's encoding.

    Raw bytes are passed through; a chunk that ends inside a sample frame keeps its tail until
    the next chunk, so callers may cut a byte stream anywhere. Float samples are nominally in
    [-1, 1] (clipped for s16); int16 samples are full scale. Multichannel samples are interleaved
    (or a numpy array shaped (frames, channels)).
    """

    def __init__(self, encoding: str, channels: int) -> None:
        self.encoding = encoding
        self.channels = channels
        self.frame_bytes = sample_bytes(encoding) * channels
        self._tail = b""

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete sample frame held back from the last raw chunk."""
        return len(self._tail)

    def encode(self, pcm: Any) -> bytes:
        """`pcm` as whole sample frames of the stream's encoding (possibly b"").

        Raises TypeError for types that are not audio, ValueError for NaN/inf samples or a
        shape that does not match the channel count.
        """
        if isinstance(pcm, array):
            return self._samples(pcm, _array_kind(pcm))
        if hasattr(pcm, "dtype") and hasattr(pcm, "astype"):  # a numpy array, duck-typed
            return self._numpy(pcm)
        if isinstance(pcm, bytes | bytearray | memoryview):
            return self._raw(bytes(pcm))
        if isinstance(pcm, list | tuple):
            return self._samples(pcm, "float")
        raise TypeError(
            f"send() takes bytes or samples (list, array.array, numpy array), "
            f"not {type(pcm).__name__}"
        )

    def _raw(self, data: bytes) -> bytes:
        data = self._tail + data
        cut = len(data) - len(data) % self.frame_bytes
        self._tail = data[cut:]
        return data[:cut]

    def _samples(self, samples: Any, kind: str) -> bytes:
        if len(samples) % self.channels:
            raise ValueError(
                f"{len(samples)} samples is not a whole number of {self.channels}-channel frames"
            )
        if kind == "float" and not all(map(math.isfinite, samples)):
            raise ValueError("samples contain NaN or infinity")
        if self.encoding == "pcm_s16le":
            if kind == "int16":
                out = array("h", samples)
            else:
                out = array("h", [round(max(-1.0, min(1.0, x)) * _INT16_MAX) for x in samples])
        elif kind == "int16":
            out = array("f", [x / _INT16_SCALE for x in samples])
        else:
            out = array("f", samples)
        if _BIG_ENDIAN:
            out.byteswap()
        return out.tobytes()

    def _numpy(self, samples: Any) -> bytes:
        if samples.ndim == 2:
            if samples.shape[1] != self.channels:
                raise ValueError(
                    f"array shaped {samples.shape} does not have {self.channels} channel(s)"
                )
        elif samples.ndim != 1:
            raise ValueError(f"array shaped {samples.shape}: want (samples,) or (frames, channels)")
        kind = samples.dtype.kind
        if kind == "f":
            if samples.size and not bool(abs(samples).max() < math.inf):  # NaN fails `<` too
                raise ValueError("samples contain NaN or infinity")
            if self.encoding == "pcm_s16le":
                scaled = (samples.clip(-1.0, 1.0) * _INT16_MAX).round()
                return bytes(scaled.astype("<i2").tobytes(order="C"))
            return bytes(samples.astype("<f4").tobytes(order="C"))
        if samples.dtype.str in ("<i2", ">i2"):
            if self.encoding == "pcm_s16le":
                return bytes(samples.astype("<i2").tobytes(order="C"))
            return bytes((samples.astype("<f4") / _INT16_SCALE).astype("<f4").tobytes(order="C"))
        raise TypeError(f"numpy arrays must be float or int16, not {samples.dtype}")


def _array_kind(samples: array[Any]) -> str:
    if samples.typecode in ("f", "d"):
        return "float"
    if samples.typecode == "h":
        return "int16"
    raise TypeError(f"array.array must have typecode 'h', 'f' or 'd', not {samples.typecode!r}")
