"""Cancelling a partial step that only delays the final (`Session.superseded` /
`Session.decode_cancelled`). Scripted VAD, scripted engine, scripted time: results held back
as a slow engine would (`drive`'s `hold`), and stopped when the session says so (`cancel`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import numpy as np
import pytest

from streamd.errors import DecodeCancelled, SessionStateError
from streamd.streaming.config import SessionConfig
from streamd.streaming.replay import run_live
from streamd.streaming.session import PROBE_AFTER_S, Session
from streamd.streaming.window import WindowRequest, WindowResult
from tests.scripted import (
    ScriptedEngine,
    ScriptedVad,
    distinct_words,
    final_words,
    sample_regions,
    spoken,
    stream_audio,
    to_samples,
    true_words,
)
from tests.test_pause_probe import HANGOVER_S, VOICED_END_S, session_for, slow_engine
from tests.test_session import EIGHT, drive, window_end_s
from tests.test_session import EIGHT_REGION as REGION

SAMPLE_RATE = 16000
STEP_S = 0.7  # what a step of `base` costs on 2 cores, in audio time


def test_a_step_that_misses_the_end_of_speech_is_cancelled_for_the_probe() -> None:
    # The step sent at 4.0 s hears up to 4.0 s; voice ends at 4.2 s. It would be decoded until
    # 4.7 s, and the probe (due at 4.45 s) would wait for it.
    runs = {}
    for cancel in (False, True):
        engine = ScriptedEngine(EIGHT)
        session = session_for([REGION])
        run = drive(
            session, engine, stream_audio(6.0, [REGION]), hold=slow_engine(STEP_S), cancel=cancel
        )
        assert final_words(run.events) == true_words(EIGHT)  # every word, once, either way
        (probe,) = [r for r in engine.requests if r.probe]
        runs[cancel] = (run, session, probe)

    run, session, probe = runs[True]
    assert session.stats.cancelled == 1
    (cancelled,) = run.cancelled
    assert cancelled not in run.after  # its result never came: no event from it
    # the probe went out as soon as it was due, not when the step would have been done
    assert run.sent_at[probe.request_id] / SAMPLE_RATE <= VOICED_END_S + PROBE_AFTER_S + 0.02
    assert session.stats.probe_finals == 1
    slow_run, slow_session, slow_probe = runs[False]
    assert slow_session.stats.cancelled == 0 and not slow_run.cancelled
    assert slow_run.sent_at[slow_probe.request_id] / SAMPLE_RATE >= 4.0 + STEP_S
    # the final (the probe's result) comes 0.2 s sooner
    sooner = slow_run.sent_at[slow_probe.request_id] - run.sent_at[probe.request_id]
    assert sooner / SAMPLE_RATE >= 0.2


def test_without_cancel_steps_nothing_is_superseded() -> None:
    engine = ScriptedEngine(EIGHT)
    vad = ScriptedVad(sample_regions([REGION]), hangover=to_samples(HANGOVER_S))
    session = Session(SessionConfig(cancel_steps=False), vad=vad)
    run = drive(session, engine, stream_audio(6.0, [REGION]), hold=slow_engine(STEP_S), cancel=True)

    assert final_words(run.events) == true_words(EIGHT)
    assert not run.cancelled and session.stats.cancelled == 0


def test_a_step_that_heard_the_whole_utterance_is_not_cancelled() -> None:
    # No probes. Voice ends at 4.25 s and the VAD ends the utterance at 4.85 s. The step sent
    # at 4.7 s is still decoding then, but it heard 0.45 s of the pause: its words are the
    # final (`HEARD_AFTER_SPEECH_S`), so stopping it would only cost a decode.
    words = spoken(distinct_words(8), start_s=0.35)  # 0.35 .. 4.25 s
    region = (0.0, 4.25 + HANGOVER_S)
    engine = ScriptedEngine(words)
    session = session_for([region], probe=False)
    audio = stream_audio(6.0, [region])
    run = drive(session, engine, audio, hold=slow_engine(STEP_S), cancel=True)

    assert final_words(run.events) == true_words(words)
    assert not run.cancelled
    last = engine.requests[-1]
    assert not last.final and window_end_s(last) == pytest.approx(4.7)
    assert run.sent_at[last.request_id] < to_samples(region[1])  # in flight when the VAD ended
    assert final_words(run.after[last.request_id])  # and it gave the final


def test_a_cancelled_step_leaves_its_audio_to_the_next_step() -> None:
    # A pause of 0.6 s inside the utterance: the step in flight when it reaches the probe is
    # stopped, the talker goes on, and the partial steps after it still cover every word.
    first = spoken(distinct_words(5), start_s=0.3)  # 0.3 .. 2.7 s
    second = spoken(distinct_words(5, first=5), start_s=3.3)
    words = first + second
    region = (0.0, second[-1].end_s + HANGOVER_S)
    engine = ScriptedEngine(words)
    vad = ScriptedVad(
        sample_regions([region]),
        hangover=to_samples(HANGOVER_S),
        pauses=[(to_samples(first[-1].end_s), to_samples(second[0].start_s))],
    )
    session = Session(SessionConfig(), vad=vad)
    audio = stream_audio(region[1] + 1.0, [region])
    run = drive(session, engine, audio, hold=slow_engine(STEP_S), cancel=True)

    assert final_words(run.events) == true_words(words)
    assert run.cancelled
    # the step stopped in the pause (it heard up to 2.6 s; the probe is due at 2.95 s) ...
    stopped = run.sent[run.cancelled[0]]
    assert window_end_s(stopped) < first[-1].end_s + PROBE_AFTER_S
    # ... its probe is dropped when the talker goes on, and the next partial step hears at
    # least as far as the stopped one would have
    later = [r for r in run.sent.values() if r.request_id > stopped.request_id and not r.probe]
    assert later and window_end_s(later[0]) >= window_end_s(stopped)
    assert session.stats.probe_finals == 1 < session.stats.probes


def test_cancelling_a_request_not_in_flight_is_a_driver_bug() -> None:
    engine = ScriptedEngine(EIGHT)
    session = session_for([REGION])
    audio = stream_audio(6.0, [REGION])
    session.feed_audio(audio[: to_samples(1.0)], 1.0)
    (request,) = session.decode_requests()
    session.decode_done(request, engine.decode_one(request), 1.0)
    with pytest.raises(SessionStateError, match="not in flight"):
        session.decode_cancelled(request, 1.0)


# -- the live driver ------------------------------------------------------------------------------


class _StuckStep:
    """The scripted engine, except that the partial step that stops just before the end of
    speech never finishes on its own: only cancelling it ends it. Everything else is instant."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine
        self.stuck: WindowRequest | None = None
        self.stopped = False

    def __call__(
        self, requests: list[WindowRequest], *, cancel: threading.Event | None = None
    ) -> list[WindowResult]:
        (request,) = requests
        plain = not (request.final or request.probe)
        if plain and self.stuck is None and 3.7 <= window_end_s(request) < VOICED_END_S:
            self.stuck = request
            assert cancel is not None and cancel.wait(10), "the stuck step was never cancelled"
            self.stopped = True
            raise DecodeCancelled("stopped")
        return self.engine.decode(requests)


async def _paced(audio: np.ndarray, chunk_s: float = 0.02) -> AsyncIterator[np.ndarray]:
    step = round(chunk_s * SAMPLE_RATE)
    for i in range(0, len(audio), step):
        await asyncio.sleep(0.002)  # faster than real time; the decoder thread still runs
        yield audio[i : i + step]


def test_the_live_loop_stops_a_superseded_step_and_decodes_the_probe() -> None:
    engine = _StuckStep(ScriptedEngine(EIGHT))
    session = session_for([REGION])
    emitted = asyncio.run(run_live(_paced(stream_audio(6.0, [REGION])), session, engine))

    assert engine.stuck is not None and engine.stopped
    assert session.stats.cancelled == 1
    assert final_words([e.event for e in emitted]) == true_words(EIGHT)
    assert session.stats.probe_finals == 1  # the probe, not a step after the stuck one
    assert session.finished
