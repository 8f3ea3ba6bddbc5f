"""Is the microphone too quiet for the VAD? Judged from `speech_ended.level_dbfs`.

The VAD's level thresholds are absolute (docs/vad.md, "Input level"): under about -26 dBFS dull
speech can be lost unless the input says its level (`VadConfig.level_offset_db`). The gate
cannot correct this alone without letting murmur in, so the tools tell the user instead.
"""

from __future__ import annotations

from collections import deque
from statistics import median

QUIET_LEVEL_DBFS = -26.0
UTTERANCES_JUDGED = 5  # the median of the last few: one soft word raises no alarm
MIN_UTTERANCES = 3  # nor does a soft "um" that opens the stream
# An offset of level + this brings a quiet talker to where the thresholds were set.
NORMAL_LEVEL_DBFS = -20.0


class QuietInputJudge:
    """Feed each utterance's level; `note` returns the offset to suggest the first time the
    median of the last UTTERANCES_JUDGED (at least MIN_UTTERANCES) falls below
    QUIET_LEVEL_DBFS (None otherwise, and ever after)."""

    def __init__(self) -> None:
        self._levels: deque[float] = deque(maxlen=UTTERANCES_JUDGED)
        self._told = False

    def note(self, level_dbfs: float | None) -> tuple[int, int] | None:
        """(median level, suggested level_offset_db), in whole dB, once; None when there is
        nothing to say."""
        if level_dbfs is None or self._told:
            return None
        self._levels.append(level_dbfs)
        level = median(self._levels)
        if len(self._levels) < MIN_UTTERANCES or level >= QUIET_LEVEL_DBFS:
            return None
        self._told = True
        shown = round(level)
        return shown, shown - round(NORMAL_LEVEL_DBFS)


def quiet_advice(level: int, remedy: str) -> str:
    """What to tell the user about an input at `level` dBFS; `remedy` says how to give the
    offset where they are (a flag, a start field)."""
    return (
        f"the input is quiet (speech at {level} dBFS): quiet words can be missed; if they are, "
        f"raise the input volume or {remedy}"
    )
