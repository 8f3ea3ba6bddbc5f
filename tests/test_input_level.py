"""QuietInputJudge: a quiet microphone is pointed out once, a soft word is not."""

from __future__ import annotations

from streamd.input_level import QuietInputJudge


def test_normal_levels_and_one_soft_word_raise_nothing() -> None:
    judge = QuietInputJudge()
    # jfk's utterances at full gain: its last word alone is at -24.7 dBFS
    assert [judge.note(level) for level in (-8.7, -10.7, -10.6, -12.5, -24.7, -31.0)] == [None] * 6


def test_a_quiet_input_is_told_once_with_the_offset_that_fits() -> None:
    judge = QuietInputJudge()
    assert judge.note(-22.5) is None
    assert judge.note(None) is None  # a gate that does not measure: not counted
    assert judge.note(-29.0) is None  # median of -22.5, -29.0: -25.75, still fine
    assert judge.note(-30.2) == (-29, -9)  # median -29.0: 9 dB under -20
    assert judge.note(-31.0) is None  # said once
    assert QuietInputJudge().note(-27.5) == (-28, -8)
