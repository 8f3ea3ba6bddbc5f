"""The streaming policy of `Session`, with scripted time, a scripted VAD and a scripted engine.

No model, no webrtcvad, no sleeps: `tests/scripted.py` knows where the speech is and what was
said, and checks every window the session asks for (at most 30 s, the right audio for its
pieces, nothing forced but committed words). Each test asserts the exact words that come out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from streamd.errors import SessionStateError
from streamd.streaming.agreement import word_key
from streamd.streaming.config import SessionConfig
from streamd.streaming.events import Event, Final, Partial, SpeechEnded, SpeechStarted
from streamd.streaming.replay import replay_virtual
from streamd.streaming.session import Session
from streamd.streaming.window import WindowRequest, WindowResult
from streamd.vad import SpeechAudio
from streamd.vad import SpeechEnded as VadEnded
from streamd.vad import SpeechStarted as VadStarted
from tests.scripted import (
    GAP_VALUE,
    MAX_WINDOW_SAMPLES,
    SAMPLE_RATE,
    FrontMode,
    PartialMode,
    ScriptedEngine,
    ScriptedVad,
    alternate_spelling,
    distinct_words,
    final_words,
    finals_of,
    partials_of,
    sample_regions,
    spoken,
    stream_audio,
    text_of,
    to_samples,
    true_words,
    unstable_spelling,
    window_spans,
    word_tokens,
)

CHUNK_MS = 20

# 8 words from 0.3 s to 4.2 s; the VAD passes 0-4.8 s (pre-roll and hangover included)
EIGHT = spoken(distinct_words(8), start_s=0.3)
EIGHT_REGION = (0.0, 4.8)


def make_session(
    regions: Sequence[tuple[float, float]],
    config: SessionConfig | None = None,
    end_delay: int = 0,
    vocabulary: tuple[int, ...] = (),
) -> Session:
    vad = ScriptedVad(sample_regions(regions), end_delay=end_delay)
    return Session(config=config, vad=vad, vocabulary=vocabulary)


def replay(
    engine: ScriptedEngine,
    regions: Sequence[tuple[float, float]],
    total_s: float,
    config: SessionConfig | None = None,
    chunk_ms: int = CHUNK_MS,
) -> tuple[Session, list[Event]]:
    """Replay a scripted stream through a fresh session on the virtual clock; every event."""
    session = make_session(regions, config)
    out = replay_virtual(session, stream_audio(total_s, regions), engine.decode, chunk_ms)
    return session, [e.event for e in out]


def window_end_s(request: WindowRequest) -> float:
    return request.to_stream_s(len(request.audio) / SAMPLE_RATE)


def speech_events(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, SpeechStarted | SpeechEnded)]


def word_list(events: Sequence[Event]) -> list[str]:
    return [w for w, _, _ in final_words(events)]


def assert_finals_well_formed(events: Sequence[Event]) -> None:
    finals = finals_of(events)
    assert [f.segment for f in finals] == list(range(len(finals)))
    for f in finals:
        assert f.words
        assert f.text == "".join(w.word for w in f.words)
        assert (f.start, f.end) == (f.words[0].start, f.words[-1].end)
        assert f.language == "en"


@dataclass
class Drive:
    """A hand-driven run: every event, and the events each request's result produced."""

    events: list[Event] = field(default_factory=list)
    after: dict[int, list[Event]] = field(default_factory=dict)
    sent_at: dict[int, int] = field(default_factory=dict)  # request id -> samples fed by then
    sent: dict[int, WindowRequest] = field(default_factory=dict)  # every request, by id
    cancelled: list[int] = field(default_factory=list)  # request ids stopped while held


def drive(
    session: Session,
    engine: ScriptedEngine,
    audio: np.ndarray,
    chunk_ms: int = CHUNK_MS,
    hold: Callable[[WindowRequest], int | None] | None = None,
    cancel: bool = False,
) -> Drive:
    """Feed `audio` chunk by chunk (now = audio time), answering each request at once unless
    `hold(request)` gives a stream sample: then its result comes once that much is fed.
    cancel: after each chunk, a held request the session calls `superseded` is stopped
    (`decode_cancelled`), as the live drivers do."""
    run = Drive()
    held: list[tuple[int, WindowRequest]] = []
    fed = 0

    def collect(request_id: int | None = None) -> None:
        events = session.events()
        run.events.extend(events)
        if request_id is not None:
            run.after[request_id] = events

    def answer(request: WindowRequest, now: float) -> None:
        session.decode_done(request, engine.decode_one(request), now)
        collect(request.request_id)

    def pump(now: float, release_all: bool = False) -> None:
        while True:
            due = [item for item in held if release_all or fed >= item[0]]
            held[:] = [item for item in held if not any(item is d for d in due)]
            for _, request in due:
                answer(request, now)
            requests = session.decode_requests()
            for r in requests:
                run.sent_at[r.request_id] = fed
                run.sent[r.request_id] = r
                until = hold(r) if hold is not None else None
                if until is not None and fed < until and not release_all:
                    held.append((until, r))
                else:
                    answer(r, now)
            if not due and not requests:
                return

    step = SAMPLE_RATE * chunk_ms // 1000
    for i in range(0, len(audio), step):
        chunk = audio[i : i + step]
        fed += len(chunk)
        session.feed_audio(chunk, fed / SAMPLE_RATE)
        collect()
        if cancel and held and session.superseded():
            (_, request), *others = held
            assert not others  # one request in flight per session
            held.clear()
            session.decode_cancelled(request, fed / SAMPLE_RATE)
            run.cancelled.append(request.request_id)
        pump(fed / SAMPLE_RATE)
    session.end_stream(fed / SAMPLE_RATE)
    collect()
    pump(fed / SAMPLE_RATE, release_all=True)
    assert not held
    return run


def answer_all(session: Session, engine: ScriptedEngine, now: float) -> None:
    """Decode every request the session has, at once, until it asks for none."""
    while requests := session.decode_requests():
        for r in requests:
            session.decode_done(r, engine.decode_one(r), now)


def feed(
    session: Session, engine: ScriptedEngine, audio: np.ndarray, start_now: float = 0.0
) -> tuple[list[Event], float]:
    """Feed `audio` chunk by chunk without ending the stream (now = `start_now` + audio time),
    answering every request at once; the events and the last `now`."""
    events: list[Event] = []
    step = CHUNK_MS * SAMPLE_RATE // 1000
    now = start_now
    for i in range(0, len(audio), step):
        chunk = audio[i : i + step]
        now = start_now + (i + len(chunk)) / SAMPLE_RATE
        session.feed_audio(chunk, now)
        answer_all(session, engine, now)
        events.extend(session.events())
    return events, now


# -- 1. one utterance -------------------------------------------------------------------------


def test_single_utterance_every_word_in_exactly_one_final() -> None:
    engine = ScriptedEngine(EIGHT)
    session, events = replay(engine, [EIGHT_REGION], total_s=6.0)

    assert final_words(events) == true_words(EIGHT)
    assert "".join(f.text for f in finals_of(events)) == text_of(EIGHT)
    assert_finals_well_formed(events)
    assert speech_events(events) == [SpeechStarted(0.0), SpeechEnded(4.8)]
    assert isinstance(events[0], SpeechStarted)
    first_partial = next(i for i, e in enumerate(events) if isinstance(e, Partial))
    first_final = next(i for i, e in enumerate(events) if isinstance(e, Final))
    assert first_partial < first_final
    # every word was shown as a partial before it became final
    for i, e in enumerate(events):
        if isinstance(e, Final):
            shown = {w for p in partials_of(events[:i]) for w in p.text.split()}
            assert {w.word.strip() for w in e.words} <= shown
    # the language is detected once, by the first committed words, then kept
    assert engine.requests[0].language is None
    assert engine.requests[-1].language == "en" == session.language
    assert engine.requests[-1].final
    assert session.finished
    assert session.stats.requests == len(engine.requests)


def test_events_come_out_when_their_audio_is_in() -> None:
    session = make_session([EIGHT_REGION])
    engine = ScriptedEngine(EIGHT)
    out = replay_virtual(session, stream_audio(6.0, [EIGHT_REGION]), engine.decode, CHUNK_MS)
    ended = next(e for e in out if isinstance(e.event, SpeechEnded))
    assert ended.emitted_at == 4.8
    last_final = [e for e in out if isinstance(e.event, Final)][-1]
    assert last_final.emitted_at == 4.8  # the virtual engine takes no time
    for e in out:
        if isinstance(e.event, Final):
            # a word is never final before its audio has been fed
            assert e.event.end <= e.emitted_at


# -- 2, 3. long utterances: trims, forced commits, the 30 s limit ------------------------------


@pytest.mark.parametrize(
    ("partial", "front", "end_bias_s"),
    [("cut", "drop", 0.0), ("unstable", "drop", 0.05), ("unstable", "repeat", 0.05)],
)
def test_words_straddling_trim_points_come_out_once(
    partial: PartialMode, front: FrontMode, end_bias_s: float
) -> None:
    words = spoken(distinct_words(38), start_s=0.3)  # 0.3 s .. 19.2 s
    config = SessionConfig(trim_after_s=3.0)
    engine = ScriptedEngine(words, partial=partial, front=front, end_bias_s=end_bias_s)
    session, events = replay(engine, [(0.0, 20.0)], total_s=21.0, config=config)
    assert word_list(events) == [w.word for w in words]
    if end_bias_s == 0:
        assert final_words(events) == true_words(words)
    assert session.stats.trims > 0
    assert max(len(r.audio) for r in engine.requests) <= 6 * SAMPLE_RATE  # trims keep it short
    trimmed = [r for r in engine.requests if r.pieces[0][1] > 0]
    assert trimmed
    if end_bias_s:
        # the trim point (a committed word's reported end) lies inside that word
        cut_inside = [r for r in trimmed if any(w.start < r.pieces[0][1] < w.end for w in words)]
        assert cut_inside
    if front == "repeat":
        # the engine wrote a word it had already given again; the session dropped the copy
        repeats = [
            res
            for req, res in zip(engine.requests, engine.results, strict=True)
            if res.words and to_samples(res.words[0].start) == req.pieces[0][1]
        ]
        assert repeats
    assert_finals_well_formed(events)


def test_45_s_without_a_pause_stays_within_30_s_windows() -> None:
    words = spoken(distinct_words(89), start_s=0.3)  # 0.3 s .. 44.7 s
    engine = ScriptedEngine(words, partial="unstable")
    session, events = replay(engine, [(0.0, 45.3)], total_s=46.0, chunk_ms=100)
    assert final_words(events) == true_words(words)
    assert session.stats.trims + session.stats.forced_commits > 0
    assert all(len(r.audio) <= MAX_WINDOW_SAMPLES for r in engine.requests)
    assert_finals_well_formed(events)
    assert session.finished


def test_steps_that_never_agree_are_force_committed_before_30_s() -> None:
    words = spoken(distinct_words(119), start_s=0.3)  # 0.3 s .. 59.7 s
    engine = ScriptedEngine(words, partial="unstable", disagree=True)
    session, events = replay(engine, [(0.0, 60.3)], total_s=61.0, chunk_ms=100)
    assert session.stats.forced_commits >= 2
    assert all(len(r.audio) <= MAX_WINDOW_SAMPLES for r in engine.requests)
    forced_at = [len(r.audio) for r in engine.requests if len(r.audio) >= 25 * SAMPLE_RATE]
    assert forced_at and max(forced_at) < 26 * SAMPLE_RATE
    committed = word_list(events)
    assert len(committed) == len(words)
    for got, true in zip(committed, words, strict=True):
        assert got in (true.word, alternate_spelling(true.word))


# -- 4. speech ending at a step edge --------------------------------------------------------


SEVEN = spoken(distinct_words(7), start_s=0.3)  # ends at 3.7 s


def test_speech_ending_at_a_step_edge_is_finalized_by_that_step() -> None:
    engine = ScriptedEngine(SEVEN)
    session, events = replay(engine, [(0.0, 4.0)], total_s=5.0)
    assert final_words(events) == true_words(SEVEN)
    step = SessionConfig().step_ms * SAMPLE_RATE // 1000
    assert 4 * SAMPLE_RATE % step == 0
    # one request per step of speech: the last one is the final, not an extra decode
    assert [len(r.audio) for r in engine.requests] == list(range(step, 4 * SAMPLE_RATE + 1, step))
    assert [r.final for r in engine.requests] == [False] * 7 + [True]
    assert session.finished


@pytest.mark.parametrize("how", ["end_stream", "late_vad_end"])
def test_end_after_a_step_that_covered_everything_costs_no_decode(how: str) -> None:
    if how == "end_stream":
        # the stream stops at 4.0 s mid-region: end_stream flushes the VAD
        session = make_session([(0.0, 10.0)])
        audio = stream_audio(4.0, [(0.0, 10.0)])
    else:
        # the VAD reports the end one sample after the last audio (in the next chunk)
        session = make_session([(0.0, 4.0)], end_delay=1)
        audio = stream_audio(5.0, [(0.0, 4.0)])
    engine = ScriptedEngine(SEVEN)
    events = [e.event for e in replay_virtual(session, audio, engine.decode, CHUNK_MS)]
    assert final_words(events) == true_words(SEVEN)
    assert SpeechEnded(4.0) in events
    assert len(engine.requests) == 8  # 0.5, 1.0, ... 4.0 s: nothing decoded twice


def test_a_step_in_flight_when_the_speech_ends_becomes_the_final() -> None:
    session = make_session([(0.0, 10.0)])
    engine = ScriptedEngine(EIGHT)
    session.feed_audio(stream_audio(2.0, [(0.0, 10.0)]), now=2.0)
    (step,) = session.decode_requests()
    assert not step.final
    session.end_stream(now=2.0)  # the speech ends exactly where the step in flight ends
    assert not session.finished
    assert session.decode_requests() == []
    session.decode_done(step, engine.decode_one(step), now=2.1)
    # that step's words are all final: no second decode of the same audio
    assert final_words(session.events()) == true_words(EIGHT[:3])  # 1.8-2.2 s is cut off
    assert session.decode_requests() == []
    assert session.finished


def test_finished_only_once_the_last_final_is_in() -> None:
    session = make_session([(0.0, 10.0)])
    engine = ScriptedEngine(EIGHT)
    audio = stream_audio(2.5, [(0.0, 10.0)])
    session.feed_audio(audio[: 2 * SAMPLE_RATE], now=2.0)
    (step,) = session.decode_requests()
    session.feed_audio(audio[2 * SAMPLE_RATE :], now=2.5)
    session.end_stream(now=2.5)
    assert not session.finished  # a step in flight
    session.decode_done(step, engine.decode_one(step), now=2.6)
    assert not session.finished  # the final is still to decode
    (final,) = session.decode_requests()
    assert final.final and len(final.audio) == len(audio)
    session.decode_done(final, engine.decode_one(final), now=2.7)
    assert final_words(session.events()) == true_words(EIGHT[:4])
    assert session.finished


# -- 5. end of stream mid-word ----------------------------------------------------------------


@pytest.mark.parametrize("partial", ["cut", "unstable"])
def test_end_stream_mid_word_finalizes_what_was_heard(partial: PartialMode) -> None:
    # word 6 is 3.3-3.7 s; the stream stops at 3.45 s, inside it, with the VAD still in speech
    engine = ScriptedEngine(EIGHT, partial=partial)
    session, events = replay(engine, [(0.0, 20.0)], total_s=3.45)
    expected = true_words(EIGHT[:6])
    if partial == "unstable":
        expected.append((unstable_spelling(EIGHT[6].word), EIGHT[6].start_s, 3.45))
    assert final_words(events) == expected
    assert speech_events(events) == [SpeechStarted(0.0), SpeechEnded(3.45)]
    assert engine.requests[-1].final
    assert len(engine.requests[-1].audio) == to_samples(3.45)
    assert session.finished


def test_end_stream_without_speech_finishes_at_once() -> None:
    session = make_session([(1.0, 3.0)])
    session.feed_audio(stream_audio(0.5, [(1.0, 3.0)]), now=0.5)
    assert session.decode_requests() == []
    session.end_stream(now=0.5)
    assert session.events() == []
    assert session.finished


# -- 6. several utterances, one starting while the previous final is in flight ---------------

A = spoken(distinct_words(4), start_s=0.3)  # 0.3 .. 2.2
B = spoken(distinct_words(4, first=4), start_s=3.7)  # 3.7 .. 5.6
C = spoken(distinct_words(3, first=8), start_s=8.3)  # 8.3 .. 9.7
ABC_REGIONS = [(0.0, 3.0), (3.4, 6.4), (8.0, 10.5)]


def hold_finals(request: WindowRequest) -> int | None:
    """Hold A's final until B is 0.8 s in, and B's final until C has ended."""
    if not request.final:
        return None
    return to_samples({3.0: 4.2, 6.4: 11.0}.get(window_end_s(request), 0.0))


def test_utterances_overlapping_a_final_in_flight_all_come_out_in_order() -> None:
    session = make_session(ABC_REGIONS)
    engine = ScriptedEngine(A + B + C, partial="unstable")
    run = drive(session, engine, stream_audio(12.0, ABC_REGIONS), hold=hold_finals)

    assert final_words(run.events) == true_words(A + B + C)  # times mapped back exactly
    assert speech_events(run.events) == [
        SpeechStarted(0.0),
        SpeechEnded(3.0),
        SpeechStarted(3.4),
        SpeechEnded(6.4),
        SpeechStarted(8.0),
        SpeechEnded(10.5),
    ]
    assert_finals_well_formed(run.events)
    assert session.finished
    # A's final was answered after B's audio had started to arrive...
    a_final = next(r for r in engine.requests if r.final)
    assert len(a_final.audio) == 3 * SAMPLE_RATE
    b_started = run.events.index(SpeechStarted(3.4))
    a_done = run.events.index(run.after[a_final.request_id][-1])
    assert b_started < a_done
    # each utterance was finalized by its own final request, in order
    finals = [r for r in engine.requests if r.final]
    assert [window_end_s(r) for r in finals] == [3.0, 6.4, 10.5]
    # C started and ended while B's final was in flight: its only request is its final
    c_requests = [r.request_id for r in engine.requests if window_end_s(r) > 8.0]
    assert c_requests == [finals[2].request_id]
    # B was decoded with A's speech before it (gap cut out) and A's words forced
    b_windows = [r for r in engine.requests if len(window_spans(r)) >= 2]
    assert b_windows
    a_tokens = tuple(t for w in A for t in w.tokens)
    assert any(r.forced[: len(a_tokens)] == a_tokens for r in b_windows)


# -- 7, 8. what never reaches the engine -----------------------------------------------------


def test_gaps_between_utterances_never_reach_the_engine() -> None:
    first = spoken(distinct_words(4), start_s=0.3)
    second = spoken(distinct_words(4, first=4), start_s=6.3)
    regions = [(0.0, 3.0), (6.0, 9.0)]  # a 3 s gap
    engine = ScriptedEngine(first + second)
    _, events = replay(engine, regions, total_s=10.0)
    assert final_words(events) == true_words(first + second)
    for r in engine.requests:
        assert not np.any(r.audio == GAP_VALUE)
        assert np.all(r.audio >= 0)
    both = [r for r in engine.requests if len(window_spans(r)) == 2]
    assert both
    for r in both:
        # 3 s of the first utterance, then the second from its first sample: no gap between
        assert r.audio[3 * SAMPLE_RATE - 1] == 3 * SAMPLE_RATE - 1
        assert r.audio[3 * SAMPLE_RATE] == 6 * SAMPLE_RATE


def test_a_blip_too_short_to_decode_does_not_shift_later_utterances() -> None:
    # the blip's end is retired without a decode; the next utterance must still be judged
    # against its own end of speech, not the blip's (else its words look like hangover murmur)
    words = spoken(distinct_words(5), start_s=2.3)
    engine = ScriptedEngine(words)
    session, events = replay(engine, [(0.0, 0.2), (2.0, 4.8)], total_s=6.0)
    assert final_words(events) == true_words(words)
    assert session.stats.guards.dropped_words["after_speech"] == 0
    assert session.finished


def test_a_larger_step_asked_by_the_driver_means_fewer_partial_steps() -> None:
    words = spoken(distinct_words(8), start_s=0.3)
    regions = [(0.0, 4.8)]

    def run(step_ms: int | None) -> tuple[int, list[tuple[str, float, float]]]:
        engine = ScriptedEngine(words)
        session = make_session(regions)
        audio = stream_audio(6.0, regions)
        step = SAMPLE_RATE * CHUNK_MS // 1000
        for i in range(0, len(audio), step):
            session.feed_audio(audio[i : i + step], (i + step) / SAMPLE_RATE)
            while requests := session.decode_requests(step_ms):
                for r in requests:
                    session.decode_done(r, engine.decode_one(r), (i + step) / SAMPLE_RATE)
        session.end_stream(6.0)
        while requests := session.decode_requests(step_ms):
            for r in requests:
                session.decode_done(r, engine.decode_one(r), 6.0)
        return len(engine.requests), final_words(session.events())

    normal, normal_words = run(None)
    stretched, stretched_words = run(1500)
    assert stretched_words == normal_words == true_words(words)
    assert stretched < normal


def test_ten_minutes_without_speech_cost_nothing() -> None:
    session = make_session([])
    engine = ScriptedEngine([])
    audio = np.full(600 * SAMPLE_RATE, GAP_VALUE, dtype=np.float32)
    out = replay_virtual(session, audio, engine.decode, chunk_ms=100)
    assert out == []
    assert engine.requests == []
    assert session.stats.requests == 0
    assert session.finished


# -- 9. hallucination guards -----------------------------------------------------------------

THANK_YOU = spoken([" thank", " you"], start_s=0.3, word_s=0.3, pause_s=0.0)  # 0.3 .. 0.9


def test_a_loop_is_cut_and_only_its_first_copy_is_committed() -> None:
    engine = ScriptedEngine(THANK_YOU, loop_ngram=2, loop_copies=4)
    session, events = replay(engine, [(0.0, 4.0)], total_s=5.0)
    assert session.stats.guards.dropped_words["repetition"] > 0
    assert word_list(events) == [" thank", " you"]


def test_a_loop_before_anything_is_committed_keeps_one_copy() -> None:
    # the hypothesis loops from the first step that hears the words: the guard keeps one copy
    engine = ScriptedEngine(THANK_YOU, loop_ngram=2, loop_copies=4)
    session, events = replay(engine, [(0.0, 1.6)], total_s=2.0)
    assert session.stats.guards.dropped_words["repetition"] > 0
    looped = [r for r in engine.results if len(r.words) > 2]
    assert looped
    assert word_list(events)[:2] == [" thank", " you"]
    assert [p.text for p in partials_of(events) if "thank" in p.text] == [" thank you"] * len(
        [p for p in partials_of(events) if "thank" in p.text]
    )


def test_a_decoder_stuck_on_its_context_is_given_the_audio_without_it() -> None:
    """Whisper, once a committed word is forced at the window's start, can write it forever
    (seen on a resumed stream: " Lock!" committed, then " Lock! Lock! Lock!..." for every later
    window). The guard cuts the loop, and the session decodes the audio again without that
    context (window trimmed after the committed words, no prompt): every word still comes out
    once, in both utterances, whether the loop hits a partial step or a final. Without the
    reset the window keeps its forced words and everything after the first commit is lost."""
    names = distinct_words(14)
    first = spoken(names[:7], start_s=0.3)
    second = spoken(names[7:], start_s=first[-1].end_s + 2.0)
    regions = [(0.0, first[-1].end_s + 0.5), (second[0].start_s - 0.3, second[-1].end_s + 0.5)]
    engine = ScriptedEngine([*first, *second], stuck_on_forced=True)
    session, events = replay(engine, regions, total_s=regions[-1][1] + 1.0)
    assert session.stats.guards.dropped_words["repetition"] > 0
    assert session.stats.context_resets >= 2
    assert final_words(events) == true_words([*first, *second])
    assert_finals_well_formed(events)


def test_no_speech_results_commit_nothing() -> None:
    engine = ScriptedEngine(EIGHT, no_speech=True)
    session, events = replay(engine, [EIGHT_REGION], total_s=6.0)
    assert finals_of(events) == []
    assert partials_of(events) == []
    assert session.stats.guards.dropped_words["no_speech"] > 0
    assert speech_events(events) == [SpeechStarted(0.0), SpeechEnded(4.8)]
    assert engine.requests[-1].final
    assert session.finished


def test_rejected_noise_never_grows_the_window_past_30_s() -> None:
    words = spoken(distinct_words(79), start_s=0.3)
    engine = ScriptedEngine(words, no_speech=True)
    session, events = replay(engine, [(0.0, 40.0)], total_s=41.0, chunk_ms=100)
    assert finals_of(events) == []
    assert all(len(r.audio) <= MAX_WINDOW_SAMPLES for r in engine.requests)
    assert session.stats.trims > 0
    assert session.finished


def test_after_a_long_pause_the_window_starts_afresh() -> None:
    first = spoken(distinct_words(4), start_s=0.3)  # .. 2.2
    second = spoken(distinct_words(4, first=4), start_s=40.3)
    regions = [(0.0, 3.0), (40.0, 43.0)]  # 37 s apart: more than context_gap_s
    vocabulary = (7, 8, 9)
    session = make_session(regions, vocabulary=vocabulary)
    assert session.config.context_gap_s < 37
    engine = ScriptedEngine(first + second)
    run = drive(session, engine, stream_audio(44.0, regions), chunk_ms=100)
    assert final_words(run.events) == true_words(first + second)
    assert all(r.prompt[:3] == vocabulary for r in engine.requests)
    later = [r for r in engine.requests if window_end_s(r) > 40.0]
    first_tokens = tuple(t for w in first for t in w.tokens)
    for r in later:
        # the first utterance's words are no longer in the window, only in the prompt
        assert r.pieces[0][1] >= to_samples(first[-1].end_s)
        assert r.prompt[3 : 3 + len(first_tokens)] == first_tokens
        assert r.forced[: len(first_tokens)] != first_tokens
    assert later[0].forced == ()


def test_overload_after_commits_takes_one_30_s_step() -> None:
    words = spoken(distinct_words(69), start_s=0.3)  # 0.3 .. 34.7
    region = (0.0, 35.3)
    session = make_session([region])
    engine = ScriptedEngine(words, partial="unstable")

    def slow_fourth(request: WindowRequest) -> int | None:
        # the engine stalls on the fourth step for 33 s of audio time
        return to_samples(35.0) if request.request_id == 3 else None

    run = drive(session, engine, stream_audio(36.0, [region]), hold=slow_fourth)
    assert final_words(run.events) == true_words(words)
    lengths = [len(r.audio) for r in engine.requests]
    assert max(lengths) == MAX_WINDOW_SAMPLES  # the backlog is taken 30 s at a time
    assert session.stats.forced_commits > 0


# -- 10. driving the session out of order -------------------------------------------------------


def _first_request(session: Session) -> WindowRequest:
    session.feed_audio(stream_audio(1.0, [EIGHT_REGION]), now=1.0)
    (request,) = session.decode_requests()
    return request


def test_result_for_a_request_not_in_flight_is_refused() -> None:
    session = make_session([EIGHT_REGION])
    engine = ScriptedEngine(EIGHT)
    request = _first_request(session)
    assert session.decode_requests() == []  # one request in flight at a time
    result = engine.decode_one(request)
    session.decode_done(request, result, now=1.0)
    with pytest.raises(SessionStateError):
        session.decode_done(request, result, now=1.0)  # twice


def test_result_that_does_not_match_its_request_is_refused() -> None:
    session = make_session([EIGHT_REGION])
    request = _first_request(session)
    other = WindowResult(request.request_id + 1, (), "en", -0.2, 0.01, 1.0)
    with pytest.raises(SessionStateError):
        session.decode_done(request, other, now=1.0)
    stranger = WindowRequest(
        "session",
        request.request_id + 5,
        request.pieces,
        request.audio,
        (),
        (),
        (),
        None,
        "t",
        False,
    )
    with pytest.raises(SessionStateError):
        session.decode_done(stranger, other, now=1.0)


def test_audio_after_end_stream_is_refused() -> None:
    session = make_session([EIGHT_REGION])
    session.feed_audio(stream_audio(1.0, [EIGHT_REGION]), now=1.0)
    session.end_stream(now=1.0)
    with pytest.raises(SessionStateError):
        session.feed_audio(np.zeros(160, np.float32), now=1.1)
    session.end_stream(now=1.2)  # a second end is harmless


# -- 11. the idle timer ----------------------------------------------------------------------


def test_idle_timer_finalizes_an_utterance_the_client_stopped_sending() -> None:
    config = SessionConfig()
    session = make_session([(0.0, 20.0)], config)
    engine = ScriptedEngine(EIGHT)
    assert session.get_timer() is None
    audio = stream_audio(2.9, [(0.0, 20.0)])  # the client stops 2.9 s in
    # wall clock, unrelated to audio time
    events, wall = feed(session, engine, audio, start_now=100.0)
    assert SpeechStarted(0.0) in events
    timer = session.get_timer()
    assert timer == wall + config.idle_finalize_ms / 1000

    session.handle_timer(timer - 0.001)  # too early: nothing
    assert session.events() == []
    assert session.decode_requests() == []

    session.handle_timer(timer)
    assert session.events() == [SpeechEnded(2.9)]
    (final,) = session.decode_requests()
    assert final.final
    session.decode_done(final, engine.decode_one(final), now=timer)
    last = session.events()
    assert finals_of(last)
    assert final_words(events + last) == true_words(EIGHT[:5])  # all heard by 2.9 s
    assert session.get_timer() is None  # not in speech any more
    assert not session.finished  # the stream itself goes on

    # the client sends again: the speech that follows is a new utterance, right after the cut
    more = stream_audio(4.4, [(0.0, 20.0)])[len(audio) :]
    session.feed_audio(more, now=timer + 1)
    assert session.events()[0] == SpeechStarted(2.9)
    session.end_stream(now=timer + 1)
    answer_all(session, engine, timer + 1)
    # 2.8-3.2 s was cut in two by the finalization: the first half was no word, and the
    # window still holds it, contiguous with the second, so the word is heard whole (it starts
    # no earlier than the cut: the first utterance is final)
    after = final_words(session.events())
    assert [w for w, _, _ in after] == [w.word for w in EIGHT[5:8]]
    assert after[0][1] == 2.9
    assert after[1:] == true_words(EIGHT[6:8])
    assert session.finished


# -- 12. determinism -----------------------------------------------------------------------


def request_key(r: WindowRequest) -> tuple[object, ...]:
    return (r.request_id, r.pieces, r.audio.tobytes(), r.prompt, r.forced, r.draft, r.final)


def test_the_same_script_gives_the_same_events_and_requests() -> None:
    runs = []
    for _ in range(2):
        session = make_session(ABC_REGIONS, SessionConfig(trim_after_s=2.0))
        engine = ScriptedEngine(A + B + C, partial="unstable", front="repeat", end_bias_s=0.05)
        run = drive(session, engine, stream_audio(12.0, ABC_REGIONS), hold=hold_finals)
        runs.append((run.events, [request_key(r) for r in engine.requests]))
    assert runs[0] == runs[1]
    assert finals_of(runs[0][0])


# -- 13. LocalAgreement-2 and the unstable tail ---------------------------------------------


@pytest.mark.parametrize("partial", ["cut", "unstable"])
@pytest.mark.parametrize("tail_ms", [0, 500, 1500])
def test_a_word_is_committed_by_the_second_agreeing_step_outside_the_tail(
    tail_ms: int, partial: PartialMode
) -> None:
    words = spoken(distinct_words(10), start_s=0.3)  # 0.3 .. 5.2
    region = (0.0, 5.8)
    session = make_session([region], SessionConfig(unstable_tail_ms=tail_ms))
    engine = ScriptedEngine(words, partial=partial)
    run = drive(session, engine, stream_audio(7.0, [region]))
    assert final_words(run.events) == true_words(words)
    requests, results = engine.requests, engine.results
    assert [r.request_id for r in requests] == list(range(len(requests)))
    final_id = next(r.request_id for r in requests if r.final)
    window_end = [window_end_s(r) for r in requests]

    committed_by: dict[str, int] = {}
    for rid, events in run.after.items():
        for spelled, _, _ in final_words(events):
            committed_by[spelled] = rid
    for w in words:
        first_seen = next(
            i for i, res in enumerate(results) if w.word in [h.word for h in res.words]
        )
        # not the first time; then the first step that agrees and sees it out of the tail
        rule = next(
            (
                j
                for j in range(first_seen + 1, final_id)
                if window_end[j] - tail_ms / 1000 >= w.end_s
            ),
            final_id,
        )
        assert committed_by[w.word] == rule, w.word
        if first_seen < final_id:
            shown = [p.text.split() for p in partials_of(run.after[first_seen])]
            assert any(w.word.strip() in s for s in shown)

    # each request drafts exactly the tentative words the previous result left
    for j in range(len(requests) - 1):
        n = len(final_words(run.after[j]))
        assert requests[j + 1].draft == tuple(t for h in results[j].words[n:] for t in h.tokens)


# -- bugs found while writing these tests ----------------------------------------------------


def test_prompt_holds_only_committed_words_before_the_window() -> None:
    words = spoken(distinct_words(38), start_s=0.3)
    vocabulary = (7, 8, 9)
    session = make_session([(0.0, 20.0)], SessionConfig(trim_after_s=3.0), vocabulary=vocabulary)
    engine = ScriptedEngine(words)
    drive(session, engine, stream_audio(21.0, [(0.0, 20.0)]))
    for r in engine.requests:
        start = r.pieces[0][1]
        before = tuple(t for w in words if w.end <= start for t in w.tokens)
        assert r.prompt == (*vocabulary, *before[-session.config.prompt_tokens :])


def test_overload_takes_larger_steps_and_loses_no_words() -> None:
    words = spoken(distinct_words(79), start_s=0.3)  # 0.3 .. 39.7
    region = (0.0, 40.3)
    session = make_session([region])
    engine = ScriptedEngine(words, partial="unstable")

    def slow_first(request: WindowRequest) -> int | None:
        # the first request takes 26 s of audio time (an engine busy with other streams)
        return to_samples(26.5) if request.request_id == 0 else None

    run = drive(session, engine, stream_audio(41.0, [region]), hold=slow_first)
    assert all(len(r.audio) <= MAX_WINDOW_SAMPLES for r in engine.requests)
    assert word_list(run.events) == [w.word for w in words]


def test_a_word_said_again_after_a_long_pause_is_not_dropped() -> None:
    first = spoken([" okay"], start_s=0.3)
    second = spoken([" okay", " next", " item"], start_s=40.3)
    regions = [(0.0, 1.2), (40.0, 42.0)]  # a 38.8 s pause: the second starts a fresh window
    engine = ScriptedEngine(first + second)
    _, events = replay(engine, regions, total_s=43.0, chunk_ms=100)
    assert final_words(events) == true_words(first + second)


def test_fake_words_are_distinct_and_deterministic() -> None:
    assert word_tokens(" alpha") == word_tokens(" alpha")
    assert all(1 <= len(word_tokens(w)) <= 2 for w in distinct_words(60))
    assert len({word_key(w) for w in distinct_words(120)}) == 120


def _vad_run(
    vad: ScriptedVad, audio: np.ndarray, sizes: Sequence[int]
) -> tuple[list[str], list[object], np.ndarray]:
    """Feed `audio` in chunks of `sizes` (cycled), then flush: the kinds of events (consecutive
    audio merged), the start/end events, and all the speech audio passed, in order."""
    kinds: list[str] = []
    marks: list[object] = []
    passed: list[np.ndarray] = []
    expect = -1
    pos = i = 0
    events: list[object] = []
    while pos < len(audio):
        events.extend(vad.feed(audio[pos : pos + sizes[i % len(sizes)]]))
        pos += sizes[i % len(sizes)]
        i += 1
    events.extend(vad.flush())
    for e in events:
        if isinstance(e, SpeechAudio):
            assert e.start_sample == expect  # contiguous within the utterance
            expect += len(e.samples)
            passed.append(e.samples)
            if kinds[-1] != "audio":
                kinds.append("audio")
            continue
        if isinstance(e, VadStarted):
            expect = e.sample
        elif isinstance(e, VadEnded):
            assert e.sample == expect  # ends where its audio ends
        kinds.append(type(e).__name__)
        marks.append(e)
    return kinds, marks, np.concatenate(passed)


def test_scripted_vad_passes_each_speech_sample_once_whatever_the_chunks() -> None:
    regions = [(0.5, 1.0), (1.0, 2.0), (3.0, 4.5)]  # the first two touch
    audio = stream_audio(4.2, regions)  # ends inside the third: flush closes it
    runs = [
        _vad_run(ScriptedVad(sample_regions(regions)), audio, sizes)
        for sizes in ([320], [1], [7, 1000, 3], [len(audio)])
    ]
    kinds, marks, passed = runs[0]
    for other in runs[1:]:
        assert other[0] == kinds and other[1] == marks
        assert np.array_equal(other[2], passed)
    assert kinds == ["SpeechStarted", "audio", "SpeechEnded"] * 3
    assert marks == [
        VadStarted(8_000),
        VadEnded(16_000, 16_000),
        VadStarted(16_000),
        VadEnded(32_000, 32_000),
        VadStarted(48_000),
        VadEnded(67_200, 67_200),
    ]
    assert np.array_equal(passed, audio[audio != GAP_VALUE])


def test_a_word_timed_across_a_join_lands_in_its_own_utterance() -> None:
    """The alignment can put the first word after a join (the gap is cut out of the window) at
    the end of the previous piece: a word inside an utterance that is already final. It is
    moved to its own piece, after the gap."""
    first = spoken(distinct_words(4), start_s=0.3)  # 0.3-2.2 s
    second = spoken(distinct_words(4, first=4), start_s=5.3)  # 5.3-7.2 s
    regions = [(0.0, 2.8), (5.0, 7.8)]
    engine = ScriptedEngine([*first, *second], early_at_join_s=0.2)
    session, events = replay(engine, regions, total_s=9.0)
    assert word_list(events) == [w.word for w in (*first, *second)]
    assert_finals_well_formed(events)
    late = [(w, a, b) for w, a, b in final_words(events) if w in {t.word for t in second}]
    assert all(a >= 5.0 for _, a, _ in late), late  # none before its own piece
    assert late[1:] == true_words(second[1:])
    assert session.stats.retimed_words >= 1


def test_an_utterance_that_left_no_word_is_cut_out_of_the_window() -> None:
    """Room tone or a cough that the VAD let through and the guards rejected whole must not
    stay in the window: heard in front of the next utterance, it garbles it (Japanese stream
    seed 1: 1 s of a clip's room tone before its first sentence, 10 characters wrong). Here
    between two utterances with words; the next test has it before any word."""
    first = spoken(distinct_words(4), start_s=0.3)  # 0.3-2.2 s
    second = spoken(distinct_words(4, first=4), start_s=8.3)  # 8.3-10.2 s
    # speech, a wordless piece (4.0-5.0 s), speech
    regions = [(0.0, 2.8), (4.0, 5.0), (8.0, 10.8)]
    engine = ScriptedEngine([*first, *second])
    session, events = replay(engine, regions, total_s=12.0)
    assert final_words(events) == true_words([*first, *second])
    assert session.stats.wordless_cut == 1
    after = [r for r in engine.requests if window_end_s(r) > 8.0]
    assert after
    for r in after:
        starts = [round(s.stream / SAMPLE_RATE, 3) for s in window_spans(r)]
        assert starts == [0.0, 8.0], starts  # the first utterance kept, the noise gone
    # the noise was decoded once more alone (as if its context had silenced the decoder),
    # wrote nothing there either, and the context stayed
    alone = [r for r in engine.requests if r.final and not r.forced and window_end_s(r) == 5.0]
    assert [window_spans(r)[0].stream / SAMPLE_RATE for r in alone] == [4.0]
    assert session.stats.context_resets == 0
    assert_finals_well_formed(events)


def test_an_utterance_its_context_silenced_is_decoded_alone() -> None:
    """After committed words the decoder can write nothing at all for real speech (a committed
    sign-off, "ご視聴ありがとうございました", then end-of-text for every later window: Japanese
    seed 1 with a 150 ms pre-roll lost the whole stream). The final of an utterance with speech
    and no word is decoded again with its own audio only; words there mean the context was the
    trouble, so it goes, and the utterances after it are heard too."""
    first = spoken(distinct_words(4), start_s=0.3)  # 0.3-2.2 s
    second = spoken(distinct_words(4, first=4), start_s=4.3)  # 4.3-6.2 s
    third = spoken(distinct_words(4, first=8), start_s=8.3)  # 8.3-10.2 s
    regions = [(0.0, 2.8), (4.0, 6.8), (8.0, 10.8)]
    engine = ScriptedEngine([*first, *second, *third], silenced_by_context=True)
    session, events = replay(engine, regions, total_s=12.0)
    assert final_words(events) == true_words([*first, *second, *third])
    assert session.stats.context_resets == 2  # the second and the third utterance
    alone = [r for r in engine.requests if r.final and not r.forced and not r.prompt]
    assert [[s.stream / SAMPLE_RATE for s in window_spans(r)] for r in alone] == [
        [4.0],
        [8.0],
    ]
    assert_finals_well_formed(events)


def test_a_wordless_first_utterance_leaves_an_empty_window() -> None:
    words = spoken(distinct_words(4), start_s=3.3)
    engine = ScriptedEngine(words)
    session, events = replay(engine, [(0.0, 1.0), (3.0, 5.8)], total_s=7.0)
    assert final_words(events) == true_words(words)
    assert session.stats.wordless_cut == 1
    later = [r for r in engine.requests if window_end_s(r) > 3.0]
    assert later
    assert all(window_spans(r)[0].stream == 3 * SAMPLE_RATE for r in later)
    assert session.finished


# -- 15. a pause inside a word --------------------------------------------------------------

# alpha 0.3-0.7, bravo 0.8-1.2, charlie 1.3-1.7, delta 1.8-2.2; the VAD ends an utterance at
# 1.5 s, inside " charlie", which the engine then writes as " charlieteen" and doubts (p 0.5)
PAUSED = spoken(distinct_words(4), start_s=0.3)


def paused_engine() -> ScriptedEngine:
    return ScriptedEngine(PAUSED, partial="unstable", cut_probability=0.5)


def test_an_uncertain_last_word_waits_for_the_talker_to_go_on() -> None:
    """The VAD can end an utterance inside a word (a 600 ms pause in "聞き取れ|ている": base
    finalized "聞きとり", p 0.61, and the next utterance began "っている"). The doubted last
    word is held; the talker goes on at once, and it is decoded again with what follows."""
    regions = [(0.0, 1.5), (1.5, 2.8)]
    session, events = replay(paused_engine(), regions, total_s=3.5)
    assert final_words(events) == true_words(PAUSED)
    assert session.stats.held_words == 1
    assert_finals_well_formed(events)
    # the held word was on the caption meanwhile, as a partial
    assert any(p.text == " charlieteen" for p in partials_of(events))

    _, unheld = replay(
        paused_engine(), regions, total_s=3.5, config=SessionConfig(hold_uncertain_ms=0)
    )
    assert " charlieteen" in word_list(unheld)  # what the hold prevents


def test_a_word_held_after_the_talker_went_on_is_decoded_with_what_follows() -> None:
    """A slow engine: the final of the first utterance comes back after the next one began
    (2.6 s). Its doubted word is not committed on a timer then; the next final has it."""
    regions = [(0.0, 1.5), (1.5, 2.8)]
    session = make_session(regions)
    engine = paused_engine()

    def late(r: WindowRequest) -> int | None:
        return to_samples(2.6) if r.final and window_end_s(r) == 1.5 else None

    run = drive(session, engine, stream_audio(4.0, regions), hold=late)
    assert final_words(run.events) == true_words(PAUSED)
    assert session.stats.held_words == 1
    assert session.finished
    # committed by the second utterance's final, not by a timer running out meanwhile
    last_final = max(r.request_id for r in engine.requests if r.final)
    assert [w for w, _, _ in final_words(run.after[last_final])] == [" charlie", " delta"]


def test_a_held_word_is_final_once_the_talker_does_not_go_on() -> None:
    """No speech within `hold_uncertain_ms` of the utterance's end: the held word is committed
    as it is, that much later (virtual clock: audio time)."""
    session = make_session([(0.0, 1.5)])
    out = replay_virtual(session, stream_audio(4.0, [(0.0, 1.5)]), paused_engine().decode)
    events = [e.event for e in out]
    assert word_list(events) == [" alpha", " bravo", " charlieteen"]
    (at,) = [e.emitted_at for e in out if isinstance(e.event, Final) and "teen" in e.event.text]
    assert at == pytest.approx(1.5 + 0.5, abs=CHUNK_MS / 1000)
    assert session.stats.held_words == 1
    assert session.finished


@pytest.mark.parametrize("how", ["end_stream", "idle_timer"])
def test_a_held_word_is_final_when_the_stream_stops(how: str) -> None:
    """The client ends the stream, or stops sending, while a word is held: it is committed then,
    not left on the caption."""
    session = make_session([(0.0, 1.5)])
    engine = paused_engine()
    audio = stream_audio(1.6, [(0.0, 1.5)])  # the utterance ends, then 0.1 s more
    if how == "end_stream":
        events = drive(session, engine, audio).events
        assert session.finished
    else:
        events, _ = feed(session, engine, audio, start_now=100.0)
        assert " charlieteen" not in word_list(events)  # held
        timer = session.get_timer()
        assert timer is not None
        session.handle_timer(timer)
        events.extend(session.events())
        assert session.decode_requests() == []
    assert word_list(events) == [" alpha", " bravo", " charlieteen"]
    assert session.get_timer() is None


def test_a_client_finalize_holds_nothing_back() -> None:
    """`finalize` (the client's command, or the idle timer) asks for everything now: a doubted
    last word is committed with the rest, not 500 ms of audio later."""
    session = make_session([(0.0, 2.8)])
    engine = paused_engine()
    audio = stream_audio(1.5, [(0.0, 2.8)])  # the client finalizes mid-" charlie"
    events, now = feed(session, engine, audio)
    assert " charlieteen" not in word_list(events)
    session.finalize(now)
    answer_all(session, engine, now)
    assert word_list(events + session.events()) == [" alpha", " bravo", " charlieteen"]
    assert session.stats.held_words == 0
