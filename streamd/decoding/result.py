"""What decoding hands back: words, segments and whole transcripts (frozen, plain data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Word:
    """One word with its audio-time span in seconds and mean token probability."""

    word: str  # as Whisper spells it, usually with its leading space
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    """A stretch of speech between two timestamp tokens, times in seconds of the whole stream."""

    id: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """The result of transcribing one file."""

    text: str
    segments: tuple[Segment, ...]
    language: str
    duration_s: float
