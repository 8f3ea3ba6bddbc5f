"""Deterministic test audio: silence, noise, murmur, and streams of real clips between them.

The generators and the stream builder live in streamd.evaluation (`streamd bench` needs them
from an installed streamd) and are re-exported here under their old names; what only tests
use (`voiced_mask`) stays here. Everything returns 16 kHz mono float32 numpy arrays and
depends only on its arguments.

Importable without pytest: benchmarks use it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamd.audio import SAMPLE_RATE
from streamd.evaluation.sounds import (
    GAP_KINDS,
    MURMUR_DBFS,
    NOISE_DBFS,
    GapKind,
    cache_dir,
    dbfs_to_rms,
    gap_audio,
    murmur,
    pink_noise,
    rms_dbfs,
    silence,
    white_noise,
)
from streamd.evaluation.streams import GAP_S, Gap, Utterance, build_stream, clip, manifest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_AUDIO_DIR = (PROJECT_ROOT / ".." / "shared" / "audio").resolve()

__all__ = [
    "GAP_KINDS",
    "GAP_S",
    "MURMUR_DBFS",
    "NOISE_DBFS",
    "PROJECT_ROOT",
    "SHARED_AUDIO_DIR",
    "Gap",
    "GapKind",
    "Utterance",
    "build_stream",
    "cache_dir",
    "clip",
    "dbfs_to_rms",
    "gap_audio",
    "manifest",
    "murmur",
    "pink_noise",
    "rms_dbfs",
    "silence",
    "voiced_mask",
    "white_noise",
]


def voiced_mask(samples: np.ndarray, frame_ms: int = 10, below_peak_db: float = 25.0) -> np.ndarray:
    """Reference speech activity of a clean clip: True for each `frame_ms` frame whose RMS is
    within `below_peak_db` of the clip's loud level (95th percentile of frame levels).

    A yardstick for VAD tests, independent of any VAD: it does not tell speech from noise, so
    use it only on real clips, whose background is far below their speech.
    """
    frame_len = SAMPLE_RATE * frame_ms // 1000
    n = samples.size // frame_len
    frames = np.asarray(samples[: n * frame_len], dtype=np.float64).reshape(n, frame_len)
    levels = 10.0 * np.log10(np.maximum(np.mean(frames**2, axis=1), 1e-10))
    return np.asarray(levels >= np.percentile(levels, 95) - below_peak_db)
