"""Scripted fakes for the streaming session: a VAD that is told where the speech is, and an engine
that knows what was said. No model, no webrtcvad, no clock: every session test is deterministic.

Audio convention: the stream is a *ramp* (`stream_audio`): the sample at stream index i holds the
value float32(i) inside speech and GAP_VALUE outside. The engine checks every window against it,
so a wrong piece mapping or a gap sample reaching the engine fails the test at once. (float32
represents every integer below 2**24 exactly: about 17 minutes of audio.)
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from streamd.streaming.agreement import word_key
from streamd.streaming.events import Event, Final, Partial
from streamd.streaming.window import HypWord, WindowRequest, WindowResult
from streamd.vad import SpeechAudio, SpeechEnded, SpeechStarted, VadEvent

SAMPLE_RATE = 16_000
MAX_WINDOW_SAMPLES = 30 * SAMPLE_RATE
GAP_VALUE = -1.0
MAX_RAMP_SAMPLES = 1 << 24

NATO = (
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"),
    *("juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"),
    *("sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"),
)

PartialMode = Literal["cut", "unstable"]
FrontMode = Literal["drop", "repeat"]


def to_samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def stream_audio(total_s: float, regions: Sequence[tuple[float, float]]) -> np.ndarray:
    """`total_s` of ramp audio: float32(index) inside `regions` (seconds), GAP_VALUE outside."""
    n = to_samples(total_s)
    if n > MAX_RAMP_SAMPLES:
        raise ValueError("ramp audio longer than float32 can index exactly")
    audio = np.full(n, GAP_VALUE, dtype=np.float32)
    for start_s, end_s in regions:
        start, end = to_samples(start_s), min(to_samples(end_s), n)
        audio[start:end] = np.arange(start, end, dtype=np.float32)
    return audio


def sample_regions(regions: Sequence[tuple[float, float]]) -> list[tuple[int, int]]:
    return [(to_samples(a), to_samples(b)) for a, b in regions]


# -- words ----------------------------------------------------------------------------------------


def word_tokens(word: str) -> tuple[int, ...]:
    """Fake token ids of a word, deterministic (1 token for short words, 2 for longer ones)."""
    h = zlib.crc32(word.encode())
    first = 1_000 + h % 40_000
    if len(word.strip()) <= 4:
        return (first,)
    return (first, 1_000 + (h >> 12) % 40_000)


def unstable_spelling(word: str) -> str:
    """What a partially heard word comes out as (" four" -> " fourteen")."""
    return word + "teen"


def alternate_spelling(word: str) -> str:
    """A second reading of a word, for an engine whose consecutive steps never agree."""
    return word + "s"


@dataclass(frozen=True)
class TrueWord:
    """A word really spoken in the stream, with stream-absolute times (seconds)."""

    word: str
    start_s: float
    end_s: float

    @property
    def tokens(self) -> tuple[int, ...]:
        return word_tokens(self.word)

    @property
    def start(self) -> int:
        return to_samples(self.start_s)

    @property
    def end(self) -> int:
        return to_samples(self.end_s)


def distinct_words(n: int, first: int = 0) -> list[str]:
    """`n` different words with Whisper's leading space: " alpha", " bravo", ... " alpha1"..."""
    out = []
    for i in range(first, first + n):
        suffix = str(i // len(NATO)) if i >= len(NATO) else ""
        out.append(f" {NATO[i % len(NATO)]}{suffix}")
    return out


def spoken(
    words: Sequence[str], start_s: float, word_s: float = 0.4, pause_s: float = 0.1
) -> list[TrueWord]:
    """`words` said one after the other from `start_s`: each `word_s` long, `pause_s` apart."""
    out = []
    t = start_s
    for w in words:
        out.append(TrueWord(w, round(t, 6), round(t + word_s, 6)))
        t += word_s + pause_s
    return out


def text_of(words: Iterable[TrueWord]) -> str:
    return "".join(w.word for w in words)


# -- the VAD --------------------------------------------------------------------------------------


class ScriptedVad:
    """A `SpeechGate` told where the speech is: `regions` are [start, end) stream samples.

    SpeechStarted comes with the first sample of a region that is fed, every sample inside a
    region comes out in exactly one SpeechAudio, in order, and SpeechEnded(end) comes with the
    feed that reaches `end + end_delay` (0: together with the region's last audio, as VadGate
    does). `flush` ends an open region at the current position; the rest of that region, if
    more is fed, opens afresh (as VadGate's detection restarts after a flush).

    With `hangover` (samples) or `pauses` ([start, end) stream samples inside regions), it also
    says where voice was last heard, as VadGate does: the last `hangover` samples of each region
    and the pauses are unvoiced; every SpeechAudio carries `last_voiced_sample` and SpeechEnded
    gives the region's end less the hangover. Without them it says nothing (-1).
    """

    def __init__(
        self,
        regions: Sequence[tuple[int, int]],
        end_delay: int = 0,
        hangover: int = 0,
        pauses: Sequence[tuple[int, int]] = (),
    ) -> None:
        previous_end = 0
        for start, end in regions:
            if not previous_end <= start < end:
                raise ValueError(f"regions must be sorted, non-empty, disjoint: {regions}")
            previous_end = end + end_delay
        self._regions = list(regions)
        self._end_delay = end_delay
        self._hangover = hangover
        self._pauses = list(pauses)
        self._tells_voice = bool(hangover or pauses)
        self._index = 0  # the next region to open, or the open one
        self._open = False
        self._sent = 0  # stream sample up to which the open region's audio is out
        self._pos = 0  # samples fed so far
        self.flushes = 0

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError("mono 1-D samples only")
        begin = self._pos
        self._pos += samples.size
        events: list[VadEvent] = []
        while self._index < len(self._regions):
            start, end = self._regions[self._index]
            if not self._open:
                if start >= self._pos:
                    break
                self._open = True
                self._sent = start
                events.append(SpeechStarted(start))
            stop = min(end, self._pos)
            if stop > self._sent:
                chunk = samples[self._sent - begin : stop - begin].copy()
                events.append(SpeechAudio(self._sent, chunk, self._last_voiced(stop, end)))
                self._sent = stop
            if self._pos < end + self._end_delay:
                break
            voiced = end - self._hangover
            events.append(SpeechEnded(end, voiced, voiced if self._tells_voice else -1))
            self._open = False
            self._index += 1
        return events

    def _last_voiced(self, until: int, region_end: int) -> int:
        if not self._tells_voice:
            return -1
        voiced = min(until, region_end - self._hangover)
        for start, end in self._pauses:
            if start <= voiced < end:
                voiced = start
        return voiced

    def flush(self) -> list[VadEvent]:
        self.flushes += 1
        if not self._open:
            return []
        end = self._regions[self._index][1]
        at = min(self._pos, end)
        voiced = self._last_voiced(at, end) if self._tells_voice else at
        self._open = False
        if self._pos < end:
            self._regions[self._index] = (self._pos, end)
        else:
            self._index += 1
        return [SpeechEnded(at, voiced, voiced if self._tells_voice else -1)]


# -- the engine -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A run of window audio: window samples [window, window + length) are stream samples
    [stream, stream + length)."""

    window: int
    stream: int
    length: int

    @property
    def stream_end(self) -> int:
        return self.stream + self.length


def window_spans(request: WindowRequest) -> list[Span]:
    """The non-empty runs of the request's audio, from its pieces (checked for sanity)."""
    n = len(request.audio)
    pieces = request.pieces
    assert pieces and pieces[0][0] == 0, f"window must start with a piece: {pieces}"
    spans = []
    for i, (offset, stream) in enumerate(pieces):
        next_offset = pieces[i + 1][0] if i + 1 < len(pieces) else n
        assert next_offset >= offset, f"pieces out of order: {pieces}"
        if i + 1 < len(pieces):
            assert pieces[i + 1][1] >= stream + next_offset - offset, f"pieces overlap: {pieces}"
        length = min(next_offset, n) - min(offset, n)
        if length > 0:
            spans.append(Span(offset, stream, length))
    assert sum(s.length for s in spans) == n
    return spans


def forced_word_count(
    hypothesis: Sequence[HypWord], forced: Sequence[int], alternates: bool, cut_words: bool = False
) -> int | None:
    """k when `forced` is exactly the tokens of the first k words of `hypothesis`, else None.

    cut_words: a word may also be forced as it was written when cut (committed half-heard; the
    decoder goes on after it)."""
    pos = 0
    for i, h in enumerate(hypothesis):
        if pos == len(forced):
            return i
        options = [h.tokens]
        if alternates:
            options.append(word_tokens(alternate_spelling(h.word)))
        if cut_words:
            options.append(word_tokens(unstable_spelling(h.word)))
        match = next((t for t in options if tuple(forced[pos : pos + len(t)]) == t), None)
        if match is None:
            return None
        pos += len(match)
    return len(hypothesis) if pos == len(forced) else None


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


class ScriptedEngine:
    """Decodes windows by looking up what was said in them.

    words: the true words of the stream. A window "hears" every word that lies inside one of its
    runs of audio. Options:
    partial: a word cut by the end of a run is left out ("cut") or comes out as another word
        ("unstable": " four" -> " fourteen", ending at the cut).
    front: a word cut by the start of a run (the window was trimmed inside it) is left out
        ("drop") or written again ("repeat", as Whisper does when it hears a word's tail).
    end_bias_s: reported word ends are this much early (DTW timing error).
    loop_copies: after the last heard word, the last `loop_ngram` heard words repeated this many
        times over the rest of the window (Whisper's loop on murmur).
    no_speech: every result says "no speech" (no_speech_prob 0.9, avg_logprob -1.5).
    disagree: every other call spells the first word after the forced prefix differently, so
        consecutive steps never agree on anything.
    stuck_on_forced: a window with forced words gets the last of them over and over instead of
        what it heard (Whisper looping on its own context).
    silenced_by_context: a window holding an earlier utterance (more than one run of audio) or
        a prompt gets nothing (Whisper after a committed sign-off, "ご視聴ありがとうございました",
        writing end-of-text for all that follows).
    early_at_join_s: the first word heard in each run of audio after the first is timed in the
        last this-many seconds of the run before it (the alignment misplacing a word across a
        join between two pieces of speech).
    cut_probability: the probability given to a word cut by the end of a run ("unstable");
        Whisper doubts such a word (0.46-0.61 for Japanese words cut by a pause).

    Pieces that are contiguous in the stream (the talker went on at once after an utterance
    ended) are one run of audio: a word across the join is heard whole.

    Every request is checked: at most 30 s, ramp audio matching its pieces, and `forced` exactly
    the tokens of the first words the engine hears in the window (the session forces nothing
    but committed words). Requests and results are recorded in `requests` / `results`.
    """

    def __init__(
        self,
        words: Sequence[TrueWord],
        *,
        partial: PartialMode = "cut",
        front: FrontMode = "drop",
        end_bias_s: float = 0.0,
        loop_ngram: int = 2,
        loop_copies: int = 0,
        no_speech: bool = False,
        disagree: bool = False,
        stuck_on_forced: bool = False,
        silenced_by_context: bool = False,
        check_ramp: bool = True,
        language: str = "en",
        early_at_join_s: float = 0.0,
        cut_probability: float = 0.9,
    ) -> None:
        self.words = list(words)
        self.partial = partial
        self.front = front
        self.end_bias_s = end_bias_s
        self.loop_ngram = loop_ngram
        self.loop_copies = loop_copies
        self.no_speech = no_speech
        self.disagree = disagree
        self.stuck_on_forced = stuck_on_forced
        self.silenced_by_context = silenced_by_context
        self.check_ramp = check_ramp
        self.language = language
        self.early_at_join_s = early_at_join_s
        self.cut_probability = cut_probability
        self.requests: list[WindowRequest] = []
        self.results: list[WindowResult] = []

    def decode(self, requests: list[WindowRequest]) -> list[WindowResult]:
        return [self.decode_one(r) for r in requests]

    def decode_one(self, request: WindowRequest) -> WindowResult:
        self.requests.append(request)
        n = len(request.audio)
        assert 0 < n <= MAX_WINDOW_SAMPLES, f"window of {n} samples"
        assert request.audio.dtype == np.float32
        spans = window_spans(request)
        for s in spans:
            assert request.to_stream_s(s.window / SAMPLE_RATE) == s.stream / SAMPLE_RATE
            if self.check_ramp:
                expected = np.arange(s.stream, s.stream_end, dtype=np.float32)
                got = request.audio[s.window : s.window + s.length]
                assert np.array_equal(got, expected), (
                    f"request {request.request_id}: window [{s.window}, {s.window + s.length}) "
                    f"is not stream [{s.stream}, {s.stream_end})"
                )
        window_end_s = request.to_stream_s(n / SAMPLE_RATE)
        assert window_end_s == spans[-1].stream_end / SAMPLE_RATE
        for hypothesis in self._hypotheses(spans):
            k = forced_word_count(
                hypothesis, request.forced, self.disagree, self.partial == "unstable"
            )
            if k is not None:
                break
        else:
            raise AssertionError(
                f"request {request.request_id}: forced {request.forced} is not the tokens of the "
                f"first words heard: {[h.word for h in self._hypotheses(spans)[0]]}"
            )
        words = list(hypothesis[k:])
        if self.stuck_on_forced and k:
            last = hypothesis[k - 1]
            step = max(window_end_s - last.end, 0.6) / 6
            words = [
                self._hyp(
                    last.word, round(last.end + i * step, 6), round(last.end + (i + 1) * step, 6)
                )
                for i in range(6)
            ]
        if self.silenced_by_context and (len(spans) > 1 or request.prompt):
            words = []
        if self.disagree and len(self.requests) % 2 == 0 and words:
            first = words[0]
            alt = alternate_spelling(first.word)
            words[0] = HypWord(alt, first.start, first.end, first.probability, word_tokens(alt))
        max_tokens = getattr(request, "max_tokens", None)  # a real decoder stops there
        if max_tokens is not None:
            budget = max_tokens
            for i, w in enumerate(words):
                budget -= len(w.tokens)
                if budget < 0:
                    words = words[:i]
                    break
        tokens = [t for w in words for t in w.tokens]
        accepted = 0
        for a, b in zip(request.draft, tokens, strict=False):
            if a != b:
                break
            accepted += 1
        result = WindowResult(
            request_id=request.request_id,
            words=tuple(words),
            language=self.language,
            avg_logprob=-1.5 if self.no_speech else -0.2,
            no_speech_prob=0.9 if self.no_speech else 0.01,
            compression_ratio=compression_ratio("".join(w.word for w in hypothesis)),
            forward_passes=1 + len(tokens) - accepted,
            draft_tokens=len(request.draft),
            accepted_tokens=accepted,
        )
        self.results.append(result)
        return result

    def _hypotheses(self, spans: list[Span]) -> list[list[HypWord]]:
        """What the engine would write for this audio: with a repeated front word first (if
        any), then without it."""
        heard: list[HypWord] = []
        front: list[int] = []  # indices in `heard` of front-cut words (optional)
        spans = _runs(spans)
        for i, s in enumerate(spans):
            first_in_span = len(heard)
            for w in self.words:
                if s.stream <= w.start and w.end <= s.stream_end:
                    if i and self.early_at_join_s and len(heard) == first_in_span:
                        join_s = spans[i - 1].stream_end / SAMPLE_RATE
                        heard.append(self._hyp(w.word, join_s - self.early_at_join_s, join_s))
                        continue
                    heard.append(self._hyp(w.word, w.start_s, w.end_s - self.end_bias_s))
                elif s.stream <= w.start < s.stream_end < w.end:
                    if self.partial == "unstable":
                        cut = self._hyp(
                            unstable_spelling(w.word), w.start_s, s.stream_end / SAMPLE_RATE
                        )
                        heard.append(replace(cut, probability=self.cut_probability))
                elif w.start < s.stream < w.end <= s.stream_end and self.front == "repeat":
                    front.append(len(heard))
                    heard.append(
                        self._hyp(w.word, s.stream / SAMPLE_RATE, w.end_s - self.end_bias_s)
                    )
        heard = self._with_loop(heard, spans[-1].stream_end / SAMPLE_RATE)
        without_front = [h for i, h in enumerate(heard) if i not in front]
        return [heard, without_front] if front else [heard]

    def _with_loop(self, heard: list[HypWord], window_end_s: float) -> list[HypWord]:
        n = self.loop_ngram
        if not self.loop_copies or len(heard) < n or window_end_s - heard[-1].end < 0.3:
            return heard
        gram = heard[-n:]
        step = (window_end_s - heard[-1].end) / (self.loop_copies * n)
        t = heard[-1].end
        out = list(heard)
        for _ in range(self.loop_copies):
            for g in gram:
                out.append(self._hyp(g.word, round(t, 6), round(t + step, 6)))
                t += step
        return out

    def _hyp(self, word: str, start_s: float, end_s: float) -> HypWord:
        return HypWord(word, start_s, max(end_s, start_s), 0.9, word_tokens(word))


def _runs(spans: list[Span]) -> list[Span]:
    """`spans` with stream-contiguous neighbours merged: one run of audio each."""
    runs = [spans[0]]
    for s in spans[1:]:
        last = runs[-1]
        if s.stream == last.stream_end and s.window == last.window + last.length:
            runs[-1] = Span(last.window, last.stream, last.length + s.length)
        else:
            runs.append(s)
    return runs


# -- reading the events ---------------------------------------------------------------------------


def finals_of(events: Iterable[Event]) -> list[Final]:
    return [e for e in events if isinstance(e, Final)]


def partials_of(events: Iterable[Event]) -> list[Partial]:
    return [e for e in events if isinstance(e, Partial)]


def final_words(events: Iterable[Event]) -> list[tuple[str, float, float]]:
    """Every committed word as (word, start, end), in the order the finals came."""
    return [(w.word, w.start, w.end) for f in finals_of(events) for w in f.words]


def true_words(words: Iterable[TrueWord]) -> list[tuple[str, float, float]]:
    return [(w.word, w.start_s, w.end_s) for w in words]


def keys(words: Iterable[str]) -> list[str]:
    return [word_key(w) for w in words]
