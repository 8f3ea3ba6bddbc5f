"""The hallucination guards on hand-made hypotheses: what each one cuts, and what it must not."""

from __future__ import annotations

from collections.abc import Sequence

from streamd.streaming.guards import GuardConfig, GuardStats, apply_guards
from streamd.streaming.window import HypWord, WindowResult


def hyp(words: Sequence[str], start_s: float = 0.0, word_s: float = 0.3) -> list[HypWord]:
    return [
        HypWord(w, start_s + i * word_s, start_s + (i + 1) * word_s, 0.9, (1000 + i,))
        for i, w in enumerate(words)
    ]


def guarded(words: list[HypWord], forced: list[HypWord]) -> tuple[list[str], GuardStats]:
    result = WindowResult(0, tuple(words), "en", -0.2, 0.01, 1.2)
    stats = GuardStats()
    end_s = words[-1].end + 1.0
    kept = apply_guards(result, 10.0, GuardConfig(), stats, forced=forced, window_end_s=end_s)
    return [w.word for w in kept], stats


def test_the_window_started_over_is_cut_where_it_starts_again() -> None:
    forced = hyp([" And", " so", " my", " fellow", " Americans."])
    new = hyp([" ask", " not.", " And", " so", " my", " fellow"], start_s=1.5)
    kept, stats = guarded(new, forced)
    assert kept == [" ask", " not."]
    assert stats.dropped_words["echo"] == 4


def test_a_long_verbatim_rereading_is_cut() -> None:
    forced = hyp([" the", " long", " journey", " home", " took", " a", " year."])
    new = hyp([" She", " saw", " long", " journey", " home", " took", " a"], start_s=2.1)
    kept, stats = guarded(new, forced)
    assert kept == [" She", " saw"]
    assert stats.dropped_words["echo"] == 5


def test_a_short_phrase_said_twice_in_japanese_is_kept() -> None:
    # Japanese "words" are a character or two: a talker repeating a phrase is not an echo
    # (before, the guard dropped this and every later word of the stream)
    forced = hyp(["なん", "て", "聞", "こ", "えて", "ん", "の", "?", "ちゃん", "と"])
    said = ["聞", "こ", "えて", "ん", "の", "?", "って", "マイ", "コン", "を"]
    kept, stats = guarded(hyp(said, start_s=3.0), forced)
    assert kept == said
    assert not stats.dropped_words["echo"]


def test_a_known_phrase_is_dropped_whole_when_a_cut_leaves_its_first_word() -> None:
    # base on 0.84 s of room tone (Japanese seed 1, 150 ms pre-roll): the alignment squeezed all
    # but "ご" past the audio's end; the cut left "ご", which was committed on its own
    first = HypWord("ご", 2.55, 3.19, 0.4, (1000,))
    rest = [
        HypWord(w, 3.38, 3.385, 0.4, (1001 + i,))
        for i, w in enumerate(["視聴", "ありがとう", "ございました"])
    ]
    result = WindowResult(0, (first, *rest), "ja", -0.9, 0.4, 1.0)
    stats = GuardStats()
    kept = apply_guards(result, 0.84, GuardConfig(), stats, forced=[], window_end_s=3.39)
    assert kept == []
    assert stats.dropped_words["beyond_audio"] == 3
    assert stats.dropped_words["phrase"] == 1


def _phrase_guard(word: str, probability: float, avg_logprob: float) -> list[str]:
    words = [HypWord(word, 13.26, 13.35, probability, (1000,))]
    result = WindowResult(0, tuple(words), "en", avg_logprob, 0.5, 1.0)
    kept = apply_guards(result, 2.0, GuardConfig(), GuardStats(), forced=[], window_end_s=14.0)
    return [w.word for w in kept]


def test_yeah_on_applause_is_dropped_and_a_clear_yeah_is_kept() -> None:
    # what tiny.en wrote on the applause after "...for your country." (English stream seed 1)
    assert _phrase_guard(" Yeah.", probability=0.15, avg_logprob=-0.76) == []
    clear = WindowResult(0, (HypWord(" Yeah.", 1.0, 1.3, 0.95, (1000,)),), "en", -0.1, 0.01, 1.0)
    kept = apply_guards(clear, 2.0, GuardConfig(), GuardStats(), forced=[], window_end_s=2.0)
    assert [w.word for w in kept] == [" Yeah."]
