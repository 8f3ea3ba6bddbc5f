"""What a streaming session tells its listeners: a closed union of frozen event types.

Times are seconds of stream audio (sample index / 16 kHz) since the stream's first sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamd.decoding.result import Word


@dataclass(frozen=True)
class SpeechStarted:
    """The VAD heard speech; `t` is where the audio sent to the model begins (pre-roll included)."""

    t: float


@dataclass(frozen=True)
class SpeechEnded:
    """The VAD's hangover ran out; `t` is the end of the utterance's audio. `level_dbfs`: how
    loud the talker reached the microphone (90th percentile of the voiced frames' RMS level;
    None when the VAD does not say), so that a quiet input can be seen and told
    (`VadConfig.level_offset_db`)."""

    t: float
    level_dbfs: float | None = None


@dataclass(frozen=True)
class Partial:
    """The tentative text of the next segment; replaces any earlier partial of that segment."""

    segment: int
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Final:
    """Committed text: it never changes, and every committed word is in exactly one Final."""

    segment: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...]
    language: str
    avg_logprob: float
    no_speech_prob: float


Event = SpeechStarted | SpeechEnded | Partial | Final
