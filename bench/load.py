"""Concurrent real-time streams through the real daemon, over the websocket.

    .venv/bin/python -m bench.load --clients 1,2,4,6 [--language en] [--json out.json]

Starts `streamd serve` (a subprocess, like a user would), then for each N runs N clients at
once, each streaming the evaluation stream of bench.streaming (real clips between silence /
noise / murmur gaps; client i draws its gap lengths with seed i, so sessions do not step in
lockstep) at real-time pace in 20 ms frames, and scores what each client received with the
same rules as bench.streaming: WER/CER of finals, finalization latency (arrival of the final
holding an utterance's last word minus that word's end in the audio), first-partial latency,
words inside gaps. Also reads the daemon's /metrics (batch sizes, overloaded steps) and its
CPU time and peak memory from /proc. "Holds N streams" = p90 latency under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

from bench.streaming import GAP_KINDS, MODEL_FOR_LANGUAGE, _percentile, _score
from streamd.decoding.result import Word
from streamd.streaming.events import Final, Partial
from streamd.streaming.replay import Emitted
from tests.daemon import running_daemon
from tests.synth import Gap, Utterance, build_stream, manifest

FRAME_S = 0.02
HOLD_P90_S = 2.0


@dataclass(frozen=True)
class LoadReport:
    clients: int
    language: str
    model: str
    audio_s_per_client: float
    error_streaming: float
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    first_partial_median_s: float
    gap_words: int
    utterances_scored: int
    utterances_total: int
    mean_batch_size: float
    overloaded_steps: int
    daemon_cpu_s: float
    daemon_peak_rss_mb: float
    wall_s: float
    holds: bool


def _events(messages: list[tuple[dict[str, Any], float]]) -> list[Emitted]:
    """Protocol messages -> the session events bench.streaming scores."""
    out: list[Emitted] = []
    for m, at in messages:
        if m["type"] == "final":
            words = tuple(
                Word(w["word"], w["start"], w["end"], w["probability"]) for w in m["words"]
            )
            event: Final | Partial = Final(
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
        else:
            continue
        out.append(Emitted(event, at))
    return out


async def _client(url: str, audio: np.ndarray, language: str) -> list[tuple[dict[str, Any], float]]:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    frame = int(16_000 * FRAME_S) * 2
    received: list[tuple[dict[str, Any], float]] = []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "language": language}))
        start = time.perf_counter()

        async def send() -> None:
            for i, offset in enumerate(range(0, len(pcm), frame)):
                await asyncio.sleep(max(0.0, (i + 1) * FRAME_S - (time.perf_counter() - start)))
                await ws.send(pcm[offset : offset + frame])
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        async for raw in ws:
            received.append((json.loads(raw), time.perf_counter() - start))
        await sender
    return received


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _proc(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of a process so far."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])
    return cpu_s, peak_kb / 1024


async def _run_clients(
    url: str, streams: list[tuple[np.ndarray, list[Utterance], list[Gap]]], language: str
) -> list[list[tuple[dict[str, Any], float]]]:
    return list(await asyncio.gather(*(_client(url, s[0], language) for s in streams)))


def run(counts: list[int], language: str, dump: Path | None = None) -> list[LoadReport]:
    model = MODEL_FOR_LANGUAGE[language]
    files = [m["file"] for m in manifest() if m["language"] == language]
    kinds = [GAP_KINDS[i % len(GAP_KINDS)] for i in range(len(files) + 1)]
    reports: list[LoadReport] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            # a fresh daemon per N: its metrics and peak memory belong to this run alone
            with running_daemon(Path(tmp) / f"n{n}", "--model", model, "--max-sessions", "64") as d:
                streams = [build_stream(files, kinds, seed=i) for i in range(n)]  # type: ignore[arg-type]
                started = time.perf_counter()
                results = asyncio.run(_run_clients(d.ws_url, streams, language))
                if dump is not None:
                    dump.mkdir(parents=True, exist_ok=True)
                    for i, (messages, (_, utterances, gaps)) in enumerate(
                        zip(results, streams, strict=True)
                    ):
                        record = {
                            "messages": [{**m, "arrived": at} for m, at in messages],
                            "utterances": [asdict(u) for u in utterances],
                            "gaps": [asdict(g) for g in gaps],
                        }
                        (dump / f"n{n}-client{i}.json").write_text(json.dumps(record))
                wall = time.perf_counter() - started
                with urllib.request.urlopen(d.http_url + "/metrics") as r:
                    metrics = r.read().decode()
                cpu_s, rss_mb = _proc(d.process.pid)
            latencies: list[float] = []
            firsts: list[float] = []
            gap_words = 0
            refs, hyps = [], []
            for (_audio, utterances, gaps), messages in zip(streams, results, strict=True):
                emitted = _events(messages)
                _, lat, first, gap_list = _score(language, emitted, utterances, gaps)
                latencies += lat
                firsts += first
                gap_words += len(gap_list)
                refs.append(" ".join(u.text for u in utterances))
                hyps.append("".join(e.event.text for e in emitted if isinstance(e.event, Final)))
            from bench.scoring import error_rate

            batches = _metric(metrics, "streamd_decode_batch_size_count")
            p90 = _percentile(latencies, 90)
            reports.append(
                LoadReport(
                    clients=n,
                    language=language,
                    model=model,
                    audio_s_per_client=round(len(streams[0][0]) / 16_000, 1),
                    error_streaming=round(error_rate(refs, hyps, language), 4),
                    latency_median_s=round(statistics.median(latencies), 3),
                    latency_p90_s=round(p90, 3),
                    latency_max_s=round(max(latencies), 3),
                    first_partial_median_s=round(statistics.median(firsts), 3),
                    gap_words=gap_words,
                    utterances_scored=len(latencies),
                    utterances_total=sum(len(s[1]) for s in streams),
                    mean_batch_size=round(
                        _metric(metrics, "streamd_decode_batch_size_sum") / max(batches, 1), 2
                    ),
                    overloaded_steps=int(_metric(metrics, "streamd_overloaded_steps_total")),
                    daemon_cpu_s=round(cpu_s, 1),
                    daemon_peak_rss_mb=round(rss_mb, 1),
                    wall_s=round(wall, 1),
                    holds=p90 < HOLD_P90_S,
                )
            )
            print(json.dumps(asdict(reports[-1])), flush=True)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1,2,4", help="comma-separated concurrent counts")
    parser.add_argument("--language", choices=sorted(MODEL_FOR_LANGUAGE), default="en")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dump", type=Path, default=None, help="every client's messages here")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    reports = run(counts, args.language, args.dump)
    header = ("N", "err", "lat med", "p90", "max", "1st part", "gap w", "batch", "overl", "holds")
    print(" | ".join(header))
    for r in reports:
        print(
            f"{r.clients} | {r.error_streaming:.3f} | {r.latency_median_s:.2f} | "
            f"{r.latency_p90_s:.2f} | {r.latency_max_s:.2f} | {r.first_partial_median_s:.2f} | "
            f"{r.gap_words} | {r.mean_batch_size:.2f} | {r.overloaded_steps} | {r.holds}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))


if __name__ == "__main__":
    main()
