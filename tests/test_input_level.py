"""QuietInputJudge: a quiet microphone is pointed out once, a soft word is not."""

from __future__ import annotations

from streamd.input_level import QuietInputJudge


def test_normal_levels_and_one_soft_word_raise_nothing() -> None:
    judge = QuietInputJudge()
    # jfk's utterances at full gain: its last word alone is at -24.7 dBFS
    assert [judge.note(level) for level in (-8.7, -10.7, -10.6, -12.5, -24.7, -31.0)] == [None] * 6


def test_a_quiet_input_is_told_once_with_the_offset_that_fits() -> None:
    judge = QuietInputJudge()
    assert judge.note(-29.5) is None  # one utterance says little (a soft "um")
    assert judge.note(None) is None  # a gate that does not measure: not counted
    assert judge.note(-22.5) is None
    assert judge.note(-23.0) is None  # median of three: -23.0, fine
    assert judge.note(-28.0) is None  # median of four: -25.5, fine
    assert judge.note(-31.0) == (-28, -8)  # median of five: -28.0, 8 dB under -20
    assert judge.note(-32.0) is None  # said once
    quiet = QuietInputJudge()
    assert [quiet.note(level) for level in (-27.0, -27.2, -26.9)] == [None, None, (-27, -7)]
