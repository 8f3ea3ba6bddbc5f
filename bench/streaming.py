"""Streaming acceptance: a stream of real clips between silence/noise/murmur gaps, replayed.

    .venv/bin/python -m bench.streaming [--language en|ja] [--virtual] [--json out.json]

Reports WER/CER of finals vs the references and vs offline `transcribe` of the same audio,
finalization latency (arrival of the final holding an utterance's last word minus the end of
that word in the audio), first-partial latency, words emitted inside the gaps, and decoder
forward passes per audio second with and without drafts. Computation-aware (real-time pacing,
real wall clock) unless --virtual.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.scoring import error_rate
from streamd.models.loader import load_model
from streamd.streaming.events import Final, Partial
from streamd.streaming.replay import Emitted, replay_realtime, replay_virtual
from streamd.streaming.session import Session
from streamd.streaming.window import WindowRequest, WindowResult
from streamd.streaming.window_decoder import WindowDecoder
from streamd.transcribe import TranscribeOptions, Transcriber
from tests.synth import Gap, Utterance, build_stream, clip, manifest

MODEL_FOR_LANGUAGE = {"en": "tiny.en", "ja": "base"}
GAP_KINDS = ("silence", "white", "murmur", "pink")
SPEECH_FLOOR_DB = 30.0  # a 10 ms frame within this of the clip's loudest is speech
GAP_MARGIN_S = 0.2  # a word this far inside a gap is hallucinated (times are approximate)


@dataclass(frozen=True)
class Report:
    language: str
    model: str
    mode: str
    encoder_buckets_s: tuple[int, ...]
    audio_s: float
    utterances: int
    error_streaming: float
    error_offline: float
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    first_partial_median_s: float
    gap_words: int
    gap_word_list: list[str]
    passes_per_audio_s: float
    passes_per_audio_s_no_draft: float
    requests: int
    wall_s: float


def _voiced_bounds(file: str) -> tuple[float, float]:
    """(first, last) voiced time of a clip: 10 ms frames within SPEECH_FLOOR_DB of its peak."""
    audio = clip(file)
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    db = 20 * np.log10(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) + 1e-10)
    voiced = np.nonzero(db > db.max() - SPEECH_FLOOR_DB)[0]
    return float(voiced[0]) / 100, float(voiced[-1] + 1) / 100


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class _NoDraft:
    """The same decoder with drafts withheld: what every step costs without KV reuse."""

    def __init__(self, decoder: WindowDecoder) -> None:
        self.decoder = decoder

    def __call__(self, requests: list[WindowRequest]) -> list[WindowResult]:
        from dataclasses import replace

        return self.decoder.decode([replace(r, draft=()) for r in requests])


def _score(
    language: str,
    emitted: list[Emitted],
    utterances: list[Utterance],
    gaps: list[Gap],
) -> tuple[float, list[float], list[float], list[str]]:
    finals = [e for e in emitted if isinstance(e.event, Final)]
    words = [(w, e.emitted_at) for e in finals for w in e.event.words]  # type: ignore[union-attr]
    hyp = "".join(e.event.text for e in finals)  # type: ignore[union-attr]
    ref = " ".join(u.text for u in utterances)
    error = error_rate([ref], [hyp], language)
    latencies, first_partials = [], []
    for u in utterances:
        first, last = _voiced_bounds(u.file)
        voiced_end = u.start_s + last
        mine = [(w, at) for w, at in words if u.start_s - 0.3 <= w.start < u.end_s + 0.3]
        if mine:
            latencies.append(max(at for _, at in mine) - voiced_end)
        starts = [
            e.emitted_at
            for e in emitted
            if isinstance(e.event, Partial | Final) and u.start_s - 0.3 <= e.event.start < u.end_s
        ]
        if starts:
            first_partials.append(min(starts) - (u.start_s + first))
    gap_words = [
        w.word
        for w, _ in words
        for g in gaps
        if g.start_s + GAP_MARGIN_S < (w.start + w.end) / 2 < g.end_s - GAP_MARGIN_S
    ]
    return error, latencies, first_partials, gap_words


def run(language: str, virtual: bool, seed: int, buckets_s: tuple[int, ...] = (30,)) -> Report:
    model_name = MODEL_FOR_LANGUAGE[language]
    files = [m["file"] for m in manifest() if m["language"] == language]
    gaps_kinds = [GAP_KINDS[i % len(GAP_KINDS)] for i in range(len(files) + 1)]
    audio, utterances, gaps = build_stream(files, gaps_kinds, seed=seed)  # type: ignore[arg-type]
    model = load_model(model_name)
    decoder = WindowDecoder(model, buckets_s=buckets_s)
    offline = Transcriber(model, decoder.engine).transcribe(
        audio, TranscribeOptions(language=language)
    )
    ref = " ".join(u.text for u in utterances)
    offline_error = error_rate([ref], [offline.text], language)

    session = Session(language=language)
    start = time.perf_counter()
    if virtual:
        emitted = replay_virtual(session, audio, decoder.decode)
    else:
        emitted = asyncio.run(replay_realtime(session, audio, decoder.decode))
    wall = time.perf_counter() - start
    error, latencies, first_partials, gap_words = _score(language, emitted, utterances, gaps)
    audio_s = len(audio) / 16000
    baseline = Session(language=language)
    replay_virtual(baseline, audio, _NoDraft(decoder))
    return Report(
        language=language,
        model=model_name,
        mode="virtual" if virtual else "realtime",
        encoder_buckets_s=buckets_s,
        audio_s=round(audio_s, 2),
        utterances=len(utterances),
        error_streaming=round(error, 4),
        error_offline=round(offline_error, 4),
        latency_median_s=round(statistics.median(latencies), 3) if latencies else float("nan"),
        latency_p90_s=round(_percentile(latencies, 90), 3),
        latency_max_s=round(max(latencies), 3) if latencies else float("nan"),
        first_partial_median_s=round(statistics.median(first_partials), 3)
        if first_partials
        else float("nan"),
        gap_words=len(gap_words),
        gap_word_list=gap_words,
        passes_per_audio_s=round(session.stats.forward_passes / audio_s, 2),
        passes_per_audio_s_no_draft=round(baseline.stats.forward_passes / audio_s, 2),
        requests=session.stats.requests,
        wall_s=round(wall, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--language", choices=sorted(MODEL_FOR_LANGUAGE), default="en")
    parser.add_argument("--virtual", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--encoder-buckets", default="30", help="e.g. 10,20,30")
    args = parser.parse_args()
    buckets = tuple(int(b) for b in args.encoder_buckets.split(","))
    report = run(args.language, args.virtual, args.seed, buckets)
    for key, value in asdict(report).items():
        print(f"{key:>28}: {value}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
