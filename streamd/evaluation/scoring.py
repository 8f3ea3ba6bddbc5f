"""Scoring a stream's transcript against its references (DESIGN.md §7).

- error: corpus WER (English, openai-whisper's normalizer) or CER (other languages) of finals;
- finalization latency per utterance: arrival of the latest final holding one of its words
  minus the end of its voiced audio (the clip's last 10 ms frame within SPEECH_FLOOR_DB of
  its peak);
- its VAD wait: where the VAD ended the speech (`speech_ended.t`) minus the same end of voice,
  the part of the latency spent hearing enough non-speech to call the utterance over (in audio
  time, so the same in every replay mode); the rest is decoding and queueing;
- first-partial latency: the first partial or final of the utterance minus its first 50 ms of
  voiced frames;
- gap words: final words whose middle lies inside a gap, GAP_MARGIN_S from its edges.

Needs jiwer (the `bench` extra) for the error rates only.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from streamd.errors import ConfigError
from streamd.evaluation.streams import Gap, Utterance, clip
from streamd.streaming.events import Final, Partial, SpeechEnded
from streamd.streaming.replay import Emitted

SPEECH_FLOOR_DB = 30.0  # a 10 ms frame within this of the clip's loudest is speech
ONSET_FRAMES = 5  # speech starts with 50 ms of such frames in a row (a click does not)
GAP_MARGIN_S = 0.2  # a word this far inside a gap is hallucinated (times are approximate)
UTTERANCE_MARGIN_S = 0.3  # output this close to an utterance belongs to it
VOICE_END_SLACK_S = 0.05  # a speech end this close before the end of voice still ends it
BENCH_EXTRA_HINT = "pip install 'streamd[bench]'"


@dataclass(frozen=True)
class StreamScore:
    """What one stream's events scored: the error rate and the per-utterance latencies."""

    error: float
    latencies_s: list[float]  # one per utterance that got a final
    vad_waits_s: list[float]  # one per utterance that got a final and a speech_ended after it
    first_partials_s: list[float]  # one per utterance that got any text
    gap_words: list[str]


def normalize(text: str, language: str) -> str:
    """English: openai-whisper's normalizer. Others: NFKC, no punctuation, no spaces."""
    if language == "en":
        return _english_normalizer()(text)
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if not unicodedata.category(c).startswith(("P", "Z", "S")))


def error_rate(references: Sequence[str], hypotheses: Sequence[str], language: str) -> float:
    """Corpus WER (en) or CER (other languages) over normalized texts.

    Raises ConfigError if jiwer is not installed (the `bench` extra).
    """
    try:
        import jiwer
    except ImportError as exc:
        raise ConfigError(f"scoring needs jiwer: {BENCH_EXTRA_HINT}") from exc
    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    if language == "en":
        return float(jiwer.wer(refs, hyps))
    return float(jiwer.cer(refs, hyps))


def voiced_bounds(file: str, audio_dir: Path | None = None) -> tuple[float, float]:
    """(first, last) voiced time of a clip, s, from its 10 ms frames within SPEECH_FLOOR_DB of
    its peak: `first` starts the first run of ONSET_FRAMES of them, `last` ends the last one.

    The run is asked of the start only: ja_1 has a click 1.4 s before its talker, which made
    every first partial look 1.4 s late. The end, where finalization latency is measured
    from, stays the last such frame, as every earlier measurement took it.
    """
    audio = clip(file, audio_dir)
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    db = 20 * np.log10(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) + 1e-10)
    loud = db > db.max() - SPEECH_FLOOR_DB
    voiced = np.nonzero(loud)[0]
    runs = np.convolve(loud, np.ones(ONSET_FRAMES, dtype=int), mode="valid") == ONSET_FRAMES
    onsets = np.nonzero(runs)[0]
    first = onsets[0] if onsets.size else voiced[0]  # a clip too short for a run: its first
    return float(first) / 100, float(voiced[-1] + 1) / 100


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (numpy's linear rule); NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values (an empty run reports NaN, it does not crash)."""
    return percentile(values, 50)


def finals_text(emitted: Sequence[Emitted]) -> str:
    """The committed transcript: every final's text, in order (texts carry their spaces)."""
    return "".join(e.event.text for e in emitted if isinstance(e.event, Final))


def score_events(
    language: str,
    emitted: Sequence[Emitted],
    utterances: Sequence[Utterance],
    gaps: Sequence[Gap],
    audio_dir: Path | None = None,
) -> StreamScore:
    """Score the events one stream produced (`emitted_at`: wall s since audio time 0)."""
    finals = [(e.event, e.emitted_at) for e in emitted if isinstance(e.event, Final)]
    words = [(w, at) for final, at in finals for w in final.words]
    error = error_rate([" ".join(u.text for u in utterances)], [finals_text(emitted)], language)
    ends = [e.event.t for e in emitted if isinstance(e.event, SpeechEnded)]
    latencies, vad_waits, first_partials = [], [], []
    for u in utterances:
        first, last = voiced_bounds(u.file, audio_dir)
        lo, hi = u.start_s - UTTERANCE_MARGIN_S, u.end_s + UTTERANCE_MARGIN_S
        mine = [at for w, at in words if lo <= w.start < hi]
        if mine:
            voice_end = u.start_s + last
            latencies.append(max(mine) - voice_end)
            ended = [t for t in ends if t >= voice_end - VOICE_END_SLACK_S]
            if ended:
                vad_waits.append(min(ended) - voice_end)
        starts = [
            e.emitted_at
            for e in emitted
            if isinstance(e.event, Partial | Final) and lo <= e.event.start < u.end_s
        ]
        if starts:
            first_partials.append(min(starts) - (u.start_s + first))
    gap_words = [
        w.word
        for w, _ in words
        for g in gaps
        if g.start_s + GAP_MARGIN_S < (w.start + w.end) / 2 < g.end_s - GAP_MARGIN_S
    ]
    return StreamScore(error, latencies, vad_waits, first_partials, gap_words)


@cache
def _english_normalizer() -> Any:
    try:
        from whisper.normalizers import EnglishTextNormalizer
    except ImportError as exc:  # openai-whisper is a dependency; a broken install lands here
        raise ConfigError(f"English scoring needs openai-whisper's normalizer: {exc}") from exc
    with warnings.catch_warnings():
        # openai-whisper reads its spelling table without closing the file
        warnings.simplefilter("ignore", ResourceWarning)
        return EnglishTextNormalizer()
