"""Concurrent real-time streams through the real daemon, over the websocket.

    .venv/bin/python -m bench.load --clients 1,2,4,6 [--language en] [--json out.json]

Starts `streamd serve` (a subprocess, like a user would), then for each N runs N clients at
once, each streaming the evaluation stream of bench.streaming (real clips between silence /
noise / murmur gaps; client i draws its gap lengths with seed i, so sessions do not step in
lockstep) at real-time pace in 20 ms frames, and scores what each client received with the
same rules as bench.streaming: WER/CER of finals, finalization latency (arrival of the final
holding an utterance's last word minus that word's end in the audio), first-partial latency,
words inside gaps. Also reads the daemon's /metrics (batch sizes, overloaded steps, forward
passes, engine time) and its CPU time and peak memory from /proc. "Holds N streams" = p90
latency under 2 s.

The machinery is streamd.evaluation.load (what `streamd bench` runs, which adds offline WER,
peers, results.json and a plot); this script is its bare form.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from streamd.evaluation import MODEL_FOR_LANGUAGE
from streamd.evaluation.daemon import running_daemon
from streamd.evaluation.load import FRAME_S, HOLD_P90_S, RunReport, run_clients
from streamd.evaluation.streams import evaluation_stream

LoadReport = RunReport  # the old name
__all__ = ["FRAME_S", "HOLD_P90_S", "LoadReport", "run"]


def run(counts: list[int], language: str, dump: Path | None = None) -> list[LoadReport]:
    """One fresh daemon per N in `counts`; client i streams the seed-i evaluation stream."""
    model = MODEL_FOR_LANGUAGE[language]
    streams = [evaluation_stream(language, seed=i) for i in range(max(counts))]
    reports: list[LoadReport] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            # a fresh daemon per N: its metrics and peak memory belong to this run alone
            with running_daemon(Path(tmp) / f"n{n}", "--model", model, "--max-sessions", "64") as d:
                reports.append(run_clients(d, streams[:n], model, dump_dir=dump))
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
