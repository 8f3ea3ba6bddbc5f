"""Seeded non-speech audio: digital silence, white and pink noise, and murmur.

Every function returns 16 kHz mono float32 and depends only on its arguments, so tests and
benchmarks hear the same gaps on every machine. Murmur needs the `espeak-ng` and `sox`
programs (apt); their outputs are cached on disk (see `cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from streamd.audio import SAMPLE_RATE, load_audio
from streamd.errors import ConfigError

GapKind = Literal["silence", "white", "pink", "murmur"]
GAP_KINDS: tuple[GapKind, ...] = ("silence", "white", "pink", "murmur")
NOISE_DBFS = -50.0  # level of "white"/"pink" gaps: a quiet room through a decent microphone
MURMUR_DBFS = -35.0  # level of "murmur" gaps: people talking in the next room

# espeak-ng voice variants (no mbrola voices: those need extra packages). Speed in words per
# minute, pitch 0-99: spread so the mixed voices do not move in step.
_MURMUR_VOICES = (
    ("en-us+m1", 160, 40),
    ("en-gb+f3", 175, 65),
    ("en-us+m3", 150, 30),
    ("en-gb-scotland+f2", 170, 55),
    ("en-029+m4", 165, 45),
    ("en-gb-x-rp+f4", 155, 70),
    ("en-us-nyc+m2", 180, 35),
    ("en-gb+f1", 160, 60),
)
# Harvard sentences (list 1 and 2): none of them is in ../shared/audio, so murmur can never be
# mistaken for a reference transcript.
_MURMUR_SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
)
_MURMUR_SENTENCES_PER_VOICE = 5
_MURMUR_VOICE_GAIN_DB = 4.0  # each voice gets a random gain in +-this, so no voice is "the" one


def dbfs_to_rms(dbfs: float) -> float:
    """RMS amplitude of a signal at `dbfs` (0 dBFS = RMS 1.0, the full-scale convention here)."""
    return float(10.0 ** (dbfs / 20.0))


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level of `samples` in dBFS; -inf for digital silence or an empty array."""
    if samples.size == 0:
        return float("-inf")
    mean_square = float(np.mean(np.square(samples, dtype=np.float64)))
    return 10.0 * float(np.log10(mean_square)) if mean_square > 0 else float("-inf")


def silence(seconds: float) -> np.ndarray:
    """Digital silence (all zeros)."""
    return np.zeros(_n_samples(seconds), dtype=np.float32)


def white_noise(seconds: float, dbfs: float = NOISE_DBFS, seed: int = 0) -> np.ndarray:
    """Gaussian white noise with RMS level `dbfs`."""
    rng = np.random.default_rng([seed, 1])
    noise = rng.standard_normal(_n_samples(seconds))
    return _at_level(noise, dbfs)


def pink_noise(seconds: float, dbfs: float = NOISE_DBFS, seed: int = 0) -> np.ndarray:
    """Pink (1/f power) noise with RMS level `dbfs`, shaped in the frequency domain.

    Below 20 Hz the spectrum is flat rather than rising: a microphone chain passes no DC, and
    the rumble would otherwise dominate the RMS of long signals.
    """
    n = _n_samples(seconds)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng([seed, 2])
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs_hz = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE)
    spectrum /= np.sqrt(np.maximum(freqs_hz, 20.0))  # amplitude ~ 1/sqrt(f): power ~ 1/f
    spectrum[0] = 0.0
    return _at_level(np.fft.irfft(spectrum, n=n), dbfs)


def murmur(
    seconds: float,
    dbfs: float = MURMUR_DBFS,
    voices: int = 4,
    seed: int = 0,
    lowpass_hz: float = 1000.0,
) -> np.ndarray:
    """Several quiet espeak-ng voices talking at once, low-passed, mixed to RMS `dbfs`.

    Each voice says different sentences from a random point in its loop, at its own speed,
    pitch and gain, so the mix is a continuous babble (people talking in the next room) rather
    than one intelligible talker. Raises ConfigError if espeak-ng or sox is not installed.
    """
    n = _n_samples(seconds)
    if voices < 1:
        raise ValueError(f"murmur needs at least one voice, got {voices}")
    mix = np.zeros(n, dtype=np.float64)
    for index in range(voices):
        rng = np.random.default_rng([seed, 3, index])
        voice, speed_wpm, pitch = _MURMUR_VOICES[(seed + index) % len(_MURMUR_VOICES)]
        picks = rng.permutation(len(_MURMUR_SENTENCES))[:_MURMUR_SENTENCES_PER_VOICE]
        text = " ".join(_MURMUR_SENTENCES[i] for i in picks)
        loop = _at_level(_espeak(voice, speed_wpm, pitch, text, lowpass_hz), 0.0)
        offset = int(rng.integers(loop.size))
        repeated = np.tile(loop, (offset + n) // loop.size + 1)[offset : offset + n]
        gain_db = float(rng.uniform(-_MURMUR_VOICE_GAIN_DB, _MURMUR_VOICE_GAIN_DB))
        mix += dbfs_to_rms(gain_db) * repeated
    return _at_level(mix, dbfs)


def gap_audio(kind: GapKind, seconds: float, seed: int = 0) -> np.ndarray:
    """Non-speech audio of one `kind` (see GAP_KINDS) at the levels the streams use."""
    match kind:
        case "silence":
            return silence(seconds)
        case "white":
            return white_noise(seconds, NOISE_DBFS, seed)
        case "pink":
            return pink_noise(seconds, NOISE_DBFS, seed)
        case "murmur":
            return murmur(seconds, MURMUR_DBFS, seed=seed)
    raise ValueError(f"unknown gap kind {kind!r}; expected one of {GAP_KINDS}")


def cache_dir() -> Path:
    """Where generated speech is kept: $STREAMD_SYNTH_CACHE, else <system temp>/streamd-synth.

    Outside the work tree on purpose: the files are large, derived, and not to be committed.
    """
    override = os.environ.get("STREAMD_SYNTH_CACHE")
    path = Path(override) if override else Path(tempfile.gettempdir()) / "streamd-synth"
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def _espeak(voice: str, speed_wpm: int, pitch: int, text: str, lowpass_hz: float) -> np.ndarray:
    """espeak-ng saying `text`, resampled to 16 kHz and low-passed by sox; cached on disk and
    in memory (read-only)."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"murmur needs {' and '.join(missing)}: apt-get install -y espeak-ng sox "
            "(./dev test installs them)"
        )
    key = json.dumps([voice, speed_wpm, pitch, text, lowpass_hz, _tool_versions()])
    path = cache_dir() / f"espeak-{hashlib.sha256(key.encode()).hexdigest()[:20]}.wav"
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            raw, done = Path(tmp) / "raw.wav", Path(tmp) / "done.wav"
            speak = ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-p", str(pitch)]
            _run([*speak, "-w", str(raw), text])
            # 32-bit float output: the voices are mixed quietly, 16-bit would add its own noise
            float_16k = ["-r", str(SAMPLE_RATE), "-e", "floating-point", "-b", "32"]
            _run(["sox", str(raw), *float_16k, str(done), "lowpass", f"{lowpass_hz:g}"])
            os.replace(done, path)  # atomic: parallel test runs never read half a file
    samples = load_audio(path)
    samples.flags.writeable = False
    return samples


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ConfigError(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()}")


@cache
def _tool_versions() -> str:
    """Versions of espeak-ng and sox, part of the cache key: a new version may sound different."""
    outputs = (
        subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
        for tool in ("espeak-ng", "sox")
    )
    return " | ".join(output.strip().splitlines()[0] if output else "" for output in outputs)


def _n_samples(seconds: float) -> int:
    if seconds < 0:
        raise ValueError(f"duration must be >= 0 s, got {seconds}")
    return round(seconds * SAMPLE_RATE)


def _at_level(signal: np.ndarray, dbfs: float) -> np.ndarray:
    """`signal` scaled to RMS `dbfs`, as float32 (digital silence stays silent)."""
    rms = float(np.sqrt(np.mean(np.square(signal, dtype=np.float64)))) if signal.size else 0.0
    scale = dbfs_to_rms(dbfs) / rms if rms > 0 else 0.0
    return (signal * scale).astype(np.float32)
