"""Streaming acceptance: a stream of real clips between silence/noise/murmur gaps, replayed.

    .venv/bin/python -m bench.streaming [--language en|ja] [--virtual] [--json out.json]
        [--seeds 0,1,2,3] [--no-cancel-steps] [--threads N]

Reports WER/CER of finals vs the references and vs offline `transcribe` of the same audio,
finalization latency (arrival of the final holding an utterance's last word minus the end of
that word in the audio), first-partial latency, words emitted inside the gaps, and decoder
forward passes per audio second with and without drafts. Computation-aware (real-time pacing,
real wall clock) unless --virtual. It also names the machine and times one 30 s encoder pass
(`streamd.evaluation.machine`): latency scales with it, sevenfold between this project's CPUs.

A Japanese stream holds two clips, so one seed gives two latencies and its median is the mean
of two. `--seeds` replays several streams (the same clips, other gaps) one after another and
adds a pooled summary: every utterance's latency in one median and p90, the mean error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from streamd.engine.precision import ENCODER_PRECISIONS, resolve_encoder_precision
from streamd.evaluation import MODEL_FOR_LANGUAGE
from streamd.evaluation.machine import describe_machine
from streamd.evaluation.scoring import (
    GAP_MARGIN_S,
    SPEECH_FLOOR_DB,
    error_rate,
    median,
    percentile,
    score_events,
    voiced_bounds,
)
from streamd.evaluation.streams import STREAM_GAP_ORDER, evaluation_stream
from streamd.models.loader import load_model
from streamd.streaming.config import SessionConfig
from streamd.streaming.replay import replay_realtime, replay_virtual
from streamd.streaming.session import Session
from streamd.streaming.window import WindowRequest, WindowResult
from streamd.streaming.window_decoder import WindowDecoder
from streamd.transcribe import TranscribeOptions, Transcriber

# the names bench.load / bench.peers used to import from here (now in streamd.evaluation)
GAP_KINDS: tuple[str, ...] = STREAM_GAP_ORDER
__all__ = [
    "GAP_KINDS",
    "GAP_MARGIN_S",
    "MODEL_FOR_LANGUAGE",
    "SPEECH_FLOOR_DB",
    "Report",
    "_percentile",
    "_voiced_bounds",
    "run",
]


@dataclass(frozen=True)
class Report:
    language: str
    model: str
    mode: str
    encoder_buckets_s: tuple[int, ...]
    encoder_precision: str
    cpu: str
    encoder_pass_s: float  # one 30 s encoder pass of this engine on this machine
    audio_s: float
    utterances: int
    error_streaming: float
    error_offline: float
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    vad_wait_median_s: float
    first_partial_median_s: float
    gap_words: int
    gap_word_list: list[str]
    passes_per_audio_s: float
    passes_per_audio_s_no_draft: float
    requests: int
    cancelled_steps: int
    wall_s: float
    latencies_s: tuple[float, ...] = ()  # one per utterance that got a final


@dataclass(frozen=True)
class Pooled:
    """Several seeds' reports in one: latencies pooled, errors averaged."""

    language: str
    mode: str
    seeds: tuple[int, ...]
    utterances: int
    error_streaming_mean: float
    error_offline_mean: float
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    seed_medians_s: tuple[float, ...]
    gap_words: int
    cancelled_steps: int


def pool(seeds: list[int], reports: list[Report]) -> Pooled:
    """One summary of `reports` (one per seed, same language and clock)."""
    if not reports or len(seeds) != len(reports):
        raise ValueError(f"{len(reports)} reports for seeds {seeds}")
    if len({(r.language, r.mode) for r in reports}) != 1:
        raise ValueError("pooled reports must share language and clock")
    latencies = [x for r in reports for x in r.latencies_s]
    n = len(reports)
    return Pooled(
        language=reports[0].language,
        mode=reports[0].mode,
        seeds=tuple(seeds),
        utterances=sum(r.utterances for r in reports),
        error_streaming_mean=round(sum(r.error_streaming for r in reports) / n, 4),
        error_offline_mean=round(sum(r.error_offline for r in reports) / n, 4),
        latency_median_s=round(median(latencies), 3),
        latency_p90_s=round(percentile(latencies, 90), 3),
        latency_max_s=round(max(latencies, default=float("nan")), 3),
        seed_medians_s=tuple(r.latency_median_s for r in reports),
        gap_words=sum(r.gap_words for r in reports),
        cancelled_steps=sum(r.cancelled_steps for r in reports),
    )


def _voiced_bounds(file: str) -> tuple[float, float]:
    """(first, last) voiced time of a clip (streamd.evaluation.scoring.voiced_bounds)."""
    return voiced_bounds(file)


def _percentile(values: list[float], q: float) -> float:
    return percentile(values, q)


class _NoDraft:
    """The same decoder with drafts withheld: what every step costs without KV reuse."""

    def __init__(self, decoder: WindowDecoder) -> None:
        self.decoder = decoder

    def __call__(self, requests: list[WindowRequest]) -> list[WindowResult]:
        from dataclasses import replace

        return self.decoder.decode([replace(r, draft=()) for r in requests])


def run(
    language: str,
    virtual: bool,
    seed: int,
    buckets_s: tuple[int, ...] = (30,),
    encoder_precision: str = "auto",
    cancel_steps: bool = True,
) -> Report:
    model_name = MODEL_FOR_LANGUAGE[language]
    stream = evaluation_stream(language, seed)
    audio, utterances, gaps = stream.audio, list(stream.utterances), list(stream.gaps)
    model = load_model(model_name)
    precision = resolve_encoder_precision(encoder_precision, "cpu")
    decoder = WindowDecoder(model, buckets_s=buckets_s, encoder_precision=precision)
    machine = describe_machine(decoder.engine)
    offline = Transcriber(model, decoder.engine).transcribe(
        audio, TranscribeOptions(language=language)
    )
    offline_error = error_rate([stream.reference_text], [offline.text], language)

    session = Session(SessionConfig(cancel_steps=cancel_steps), language=language)
    start = time.perf_counter()
    if virtual:
        emitted = replay_virtual(session, audio, decoder.decode)
    else:
        emitted = asyncio.run(replay_realtime(session, audio, decoder.decode))
    wall = time.perf_counter() - start
    score = score_events(language, emitted, utterances, gaps)
    latencies, first_partials = score.latencies_s, score.first_partials_s
    audio_s = len(audio) / 16000
    baseline = Session(language=language)
    replay_virtual(baseline, audio, _NoDraft(decoder))
    return Report(
        language=language,
        model=model_name,
        mode="virtual" if virtual else "realtime",
        encoder_buckets_s=buckets_s,
        encoder_precision=precision,
        cpu=f"{machine.cpu}, {machine.threads} threads",
        encoder_pass_s=machine.encoder_pass_s,
        audio_s=round(audio_s, 2),
        utterances=len(utterances),
        error_streaming=round(score.error, 4),
        error_offline=round(offline_error, 4),
        latency_median_s=round(median(latencies), 3),
        latency_p90_s=round(percentile(latencies, 90), 3),
        latency_max_s=round(max(latencies, default=float("nan")), 3),
        vad_wait_median_s=round(median(score.vad_waits_s), 3),
        first_partial_median_s=round(median(first_partials), 3),
        gap_words=len(score.gap_words),
        gap_word_list=score.gap_words,
        passes_per_audio_s=round(session.stats.forward_passes / audio_s, 2),
        passes_per_audio_s_no_draft=round(baseline.stats.forward_passes / audio_s, 2),
        requests=session.stats.requests,
        cancelled_steps=session.stats.cancelled,
        wall_s=round(wall, 2),
        latencies_s=tuple(round(x, 3) for x in latencies),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--language", choices=sorted(MODEL_FOR_LANGUAGE), default="en")
    parser.add_argument("--virtual", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", default=None, help="several streams, e.g. 0,1,2,3, pooled (overrides --seed)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--encoder-buckets", default="30", help="e.g. 10,20,30")
    parser.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="auto")
    parser.add_argument(
        "--no-cancel-steps",
        action="store_true",
        help="let a partial step finish when the final becomes due (docs/streaming.md)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 on 2 cores: a slower engine)"
    )
    args = parser.parse_args()
    buckets = tuple(int(b) for b in args.encoder_buckets.split(","))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        seeds = [args.seed] if args.seeds is None else [int(x) for x in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    reports = []
    for seed in seeds:
        report = run(
            args.language,
            args.virtual,
            seed,
            buckets,
            args.encoder_precision,
            cancel_steps=not args.no_cancel_steps,
        )
        reports.append(report)
        if len(seeds) > 1:
            print(f"== seed {seed}")
        for key, value in asdict(report).items():
            print(f"{key:>28}: {value}", flush=True)
    out: dict[str, object] = asdict(reports[0])
    if len(seeds) > 1:
        pooled = pool(seeds, reports)
        print("== pooled")
        for key, value in asdict(pooled).items():
            print(f"{key:>28}: {value}")
        out = {"pooled": asdict(pooled), "runs": [asdict(r) for r in reports]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
