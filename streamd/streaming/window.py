"""The unit of work between a session and the engine: one window in, its words out.

Plain data (numpy, no torch), so the session stays sans-I/O and testable with a scripted engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.audio import SAMPLE_RATE


@dataclass(frozen=True)
class WindowRequest:
    """Decode `audio` (16 kHz float32, at most 30 s): the speech of one or more utterances.

    pieces: `(window sample, stream sample)` where each contiguous run of speech starts; the
    non-speech gaps between utterances are cut out (the engine never sees them), so window time
    maps to stream time piecewise (`to_stream_s`).

    prompt: committed tokens before the window (context); forced: committed tokens inside the
    window (the output must start with them); draft: the last tentative hypothesis after them.
    final: the utterance has ended; every word in the result will be committed.
    probe: a step in a pause of the talker, whose words are the final if the VAD ends the
        utterance there (a scheduler serves it as soon as a final).
    max_tokens: a bound on new tokens for this much audio (a loop stops early, not at 224).
    """

    session_id: str
    request_id: int
    pieces: tuple[tuple[int, int], ...]
    audio: np.ndarray
    prompt: tuple[int, ...]
    forced: tuple[int, ...]
    draft: tuple[int, ...]
    language: str | None
    task: str
    final: bool
    max_tokens: int | None = None
    probe: bool = False

    def _piece_at(self, sample: int) -> tuple[int, int]:
        """The (window, stream) start of the piece holding window sample `sample`."""
        piece = self.pieces[0]
        for candidate in self.pieces:
            if candidate[0] > sample:
                break
            piece = candidate
        return piece

    def piece_start_s(self, window_s: float) -> float:
        """Stream time where the piece holding `window_s` begins."""
        return self._piece_at(round(window_s * SAMPLE_RATE))[1] / SAMPLE_RATE

    def to_stream_s(self, window_s: float) -> float:
        """Stream time (s) of a time inside the window (s)."""
        sample = round(window_s * SAMPLE_RATE)
        offset, stream = self._piece_at(sample)
        return (stream + sample - offset) / SAMPLE_RATE


@dataclass(frozen=True)
class HypWord:
    """A decoded word after the forced prefix: stream-absolute times in seconds, its tokens."""

    word: str
    start: float
    end: float
    probability: float
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class WindowResult:
    """The engine's answer for one `WindowRequest` (same `request_id`)."""

    request_id: int
    words: tuple[HypWord, ...]
    language: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    forward_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
