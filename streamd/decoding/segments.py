"""Split one window's sampled tokens into timed segments at Whisper's timestamp tokens.

The rule is openai-whisper's (`transcribe.py`): a pair of consecutive timestamp tokens closes one
segment and opens the next; a window that ends on a single timestamp was fully consumed,
otherwise the next window starts at the last timestamp (the text after it was cut off).
"""

from __future__ import annotations

from dataclasses import dataclass

TIME_PRECISION_S = 0.02  # one timestamp token step
FRAMES_PER_TIMESTAMP = 2  # mel frames (10 ms) per timestamp step (20 ms)


@dataclass(frozen=True)
class TokenSpan:
    """A segment inside a window: times relative to the window start, and which sampled tokens
    (`first` inclusive .. `last` exclusive) it covers."""

    start_s: float
    end_s: float
    first: int
    last: int


@dataclass(frozen=True)
class WindowSplit:
    """The segments of one window and how many mel frames of it were consumed."""

    spans: tuple[TokenSpan, ...]
    consumed_frames: int


def split_window(tokens: tuple[int, ...], timestamp_begin: int, window_frames: int) -> WindowSplit:
    """Segments of `tokens` for a window of `window_frames` mel frames of real audio."""
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        spans, last = [], 0
        for cut in cuts:
            start = (tokens[last] - timestamp_begin) * TIME_PRECISION_S
            end = (tokens[cut - 1] - timestamp_begin) * TIME_PRECISION_S
            spans.append(TokenSpan(start, end, last, cut))
            last = cut
        if single_ending:
            consumed = window_frames
        else:
            consumed = (tokens[last - 1] - timestamp_begin) * FRAMES_PER_TIMESTAMP
        return WindowSplit(tuple(spans), consumed)
    duration = window_frames / 100
    stamps = [t for t in tokens if t >= timestamp_begin]
    if stamps and stamps[-1] != timestamp_begin:
        duration = (stamps[-1] - timestamp_begin) * TIME_PRECISION_S
    return WindowSplit((TokenSpan(0.0, duration, 0, len(tokens)),), window_frames)
