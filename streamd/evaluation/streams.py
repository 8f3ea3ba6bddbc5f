"""Evaluation streams: real clips from ../shared/audio joined by seeded non-speech gaps.

A stream is gap, clip, gap, clip, ..., gap; each clip is an `Utterance` with its reference
text, each gap a `Gap` of silence, noise or murmur. Everything depends only on the arguments
(and the clips), so a seed names a stream on every machine. `write_stream` puts one on disk
as a WAV with its reference and gap JSON, the files `streamd bench --out` leaves behind.
"""

from __future__ import annotations

import json
import os
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from streamd.audio import SAMPLE_RATE, load_audio
from streamd.errors import ConfigError
from streamd.evaluation.sounds import GapKind, gap_audio, white_noise

AUDIO_DIR_ENV = "STREAMD_EVAL_AUDIO"
# a source checkout lives next to ../shared/audio (DESIGN.md §8.7)
_CHECKOUT_AUDIO_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "audio"

GAP_S = (1.5, 4.0)  # gap lengths are drawn uniformly from this range
# Gap kinds of an evaluation stream, in turn: after each clip the background changes.
STREAM_GAP_ORDER: tuple[GapKind, ...] = ("silence", "white", "murmur", "pink")


@dataclass(frozen=True)
class Utterance:
    """A real clip placed in a stream: [start_s, end_s) of stream time, and what is said."""

    start_s: float
    end_s: float
    text: str
    file: str  # path relative to the audio dir, as in manifest.json


@dataclass(frozen=True)
class Gap:
    """Non-speech audio placed in a stream between clips."""

    start_s: float
    end_s: float
    kind: GapKind


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class EvaluationStream:
    """One stream: 16 kHz float32 `audio` and where its utterances and gaps are."""

    language: str
    seed: int
    audio: np.ndarray
    utterances: tuple[Utterance, ...]
    gaps: tuple[Gap, ...]

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE

    @property
    def name(self) -> str:
        """File stem for this stream: `en-seed3`."""
        return f"{self.language}-seed{self.seed}"

    @property
    def reference_text(self) -> str:
        return " ".join(u.text for u in self.utterances)


def default_audio_dir() -> Path:
    """$STREAMD_EVAL_AUDIO, else ../shared/audio beside the source checkout."""
    override = os.environ.get(AUDIO_DIR_ENV)
    return Path(override) if override else _CHECKOUT_AUDIO_DIR.resolve()


def manifest(audio_dir: Path | None = None) -> list[dict[str, Any]]:
    """Entries of <audio dir>/manifest.json (file, language, duration_s, reference, ...).

    Raises ConfigError naming the path if there is no manifest: point `audio_dir` (or
    $STREAMD_EVAL_AUDIO, or `streamd bench --audio-dir`) at the shared audio.
    """
    path = (audio_dir or default_audio_dir()) / "manifest.json"
    if not path.is_file():
        raise ConfigError(
            f"evaluation audio not found: expected {path} (set ${AUDIO_DIR_ENV} or --audio-dir)"
        )
    entries: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return entries


@cache
def clip(file: str, audio_dir: Path | None = None) -> np.ndarray:
    """A real clip (`file` as in the manifest), 16 kHz float32, read-only (cached, shared)."""
    samples = load_audio((audio_dir or default_audio_dir()) / file)
    samples.flags.writeable = False
    return samples


def build_stream(
    clips: Sequence[str],
    gaps: Sequence[GapKind],
    seed: int = 0,
    noise_floor_dbfs: float | None = None,
    audio_dir: Path | None = None,
) -> tuple[np.ndarray, list[Utterance], list[Gap]]:
    """Real clips joined by non-speech gaps: gap, clip, gap, clip, ..., gap.

    `clips` are manifest `file` paths; `gaps` has one kind more than there are clips (before
    the first clip, between clips, after the last). Gap lengths are drawn from GAP_S with
    `seed`. With `noise_floor_dbfs`, white noise at that level is added to the whole stream
    (clips included), so the joins are not the only place the floor changes; by default there
    is none and digital-silence gaps are exactly zero.

    Returns (audio, utterances, gaps), times in seconds of stream audio.
    """
    if len(gaps) != len(clips) + 1:
        raise ValueError(f"need len(clips) + 1 gaps, got {len(clips)} clips and {len(gaps)} gaps")
    rng = np.random.default_rng([seed, 4])
    parts: list[np.ndarray] = []
    utterances: list[Utterance] = []
    placed: list[Gap] = []
    texts = {entry["file"]: entry["reference"] for entry in manifest(audio_dir)}
    at = 0  # samples so far
    for index, kind in enumerate(gaps):
        seconds = round(float(rng.uniform(*GAP_S)), 3)
        audio = gap_audio(kind, seconds, seed=seed * 1000 + index)
        placed.append(Gap(at / SAMPLE_RATE, (at + audio.size) / SAMPLE_RATE, kind))
        parts.append(audio)
        at += audio.size
        if index < len(clips):
            file = clips[index]
            speech = clip(file, audio_dir)
            utterances.append(
                Utterance(at / SAMPLE_RATE, (at + speech.size) / SAMPLE_RATE, texts[file], file)
            )
            parts.append(speech)
            at += speech.size
    stream = np.concatenate(parts).astype(np.float32)
    if noise_floor_dbfs is not None:
        stream += white_noise(stream.size / SAMPLE_RATE, noise_floor_dbfs, seed=seed)
    return stream, utterances, placed


def language_clips(
    language: str, limit: int | None = None, audio_dir: Path | None = None
) -> list[str]:
    """Manifest files of `language`, in manifest order; the first `limit` if given.

    Raises ConfigError if the language has no clips or `limit` is not positive.
    """
    files = [entry["file"] for entry in manifest(audio_dir) if entry["language"] == language]
    if not files:
        raise ConfigError(f"no {language!r} clips in the evaluation audio manifest")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"need at least one clip, got {limit}")
        files = files[:limit]
    return files


def evaluation_stream(
    language: str, seed: int = 0, clips: int | None = None, audio_dir: Path | None = None
) -> EvaluationStream:
    """The benchmark stream of `language`: its clips (the first `clips` of them if given) in
    manifest order, the gaps taking STREAM_GAP_ORDER in turn, gap lengths drawn with `seed`."""
    files = language_clips(language, clips, audio_dir)
    kinds = [STREAM_GAP_ORDER[i % len(STREAM_GAP_ORDER)] for i in range(len(files) + 1)]
    audio, utterances, gaps = build_stream(files, kinds, seed=seed, audio_dir=audio_dir)
    return EvaluationStream(language, seed, audio, tuple(utterances), tuple(gaps))


def reference_records(stream: EvaluationStream) -> list[dict[str, Any]]:
    """The reference file's content: `[{start, end, text}]`, seconds of stream audio to the
    microsecond (round(t * 16000) gives back the exact sample)."""
    return [
        {"start": round(u.start_s, 6), "end": round(u.end_s, 6), "text": u.text}
        for u in stream.utterances
    ]


def gap_records(stream: EvaluationStream) -> list[dict[str, Any]]:
    """The gaps file's content: `[{start, end, kind}]`, seconds of stream audio."""
    return [
        {"start": round(g.start_s, 6), "end": round(g.end_s, 6), "kind": g.kind}
        for g in stream.gaps
    ]


def write_stream(stream: EvaluationStream, directory: Path) -> Path:
    """Write NAME.wav (16-bit PCM), NAME.reference.json and NAME.gaps.json into `directory`.

    Returns the WAV's path (the JSON files sit beside it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    wav = directory / f"{stream.name}.wav"
    write_wav(wav, stream.audio)
    for suffix, records in (("reference", reference_records), ("gaps", gap_records)):
        path = directory / f"{stream.name}.{suffix}.json"
        path.write_text(json.dumps(records(stream), indent=1, ensure_ascii=False) + "\n")
    return wav


def write_wav(path: Path, audio: np.ndarray) -> None:
    """16 kHz mono 16-bit PCM WAV of float samples in [-1, 1] (clipped beyond)."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
