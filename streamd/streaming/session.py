"""`Session`: the sans-I/O state machine of one audio stream.

It is fed audio and the time (`now`), and hands out window requests for the engine and events
for listeners; it never calls the model, a clock, a socket or a thread (like h11 / aioquic's
connection objects). Every streaming decision is therefore testable with scripted time and a
scripted engine.

Life of an utterance: the VAD opens it (SpeechStarted) -> every `step_ms` of new speech a window
request covers the speech since the last trim point, forced to start with the words already
committed in it and drafted with the last hypothesis -> words two consecutive results agree on
are committed (Final), the rest is shown as a Partial -> when the VAD closes it (SpeechEnded) a
final request commits everything left. A partial step still being decoded when that final (or
the probe) becomes due is `superseded()`: a live driver stops it and says so
(`decode_cancelled`), so the final does not wait for it.

The window keeps the speech of earlier utterances (their words forced, already final) until it
holds `trim_after_s` of committed audio: Whisper hears a short phrase far better with the
sentence before it. Only speech is kept: the gaps between utterances are cut out, so silence,
noise and murmur never reach the engine.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from streamd.audio import SAMPLE_RATE
from streamd.decoding.result import Word
from streamd.errors import SessionStateError
from streamd.streaming.agreement import agreed_prefix, stable_count, strip_overlap
from streamd.streaming.config import MAX_WINDOW_S, SessionConfig
from streamd.streaming.events import Event, Final, Partial, SpeechEnded, SpeechStarted
from streamd.streaming.guards import GuardStats, apply_guards
from streamd.streaming.window import HypWord, WindowRequest, WindowResult
from streamd.vad import SpeechAudio, VadEvent, VadGate
from streamd.vad import SpeechEnded as VadEnded
from streamd.vad import SpeechStarted as VadStarted

# a repeat of the last committed words is an artefact of the cut only this close after it
OVERLAP_WINDOW_S = 0.5
# a word starting this long after the VAD's last foreground frame is not the speaker's
HANGOVER_WORD_MARGIN_S = 0.3
# A step whose window reaches this far past an utterance's last foreground speech heard all of
# it: once the VAD ends the utterance (its hangover ran out), that step's words are the final
# and no decode of the hangover's non-speech is needed.
HEARD_AFTER_SPEECH_S = 0.4
# A pause (no voiced frame) that reaches PROBE_AFTER_S gets one step at once, the probe
# (`_Probe`). Once a pause is this long, a partial step starts only if it will be done
# before it is in the way of the final (`Session._in_the_way`).
PAUSE_WAIT_S = 0.1
PROBE_AFTER_S = 0.25
# An utterance with this much speech that decodes to nothing after earlier words is retried
# without them (`Session._silenced_by_context`); a cough or a click is shorter.
SILENCED_MIN_SPEECH_S = 0.5


@dataclass(frozen=True)
class _Held:
    """Uncertain last words waiting (`SessionConfig.hold_uncertain_ms`) until stream sample
    `until`; `result` is the decode they came from (its scores go on their Final)."""

    until: int
    result: WindowResult


class SpeechGate(Protocol):
    """What the session needs of a VAD (`streamd.vad.VadGate`)."""

    def feed(self, samples: np.ndarray) -> list[VadEvent]: ...

    def flush(self) -> list[VadEvent]: ...


@dataclass(frozen=True)
class _Probe:
    """A step decoded in a pause, `PROBE_AFTER_S` after the last voiced frame (`voiced`,
    a stream sample; the last foreground speech, which `_heard_all` counts from, is no later):
    if the VAD then ends the utterance with no more voice (`ended`), its words are the final,
    ready when the hangover runs out instead of a decode later. If the talker goes on, or a
    partial step commits words meanwhile, it is dropped: it takes no part in agreement, so the
    partial steps of an utterance are the same with or without it."""

    voiced: int
    words: list[HypWord] = field(default_factory=list)
    result: WindowResult | None = None  # None while it is being decoded
    ended: bool = False


@dataclass
class SessionStats:
    """Counters for metrics and benchmarks."""

    requests: int = 0
    audio_decoded_s: float = 0.0
    forward_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    forced_commits: int = 0
    trims: int = 0
    context_resets: int = 0  # the decoder looped on its context; it was dropped
    retimed_words: int = 0  # words the alignment put in an utterance already finalized
    wordless_cut: int = 0  # utterances that left no word, cut out of the window
    held_words: int = 0  # uncertain last words that waited for the talker to go on
    probes: int = 0  # steps decoded in a pause (`_Probe`)
    probe_finals: int = 0  # of them, the ones that were the utterance's final
    cancelled: int = 0  # requests stopped before their result (`Session.superseded`)
    guards: GuardStats = field(default_factory=GuardStats)


@dataclass
class _Window:
    """The speech being transcribed: recent utterances, gaps cut out (mutable; internal)."""

    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (window, stream) sample
    committed: list[HypWord] = field(default_factory=list)  # inside the window, in order
    tentative: list[HypWord] = field(default_factory=list)  # last hypothesis after them
    requested_until: int = 0  # window samples covered by the last request
    speaking: bool = False
    voiced_until: int = -1  # stream sample: voice last heard in the open utterance (-1: not told)
    finals: list[int] = field(default_factory=list)  # utterances ended here (window samples)
    # per pending final: the stream time after which the VAD heard no foreground speech
    speech_until_s: list[float] = field(default_factory=list)
    finished_until_s: float = 0.0  # stream time where the last finalized utterance ends

    def start_piece(self, stream_sample: int) -> None:
        self.pieces.append((len(self.audio), stream_sample))

    def committed_until(self) -> int:
        """Window sample where the committed words end (0: none)."""
        return self.window_sample(self.committed[-1].end) if self.committed else 0

    def new_speech(self, until: int) -> int:
        """Samples of the utterance ending at `until` not yet covered by committed words."""
        return until - max(self.piece_start(until), self.committed_until())

    def _piece_end(self, i: int) -> int:
        return self.pieces[i + 1][0] if i + 1 < len(self.pieces) else len(self.audio)

    def stream_s(self, sample: int) -> float:
        """Stream time of window sample `sample` (a piece's end, not the next one's start)."""
        offset, stream = self.pieces[0]
        for piece in self.pieces:
            if piece[0] >= sample:
                break
            offset, stream = piece
        return (stream + sample - offset) / SAMPLE_RATE

    def stream_end(self) -> int:
        offset, stream = self.pieces[-1]
        return stream + len(self.audio) - offset

    def window_sample(self, stream_s: float) -> int:
        """Window sample of a stream time (the start of the next piece if it is in a gap)."""
        sample = round(stream_s * SAMPLE_RATE)
        for i, (offset, stream) in enumerate(self.pieces):
            end = self._piece_end(i)
            if sample < stream:
                return offset
            if sample < stream + end - offset:
                return offset + sample - stream
        return len(self.audio)

    def piece_start(self, until: int) -> int:
        """Window sample where the piece (one utterance) that ends at `until` begins."""
        return self.piece_of(until)[0] if self.pieces else 0

    def piece_of(self, until: int) -> tuple[int, int]:
        """(window, stream) sample where the piece (one utterance) that ends at `until` begins."""
        return max((p for p in self.pieces if p[0] < until), default=self.pieces[0])

    def cut_out(self, start: int, end: int) -> None:
        """Remove window samples [start, end): one whole piece (later pieces move up)."""
        n = end - start
        self.audio = np.concatenate([self.audio[:start], self.audio[end:]])
        kept = [(o, s) for o, s in self.pieces if not start <= o < end]
        self.pieces = [(o if o < start else o - n, s) for o, s in kept]

        def moved(sample: int) -> int:
            return sample if sample <= start else max(sample - n, start)

        self.requested_until = moved(self.requested_until)
        self.finals = [moved(f) for f in self.finals]

    def trim_to(self, cut: int) -> None:
        """Drop the first `cut` window samples."""
        cut = min(max(cut, 0), len(self.audio))
        pieces = []
        for i, (offset, stream) in enumerate(self.pieces):
            end = self._piece_end(i)
            if end <= cut and i + 1 < len(self.pieces):
                continue
            skip = max(cut - offset, 0)
            pieces.append((offset + skip - cut, stream + skip))
        self.pieces = pieces
        self.audio = self.audio[cut:]
        self.requested_until = max(self.requested_until - cut, 0)
        self.finals = [max(f - cut, 0) for f in self.finals]  # speech_until_s is stream time


class Session:
    """One stream's streaming state; see the module docstring for the flow.

    language: ISO code, or None to detect (then fixed by the first committed words).
    vocabulary: tokens of a per-session prompt (names, jargon), always kept in the context.
    vad: the speech gate; a `VadGate` built from `config.vad` unless one is given (tests pass a
        scripted one).
    """

    def __init__(
        self,
        config: SessionConfig | None = None,
        session_id: str = "session",
        language: str | None = None,
        task: str = "transcribe",
        vocabulary: tuple[int, ...] = (),
        vad: SpeechGate | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self.session_id = session_id
        self.language = language
        self.task = task
        self.vocabulary = vocabulary
        self.stats = SessionStats()
        self._vad: SpeechGate = vad or VadGate(self.config.vad)
        self._window = _Window()
        self._events: list[Event] = []
        self._prompt: deque[int] = deque(maxlen=self.config.prompt_tokens)
        self._recent: deque[HypWord] = deque(maxlen=8)  # last committed words, for overlap
        self._in_flight: WindowRequest | None = None
        self._last_result: WindowResult | None = None  # the latest step's, until it is stale
        self._next_request = 0
        self._next_segment = 0
        self._partial: Partial | None = None
        self._ended = False
        self._last_audio_now: float | None = None
        self._decode_alone = False  # the first pending final is to be decoded alone
        self._alone_id: int | None = None  # the request doing that
        self._samples_fed = 0
        # uncertain last words of a finished utterance, waiting for the talker to go on
        self._held: _Held | None = None
        self._finalizing = False  # finalize() ended the speech: nothing is held back then
        self._probe: _Probe | None = None  # a step decoded in the open utterance's pause
        self._sent_at: float | None = None  # `now` of the audio before the request in flight
        self._requested_before = 0  # `requested_until` before the request in flight
        self._step_s = 0.0  # how long the last request took, wall time (0 on a virtual clock)

    # -- input ---------------------------------------------------------------------------------

    def feed_audio(self, pcm: np.ndarray, now: float) -> None:
        """Add 16 kHz mono float32 samples that follow the previous ones."""
        if self._ended:
            raise SessionStateError("audio after end_stream")
        self._last_audio_now = now
        self._samples_fed += len(pcm)
        for event in self._vad.feed(pcm):
            self._on_vad(event)
        held = self._held
        if held is not None and self._samples_fed >= held.until:
            self._release_held()

    def end_stream(self, now: float) -> None:
        """No more audio: the open utterance (if any) is finalized."""
        if not self._ended:
            self.finalize(now)
            self._ended = True

    def finalize(self, now: float) -> None:
        """Finalize the current utterance now, as if the speaker had paused (its doubted last
        words too: the client asked for everything)."""
        self._finalizing = True
        for event in self._vad.flush():
            self._on_vad(event)
        if self._held is not None:  # (a flush that ends speech has no held words: see _on_vad)
            self._release_held()

    def get_timer(self) -> float | None:
        """Wall time at which `handle_timer` must be called, or None."""
        if self._last_audio_now is None or not (self._window.speaking or self._held):
            return None
        return self._last_audio_now + self.config.idle_finalize_ms / 1000

    def handle_timer(self, now: float) -> None:
        timer = self.get_timer()
        if timer is not None and now >= timer:
            self.finalize(now)

    def _on_vad(self, event: VadEvent) -> None:
        w = self._window
        match event:
            case VadStarted(sample=sample):
                self._held = None  # the talker went on: the held words are decoded again
                self._finalizing = False
                gap_s = (sample - w.stream_end()) / SAMPLE_RATE if w.pieces else 0.0
                if gap_s > self.config.context_gap_s and not w.finals:
                    w.trim_to(w.committed_until())
                    self._retire_committed()
                w.start_piece(sample)
                w.speaking = True
                w.voiced_until = -1
                self._events.append(SpeechStarted(sample / SAMPLE_RATE))
            case SpeechAudio(samples=samples, last_voiced_sample=voiced):
                w.audio = np.concatenate([w.audio, samples.astype(np.float32, copy=False)])
                probe = self._probe
                if probe is not None and not probe.ended and voiced > probe.voiced:
                    self._probe = None  # the talker went on
                w.voiced_until = max(w.voiced_until, voiced)
            case VadEnded(
                sample=sample,
                last_voiced_sample=voiced,
                last_foreground_sample=foreground,
                level_dbfs=level,
            ):
                w.speaking = False
                probe = self._probe
                if probe is not None and not probe.ended:
                    # (a commit since the probe would have dropped it: `_commit`)
                    same = probe.voiced == voiced
                    self._probe = replace(probe, ended=True) if same else None
                w.finals.append(len(w.audio))
                w.speech_until_s.append((foreground if foreground >= 0 else sample) / SAMPLE_RATE)
                self._events.append(SpeechEnded(sample / SAMPLE_RATE, level))

    # -- work for the engine ----------------------------------------------------------------------

    def decode_requests(self, step_ms: int | None = None) -> list[WindowRequest]:
        """The next window to decode, if one is due (at most one is in flight per session).

        step_ms: overrides `config.step_ms` for this call: a driver whose engine is loaded asks
        for fewer, larger partial steps (finals are never delayed by it).
        """
        w = self._window
        if self._in_flight is not None or not w.pieces:
            return []
        max_samples = int(MAX_WINDOW_S * SAMPLE_RATE)
        if w.finals and self._decode_alone:
            return [self._alone_request(w.finals[0])]
        if w.finals:
            until = w.finals[0]
            if w.requested_until >= self._heard_all(until) and self._last_result is not None:
                # the last step already heard this whole utterance: its words are the final
                self._probe = None  # (a partial step after the probe: it heard more)
                self._finish_utterance(w.tentative, self._last_result)
                return self.decode_requests(step_ms)
            ready = self._probe
            if ready is not None and ready.ended and ready.result is not None:
                self._final_from_probe(ready.words, ready.result)
                return self.decode_requests(step_ms)
            probe = False
            too_short = w.new_speech(until) < self.config.min_window_ms * SAMPLE_RATE // 1000
            if too_short and not w.tentative:
                # nothing new since the last commit, or a blip too short to hold a word
                w.finished_until_s = max(w.finished_until_s, w.stream_s(w.finals[0]))
                self._drop_if_wordless(w.finals.pop(0))
                w.speech_until_s.pop(0)
                self._set_partial(None)
                return self.decode_requests(step_ms)
        else:
            until = len(w.audio)
            if w.new_speech(until) < self.config.min_window_ms * SAMPLE_RATE // 1000:
                return []
            pause_s = self._pause_s()
            probe = pause_s >= PROBE_AFTER_S and self._probe is None
            step = self.config.step_ms if step_ms is None else step_ms
            due = until - w.requested_until >= step * SAMPLE_RATE // 1000
            if not probe and (not due or self._in_the_way(pause_s)):
                return []
        window = w.audio[: min(until, max_samples)]
        new_s = max(len(window) - w.committed_until(), 0) / SAMPLE_RATE
        request = WindowRequest(
            session_id=self.session_id,
            request_id=self._next_request,
            pieces=tuple(p for p in w.pieces if p[0] < len(window)),
            audio=window,
            prompt=(*self.vocabulary, *self._prompt),
            forced=tuple(t for h in w.committed for t in h.tokens),
            draft=tuple(t for h in w.tentative for t in h.tokens),
            language=self.language,
            task=self.task,
            final=bool(w.finals) and w.finals[0] <= max_samples,
            max_tokens=self._max_tokens(new_s),
            probe=probe,
        )
        if probe:
            # Not a step of the partial grid: `requested_until` stays, so if the talker goes
            # on, the next partial step comes when it would have come without the probe.
            self._probe = _Probe(w.voiced_until)
            self.stats.probes += 1
        else:
            self._requested_before = w.requested_until
            w.requested_until = len(window)
        return [self._send(request)]

    def superseded(self) -> bool:
        """Is the request in flight a partial step that now only delays the final? True when
        its utterance has ended (a final is due) and the step has not heard all of it, or when
        the pause is long enough for the probe and the step has not heard as much as the probe
        will. A driver whose engine can stop a decode should then stop it (`decode_cancelled`):
        the step's words would be replaced before anyone saw more than a partial, and the probe
        or final decodes at once instead of after it (docs/streaming.md, "Cancelling a step";
        letting a step that is nearly done finish, for its draft, measured no better)."""
        r = self._in_flight
        if not self.config.cancel_steps or r is None or r.final or r.probe:
            return False
        if r.request_id == self._alone_id:
            return False
        w = self._window
        if w.finals:
            return not self._ends_utterance(r)
        if self._probe is not None or self._pause_s() < PROBE_AFTER_S:
            return False
        return len(r.audio) < w.window_sample(w.voiced_until / SAMPLE_RATE + PROBE_AFTER_S)

    def _in_the_way(self, pause_s: float) -> bool:
        """Would a partial step started `pause_s` into a pause still be decoding when the probe
        is due or, after the probe, when the VAD may end the utterance (its hangover after the
        last voiced frame)? Judged by the last step's wall time: on a virtual clock, or a fast
        engine, the partial steps of a pause go on (agreement may commit words before the VAD
        ends the utterance); on a slow one they would hold the engine and delay the final."""
        if pause_s < PAUSE_WAIT_S:
            return False
        done_by = self.config.vad.hangover_ms / 1000 if self._probe else PROBE_AFTER_S
        return pause_s + self._step_s >= done_by

    def _pause_s(self) -> float:
        """Seconds of the open utterance's audio since its last voiced frame (0 when the VAD
        does not say, or the talker goes on)."""
        w = self._window
        if not self.config.probe_pauses or not w.speaking or w.voiced_until < 0:
            return 0.0
        return (w.stream_end() - w.voiced_until) / SAMPLE_RATE

    def _send(self, request: WindowRequest) -> WindowRequest:
        """Put `request` in flight and count it."""
        self._next_request += 1
        self._in_flight = request
        self._sent_at = self._last_audio_now
        self.stats.requests += 1
        self.stats.audio_decoded_s += len(request.audio) / SAMPLE_RATE
        return request

    def _max_tokens(self, new_s: float) -> int:
        """A decoder budget for `new_s` seconds of uncommitted audio: one token over the
        guard's, so the guard still sees (and counts) a runaway."""
        guards = self.config.guards
        return int(guards.max_tokens_per_s * new_s) + guards.token_slack + 1

    def _alone_request(self, until: int) -> WindowRequest:
        """The final of the utterance ending at `until` with nothing before it: its own audio
        only, no forced words, only the vocabulary as prompt."""
        w = self._window
        start, stream = w.piece_of(until)
        audio = w.audio[start : min(until, start + int(MAX_WINDOW_S * SAMPLE_RATE))]
        request = WindowRequest(
            session_id=self.session_id,
            request_id=self._next_request,
            pieces=((0, stream),),
            audio=audio,
            prompt=self.vocabulary,
            forced=(),
            draft=(),
            language=self.language,
            task=self.task,
            final=True,
            max_tokens=self._max_tokens(len(audio) / SAMPLE_RATE),
        )
        self._decode_alone = False
        self._alone_id = request.request_id
        return self._send(request)

    def _alone_done(self, request: WindowRequest, result: WindowResult) -> None:
        """Words from the utterance decoded alone: its context silenced the decoder, so the
        context goes (as after a loop); none: it was noise after all, and the context stays."""
        self._alone_id = None
        window_end_s = request.to_stream_s(len(request.audio) / SAMPLE_RATE)
        words = apply_guards(
            result,
            len(request.audio) / SAMPLE_RATE,
            self.config.guards,
            self.stats.guards,
            forced=[],
            window_end_s=window_end_s,
        )
        if words:
            self._forget_context()
        self._finish_utterance(words, result, may_retry=False)

    def decode_cancelled(self, request: WindowRequest, now: float) -> None:
        """The request in flight was stopped before it finished (the driver did it because it
        was `superseded`): it is as if it had never been sent. A partial step's audio is
        decoded by the next request; a probe or a final (stopped by a driver for its own
        reasons) is asked for again."""
        if self._in_flight is None or request.request_id != self._in_flight.request_id:
            raise SessionStateError(f"request {request.request_id} cancelled but not in flight")
        self._in_flight = None
        self.stats.cancelled += 1
        if request.request_id == self._alone_id:
            self._alone_id = None
            self._decode_alone = True
        elif request.probe:
            self._probe = None
        elif not request.final:
            self._window.requested_until = self._requested_before

    def decode_done(self, request: WindowRequest, result: WindowResult, now: float) -> None:
        """Take the engine's result for the request in flight."""
        if self._in_flight is None or request.request_id != self._in_flight.request_id:
            raise SessionStateError(f"result for request {request.request_id} not in flight")
        if result.request_id != request.request_id:
            raise SessionStateError("result does not belong to its request")
        self._in_flight = None
        if self._sent_at is not None:
            self._step_s = max(now - self._sent_at, 0.0)
        self.stats.forward_passes += result.forward_passes
        self.stats.draft_tokens += result.draft_tokens
        self.stats.accepted_tokens += result.accepted_tokens
        if request.request_id == self._alone_id:
            self._alone_done(request, result)
            return
        probe = self._probe if request.probe else None
        if request.probe and probe is None:
            return  # the talker went on while it was decoded, or a step committed words
        w = self._window
        window_end_s = request.to_stream_s(len(request.audio) / SAMPLE_RATE)
        start_s = w.committed[-1].end if w.committed else request.to_stream_s(0.0)
        loops_before = self.stats.guards.dropped_words["repetition"]
        words = apply_guards(
            result,
            max(window_end_s - start_s, 0.0),
            self.config.guards,
            self.stats.guards,
            forced=w.committed,
            window_end_s=window_end_s,
        )
        looped = self.stats.guards.dropped_words["repetition"] > loops_before
        recent = w.committed or list(self._recent)
        if recent and words and words[0].start < recent[-1].end + OVERLAP_WINDOW_S:
            words = strip_overlap(recent, words)
        words = self._after_finished(words)  # after the overlap: a repeat is dropped, not moved
        # a step that reached the end of an utterance that has since ended is its final
        final = request.final or self._ends_utterance(request)
        if looped and (w.committed or self._prompt):
            # Its context made the decoder loop: decode the same audio again without it (a
            # final is retried; a partial step's words come from the next step).
            self._forget_context()
            self._clear_hypothesis()
            return
        if probe is not None:
            if probe.ended:  # the VAD ended the utterance while the probe was decoded
                self._final_from_probe(words, result)
            else:
                self._probe = replace(probe, words=words, result=result)
                self._set_partial(words)
            return
        if final:
            self._finish_utterance(words, result)
            return
        window_s = len(request.audio) / SAMPLE_RATE
        stable_until = window_end_s - self.config.unstable_tail_ms / 1000
        if window_s >= self.config.force_commit_s:
            n = stable_count(words, len(words), stable_until)  # no time to wait for agreement
            self.stats.forced_commits += 1
        else:
            agreed = agreed_prefix(w.tentative, words)
            n = stable_count(words, agreed, stable_until, self.config.min_commit_probability)
        self._commit(words[:n], result)
        w.tentative = words[n:]
        self._last_result = result
        self._maybe_trim(window_s)
        self._set_partial(w.tentative)

    def _final_from_probe(self, words: list[HypWord], result: WindowResult) -> None:
        """The probe's words are the final of the first pending utterance."""
        w = self._window
        self._probe = None
        self.stats.probe_finals += 1
        # the next step comes when it would after a final request (the same grid)
        w.requested_until = max(w.requested_until, w.finals[0])
        self._finish_utterance(words, result)

    def _forget_context(self) -> None:
        """The decoder looped: once a phrase is in its context (forced at the window's start, or
        in the prompt), Whisper can repeat it forever ("Lock! Lock! Lock!..."), and the guard
        would then drop every later step of the stream. The window now starts after the
        committed words, with no `<|startofprev|>` prompt (openai-whisper's transcribe drops
        its prompt after a failed window for the same reason); the committed words are final
        already, only their context is lost. The vocabulary prompt stays."""
        w = self._window
        if w.committed:
            w.trim_to(w.committed_until())
            self._retire_committed()
        self._prompt.clear()
        self._probe = None  # decoded with that context
        self.stats.context_resets += 1

    def _after_finished(self, words: list[HypWord]) -> list[HypWord]:
        """New words are never in an utterance that is already final: all of its words were
        committed. The alignment can still put the first word after a join (the gap between
        utterances is cut out of the window) at the end of the previous piece, which is an
        earlier utterance's hangover (" Nor" timed 3.7 s early, then scored as a word inside a
        gap). Such words move to the start of the next piece, in order."""
        w = self._window
        until = w.finished_until_s
        if not words or words[0].start >= until:
            return words
        cursor = next((s / SAMPLE_RATE for _, s in w.pieces if s / SAMPLE_RATE >= until), until)
        out = []
        for h in words:
            if h.start < until:
                moved = replace(h, start=cursor, end=cursor + (h.end - h.start))
                cursor = moved.end
                self.stats.retimed_words += 1
                out.append(moved)
            else:
                out.append(h)
        return out

    def _ends_utterance(self, request: WindowRequest) -> bool:
        """Has `request`'s window heard all of the utterance that ended first (so its words
        are that utterance's final)? False while none has ended."""
        w = self._window
        return bool(w.finals) and len(request.audio) >= self._heard_all(w.finals[0])

    def _heard_all(self, until: int) -> int:
        """Window sample from which a step has heard the whole utterance that ends at `until`
        (the first pending final point): its end, or a margin past its last speech."""
        w = self._window
        return min(until, w.window_sample(w.speech_until_s[0] + HEARD_AFTER_SPEECH_S))

    def _finish_utterance(
        self, words: list[HypWord], result: WindowResult, may_retry: bool = True
    ) -> None:
        """Commit every word of the utterance that ends at the first pending final point."""
        w = self._window
        if may_retry and self._silenced_by_context(result):
            self._decode_alone = True  # decode_requests asks for this final again
            self._clear_hypothesis()
            return
        end = w.finals.pop(0)
        speech_until = w.speech_until_s.pop(0)
        # Words that begin well after the last foreground speech are in the hangover: the VAD
        # kept that audio so word tails are not clipped, but what starts there is murmur.
        kept = [h for h in words if h.start < speech_until + HANGOVER_WORD_MARGIN_S]
        self.stats.guards.count("after_speech", len(words) - len(kept))
        held = self._uncertain_tail(kept)
        self._commit(kept[: len(kept) - held], result)
        self._clear_hypothesis()
        if held:
            # decoded again with the next utterance; committed as they are if none comes soon
            w.tentative = kept[len(kept) - held :]
            w.finished_until_s = max(w.finished_until_s, w.tentative[0].start)
            if not (w.speaking or w.finals):  # else the talker has gone on already
                until = round(w.stream_s(end) * SAMPLE_RATE)
                wait = self.config.hold_uncertain_ms * SAMPLE_RATE // 1000
                self._held = _Held(until + wait, result)
            self.stats.held_words += held
            self._set_partial(w.tentative)
            return
        self._close_utterance(end)

    def _close_utterance(self, end: int) -> None:
        """Every word of the utterance that ends at window sample `end` is committed: no later
        word belongs to it, and the window may be trimmed (or the utterance cut out)."""
        w = self._window
        w.finished_until_s = max(w.finished_until_s, w.stream_s(end))
        self._maybe_trim(self._drop_if_wordless(end) / SAMPLE_RATE)

    def _uncertain_tail(self, words: list[HypWord]) -> int:
        """How many of an utterance's last words to hold back: the trailing run the model gives
        less than `min_commit_probability`, when the talker may still go on (a pause inside
        a word, "聞き取れ|ている": the VAD ended the utterance after "聞きとり" (p 0.61), and
        the next one began with "っている")."""
        if self._ended or self._finalizing or not self.config.hold_uncertain_ms:
            return 0
        n = 0
        while n < len(words) and words[-1 - n].probability < self.config.min_commit_probability:
            n += 1
        return n

    def _release_held(self) -> None:
        """The talker did not go on: the held words are final as they are. (If the talker
        does go on, the next final decides them, and may drop them: a fragment the model
        doubted and, with what follows, no longer hears.)"""
        held = self._held
        if held is None or self._in_flight is not None:
            # a partial step over the held words (a short `step_ms`) decides them first; the
            # next audio tries again
            return
        self._held = None
        w = self._window
        self._commit(w.tentative, held.result)
        self._clear_hypothesis()
        self._close_utterance(len(w.audio))

    def _clear_hypothesis(self) -> None:
        """No tentative words any more: none to draft from, none on the caption."""
        self._window.tentative = []
        self._last_result = None
        self._set_partial(None)

    def _silenced_by_context(self, result: WindowResult) -> bool:
        """The decoder wrote nothing at all for an utterance with `SILENCED_MIN_SPEECH_S` of
        speech, after committed words (forced, or in the prompt): its final is decoded again
        alone (`_alone_request`). A hallucination that got committed can do that to every
        later utterance: Japanese seed 1 with a 150 ms pre-roll committed "ご" from room tone,
        then "視聴ありがとうございました", and after that prefix the decoder wrote nothing for
        the rest of the stream (CER 0.95)."""
        w = self._window
        if result.words or not (w.committed or self._prompt):
            return False
        if w.committed_until() > w.piece_start(w.finals[0]):
            return False  # its words were committed by agreement: the final has nothing left
        start_s = w.piece_of(w.finals[0])[1] / SAMPLE_RATE
        return w.speech_until_s[0] - start_s >= SILENCED_MIN_SPEECH_S

    def _drop_if_wordless(self, end: int) -> int:
        """Cut the utterance that ends at `end` out of the window if it left no word (the
        guards rejected all of it: a cough, a click, room noise the VAD let through); return
        where the window's audio of it now ends. Kept, it would be heard as the start of the
        next utterance: Japanese stream seed 1 opens with 1 s of the clip's room tone, which
        came out as "ご視聴ありがとうございました" (dropped), and the sentence after it, decoded
        with that noise in front, as "見えようとはときと言いますか" (10 characters wrong)."""
        w = self._window
        start = w.piece_start(end)
        if w.committed_until() > start:
            return end
        w.cut_out(start, end)
        self.stats.wordless_cut += 1
        return start

    def _commit(self, words: list[HypWord], result: WindowResult) -> None:
        if not words:
            return
        self._probe = None  # decoded after other forced words: no longer the utterance's rest
        if self.language is None:
            self.language = result.language  # detected once, then kept: short windows flip
        self._window.committed.extend(words)
        self._recent.extend(words)
        self._events.append(
            Final(
                segment=self._next_segment,
                start=words[0].start,
                end=words[-1].end,
                text="".join(w.word for w in words),
                words=tuple(Word(w.word, w.start, w.end, w.probability) for w in words),
                language=result.language,
                avg_logprob=result.avg_logprob,
                no_speech_prob=result.no_speech_prob,
            )
        )
        self._next_segment += 1
        self._partial = None

    def _maybe_trim(self, window_s: float) -> None:
        """Cut committed audio off the window once it is long (it lives on in the prompt)."""
        w = self._window
        long = window_s >= self.config.force_commit_s or len(w.audio) / SAMPLE_RATE >= (
            self.config.force_commit_s
        )
        committed_until = w.committed_until()
        if w.committed and (committed_until / SAMPLE_RATE >= self.config.trim_after_s or long):
            w.trim_to(committed_until)
            self._retire_committed()
        elif window_s >= self.config.force_commit_s:
            # Nothing committed in a window this long: the words never came (noise the guards
            # rejected). Keep its recent part; audio after the decoded window is kept whole.
            w.trim_to(round((window_s - self.config.trim_after_s) * SAMPLE_RATE))
            w.tentative = []
            self.stats.trims += 1

    def _retire_committed(self) -> None:
        """Committed words leave the window (trimmed off): they become prompt context."""
        w = self._window
        self._prompt.extend(t for h in w.committed for t in h.tokens)
        w.committed = []
        self.stats.trims += 1

    def _set_partial(self, words: list[HypWord] | None) -> None:
        if words:
            text = "".join(w.word for w in words)
            partial: Partial | None = Partial(
                self._next_segment, words[0].start, words[-1].end, text
            )
        elif self._partial is not None:
            # the tentative words are gone (the guards dropped them): clear the caption
            partial = Partial(self._next_segment, self._partial.start, self._partial.start, "")
        else:
            partial = None
        if partial is not None and partial != self._partial:
            self._events.append(partial)
        self._partial = partial if words else None

    # -- output ----------------------------------------------------------------------------------

    def events(self) -> list[Event]:
        """Events since the last call, in order."""
        out, self._events = self._events, []
        return out

    @property
    def ended(self) -> bool:
        """`end_stream` was called: no more audio will come."""
        return self._ended

    @property
    def next_segment(self) -> int:
        """The id the next Final will carry (= how many Finals so far)."""
        return self._next_segment

    @property
    def finished(self) -> bool:
        """The stream has ended and every utterance has been finalized."""
        return self._ended and not self._window.finals and self._in_flight is None
