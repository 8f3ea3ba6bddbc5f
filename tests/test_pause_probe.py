"""The probe: one step decoded `PROBE_AFTER_S` into a pause, which is the final if the VAD
then ends the utterance (`streamd.streaming.session._Probe`). Scripted VAD (it says where voice
was last heard, as VadGate does), scripted engine, scripted time: a virtual clock, or results
held back as a slow engine would (`drive`'s `hold`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from streamd.streaming.config import SessionConfig
from streamd.streaming.events import Final
from streamd.streaming.replay import replay_virtual
from streamd.streaming.session import PROBE_AFTER_S, Session
from streamd.streaming.window import WindowRequest
from tests.scripted import (
    ScriptedEngine,
    ScriptedVad,
    distinct_words,
    final_words,
    finals_of,
    sample_regions,
    spoken,
    stream_audio,
    to_samples,
    true_words,
)
from tests.test_session import EIGHT, drive, window_end_s
from tests.test_session import EIGHT_REGION as REGION

HANGOVER_S = 0.6
# EIGHT: 8 words from 0.3 s to 4.2 s; voice last heard at 4.2 s, the VAD ends the utterance
# at 4.8 s (REGION's end, the hangover after it)
VOICED_END_S = 4.2


def session_for(
    regions: Sequence[tuple[float, float]],
    probe: bool = True,
    pauses: Sequence[tuple[float, float]] = (),
    min_commit_probability: float = 0.7,
) -> Session:
    vad = ScriptedVad(
        sample_regions(regions),
        hangover=to_samples(HANGOVER_S),
        pauses=[(to_samples(a), to_samples(b)) for a, b in pauses],
    )
    config = SessionConfig(probe_pauses=probe, min_commit_probability=min_commit_probability)
    return Session(config, vad=vad)


def test_the_probe_is_the_final_ready_when_the_vad_ends_the_utterance() -> None:
    engine = ScriptedEngine(EIGHT)
    session = session_for([REGION])
    out = replay_virtual(session, stream_audio(6.0, [REGION]), engine.decode)
    events = [e.event for e in out]

    assert final_words(events) == true_words(EIGHT)  # every word, once
    # On this clock the partial step at 4.5 s still runs (the engine takes no time) and commits
    # a word, which drops the first probe (4.45 s): it was decoded with fewer forced words. A
    # second probe follows at once, and it is the final.
    assert (session.stats.probes, session.stats.probe_finals) == (2, 1)
    # no final request: the last window decoded is that probe's, past PROBE_AFTER_S
    last = engine.requests[-1]
    assert not any(r.final for r in engine.requests)
    assert VOICED_END_S + PROBE_AFTER_S <= window_end_s(last) < REGION[1]
    # and the final comes out with the VAD's end, at 4.8 s
    assert [e.emitted_at for e in out if isinstance(e.event, Final)][-1] == REGION[1]


def test_without_probes_the_final_is_decoded_after_the_hangover() -> None:
    engine = ScriptedEngine(EIGHT)
    session = session_for([REGION], probe=False)
    out = replay_virtual(session, stream_audio(6.0, [REGION]), engine.decode)

    assert final_words([e.event for e in out]) == true_words(EIGHT)
    assert session.stats.probes == 0
    assert engine.requests[-1].final
    assert window_end_s(engine.requests[-1]) == REGION[1]


def test_a_talker_going_on_drops_the_probe_and_leaves_the_partial_steps_as_they_were() -> None:
    # a 0.5 s pause inside the utterance (shorter than the hangover): a probe is decoded, then
    # the talker goes on, and the probe must leave no trace
    first = spoken(distinct_words(5), start_s=0.3)  # 0.3 .. 2.7 s
    second = spoken(distinct_words(5, first=5), start_s=3.2)
    words = first + second
    pause = (first[-1].end_s, second[0].start_s)
    region = (0.0, second[-1].end_s + HANGOVER_S)
    runs = {}
    for probe in (False, True):
        engine = ScriptedEngine(words)
        session = session_for([region], probe=probe, pauses=[pause])
        audio = stream_audio(region[1] + 1.0, [region])
        events = [e.event for e in replay_virtual(session, audio, engine.decode)]
        assert final_words(events) == true_words(words)
        runs[probe] = engine.requests

    off, on = runs[False], runs[True]
    probes = [r for r in on if r.probe]
    assert any(pause[0] + PROBE_AFTER_S <= window_end_s(r) < pause[1] for r in probes)
    assert not any(r.probe for r in off)
    # every step of the run without probes is there, the same window with the same forced
    # words and draft (on this clock the last utterance's final comes from a step either way)
    assert [(window_end_s(r), r.forced, r.draft, r.final) for r in on if not r.probe] == [
        (window_end_s(r), r.forced, r.draft, r.final) for r in off
    ]


def slow_engine(delay_s: float) -> Callable[[WindowRequest], int]:
    """`drive`'s hold: each result comes `delay_s` of audio after its request."""

    def hold(request: WindowRequest) -> int:
        return to_samples(window_end_s(request) + delay_s)

    return hold


def test_a_slow_engine_starts_no_partial_step_that_would_hold_up_the_probe() -> None:
    # Voice ends at 4.35 s, so the step grid (every 0.5 s) has a partial step due at 4.5 s,
    # 0.15 s into the pause; with 0.4 s per step it would still be decoding when the probe is
    # due (4.6 s), so it does not start.
    words = spoken(distinct_words(8), start_s=0.45)
    region = (0.0, 4.35 + HANGOVER_S)
    engine = ScriptedEngine(words)
    session = session_for([region])
    run = drive(session, engine, stream_audio(6.0, [region]), hold=slow_engine(0.4))

    assert final_words(run.events) == true_words(words)
    in_pause = [r for r in engine.requests if window_end_s(r) > 4.35 + 0.1]
    assert [r.probe for r in in_pause] == [True]  # the probe only
    assert window_end_s(in_pause[0]) >= 4.35 + PROBE_AFTER_S
    assert not any(r.final for r in engine.requests)
    # the VAD ended the utterance (4.95 s) while the probe was decoded: its result was the final
    assert session.stats.probe_finals == 1
    assert finals_of(run.after[in_pause[0].request_id])


def test_each_pause_gets_its_own_probe() -> None:
    # a pause the talker ends (0.5 s), one more word, then the end: the first probe is dropped
    # when voice comes back, so the end of the utterance is probed again and that is the final
    # (agreement commits nothing here, which would drop the first probe too)
    first = spoken(distinct_words(5), start_s=0.3)  # 0.3 .. 2.7 s
    last = spoken(distinct_words(1, first=5), start_s=3.2)  # 3.2 .. 3.6 s
    region = (0.0, 3.6 + HANGOVER_S)
    engine = ScriptedEngine(first + last)
    session = session_for([region], pauses=[(2.7, 3.2)], min_commit_probability=1.01)
    run = drive(session, engine, stream_audio(5.0, [region]), hold=slow_engine(0.4))

    assert final_words(run.events) == true_words(first + last)
    probes = [window_end_s(r) for r in engine.requests if r.probe]
    assert len(probes) == 2 and probes[0] < 3.2 < 3.6 + PROBE_AFTER_S <= probes[1]
    assert session.stats.probe_finals == 1
    assert not any(r.final for r in engine.requests)


def test_a_stream_that_ends_during_a_pause_still_gets_every_word() -> None:
    # end_stream 0.5 s into the pause: the VAD is flushed, the probe is the final
    engine = ScriptedEngine(EIGHT)
    session = session_for([REGION])
    audio = stream_audio(VOICED_END_S + 0.5, [REGION])
    events = [e.event for e in replay_virtual(session, audio, engine.decode)]

    assert final_words(events) == true_words(EIGHT)
    assert session.finished
    assert session.stats.probe_finals == 1
    assert not any(r.final for r in engine.requests)
