"""N concurrent real-time websocket clients against one daemon, scored (DESIGN.md §7).

Each client streams its evaluation stream at real-time pace in FRAME_S frames (computation-
aware: the real wall clock, whatever the daemon is doing) and records every message with its
arrival time; the run then scores each client (`scoring.score_events`), pools the results,
and reads the daemon's /metrics and /proc figures. "Holds N streams" = p90 finalization
latency under HOLD_P90_S.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamd.decoding.result import Word
from streamd.errors import StreamdError
from streamd.evaluation.daemon import Daemon, scrape_metric
from streamd.evaluation.scoring import error_rate, finals_text, median, percentile, score_events
from streamd.evaluation.streams import EvaluationStream
from streamd.streaming.events import Final, Partial, SpeechEnded
from streamd.streaming.replay import Emitted

FRAME_S = 0.02  # audio per websocket frame: what a browser's capture sends
HOLD_P90_S = 2.0  # a machine "holds" N streams while p90 finalization latency stays below this
SAMPLE_RATE = 16_000

Message = tuple[dict[str, Any], float]  # a protocol message and its arrival, s since audio 0


class LoadError(StreamdError):
    """A client could not stream to the daemon (refused, dropped); the message says which."""


@dataclass(frozen=True)
class RunReport:
    """One run: `clients` streams at once through a fresh daemon, pooled over the clients."""

    clients: int
    language: str
    model: str
    audio_s_per_client: float
    utterances_total: int
    utterances_scored: int  # utterances that got a final (the latency sample)
    error_streaming: float  # WER (en) or CER of the finals
    error_offline: float | None  # the same for offline `transcribe` of the same audio
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    vad_wait_median_s: float  # of the latency: hearing the pause that ends an utterance
    first_partial_median_s: float
    gap_words: int
    gap_word_list: list[str]
    error_messages: int  # `error` messages the clients received
    passes_per_audio_s: float  # decoder forward passes per second of audio received
    engine_rtf: float  # engine busy time per second of audio received
    mean_batch_size: float
    overloaded_steps: int
    cancelled_steps: int  # partial steps withdrawn because their final became due
    daemon_cpu_s: float
    daemon_peak_rss_mb: float
    wall_s: float
    holds: bool


def protocol_events(messages: Sequence[Message]) -> list[Emitted]:
    """Protocol v1 `partial` / `final` / `speech_ended` messages -> the session events the
    scoring reads."""
    out: list[Emitted] = []
    for m, at in messages:
        if m["type"] == "final":
            words = tuple(
                Word(w["word"], w["start"], w["end"], w["probability"]) for w in m["words"]
            )
            event: Final | Partial | SpeechEnded = Final(
                m["segment"],
                m["start"],
                m["end"],
                m["text"],
                words,
                m["language"],
                m["avg_logprob"],
                m["no_speech_prob"],
            )
        elif m["type"] == "partial":
            event = Partial(m["segment"], m["start"], m["end"], m["text"])
        elif m["type"] == "speech_ended":
            event = SpeechEnded(m["t"], m.get("level_dbfs"))
        else:
            continue
        out.append(Emitted(event, at))
    return out


async def stream_client(url: str, audio: np.ndarray, language: str) -> list[Message]:
    """Stream 16 kHz float `audio` as pcm_s16le at real-time pace, then `end`; every message
    received until the server closes, with its arrival in wall s since audio time 0.

    Raises LoadError if the connection fails or drops.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, WebSocketException

    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    frame = int(SAMPLE_RATE * FRAME_S) * 2
    received: list[Message] = []
    try:
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "language": language}))
            start = time.perf_counter()

            async def send() -> None:
                for i, offset in enumerate(range(0, len(pcm), frame)):
                    ahead_s = (i + 1) * FRAME_S - (time.perf_counter() - start)
                    await asyncio.sleep(max(0.0, ahead_s))
                    await ws.send(pcm[offset : offset + frame])
                await ws.send(json.dumps({"type": "end"}))

            sender = asyncio.create_task(send())
            async for raw in ws:
                received.append((json.loads(raw), time.perf_counter() - start))
            await sender
    except (OSError, InvalidHandshake, WebSocketException) as exc:
        raise LoadError(f"client of {url} failed after {len(received)} messages: {exc}") from exc
    return received


async def _stream_all(url: str, streams: Sequence[EvaluationStream]) -> list[list[Message]]:
    clients = (stream_client(url, s.audio, s.language) for s in streams)
    return list(await asyncio.gather(*clients))


def run_clients(
    daemon: Daemon,
    streams: Sequence[EvaluationStream],
    model: str,
    offline_texts: Sequence[str] | None = None,
    dump_dir: Path | None = None,
    audio_dir: Path | None = None,
) -> RunReport:
    """Stream each of `streams` at once through `daemon` (fresh: its metrics and peak memory
    are taken as this run's), score, pool. `offline_texts`, one per stream, give the offline
    error; `dump_dir` receives every client's messages as n{N}-client{i}.json."""
    language = streams[0].language
    started = time.perf_counter()
    results = asyncio.run(_stream_all(daemon.ws_url, streams))
    wall_s = time.perf_counter() - started
    metrics = daemon.metrics()
    cpu_s, rss_mb = daemon.usage()
    n = len(streams)
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        for i, (messages, stream) in enumerate(zip(results, streams, strict=True)):
            record = {
                "seed": stream.seed,
                "messages": [{**m, "arrived": at} for m, at in messages],
                "utterances": [asdict(u) for u in stream.utterances],
                "gaps": [asdict(g) for g in stream.gaps],
            }
            (dump_dir / f"n{n}-client{i}.json").write_text(json.dumps(record, ensure_ascii=False))
    latencies: list[float] = []
    vad_waits: list[float] = []
    firsts: list[float] = []
    gap_words: list[str] = []
    hyps: list[str] = []
    for stream, messages in zip(streams, results, strict=True):
        emitted = protocol_events(messages)
        score = score_events(language, emitted, stream.utterances, stream.gaps, audio_dir)
        latencies += score.latencies_s
        vad_waits += score.vad_waits_s
        firsts += score.first_partials_s
        gap_words += score.gap_words
        hyps.append(finals_text(emitted))
    refs = [s.reference_text for s in streams]
    offline = None if offline_texts is None else error_rate(refs, offline_texts, language)
    audio_in_s = scrape_metric(metrics, "streamd_audio_in_seconds_total")
    batches = scrape_metric(metrics, "streamd_decode_batch_size_count")
    p90 = percentile(latencies, 90)
    return RunReport(
        clients=n,
        language=language,
        model=model,
        audio_s_per_client=round(streams[0].duration_s, 2),
        utterances_total=sum(len(s.utterances) for s in streams),
        utterances_scored=len(latencies),
        error_streaming=round(error_rate(refs, hyps, language), 4),
        error_offline=None if offline is None else round(offline, 4),
        latency_median_s=round(median(latencies), 3),
        latency_p90_s=round(p90, 3),
        latency_max_s=round(max(latencies, default=float("nan")), 3),
        vad_wait_median_s=round(median(vad_waits), 3),
        first_partial_median_s=round(median(firsts), 3),
        gap_words=len(gap_words),
        gap_word_list=gap_words,
        error_messages=sum(m["type"] == "error" for messages in results for m, _ in messages),
        passes_per_audio_s=round(
            _per(scrape_metric(metrics, "streamd_decoder_forward_passes_total"), audio_in_s), 2
        ),
        engine_rtf=round(
            _per(scrape_metric(metrics, "streamd_engine_busy_seconds_total"), audio_in_s), 3
        ),
        mean_batch_size=round(
            _per(scrape_metric(metrics, "streamd_decode_batch_size_sum"), batches), 2
        ),
        overloaded_steps=int(scrape_metric(metrics, "streamd_overloaded_steps_total")),
        cancelled_steps=int(scrape_metric(metrics, "streamd_cancelled_steps_total")),
        daemon_cpu_s=round(cpu_s, 1),
        daemon_peak_rss_mb=round(rss_mb, 1),
        wall_s=round(wall_s, 1),
        holds=bool(p90 < HOLD_P90_S),  # NaN (no final at all) does not hold
    )


def _per(amount: float, per: float) -> float:
    return amount / per if per > 0 else float("nan")
