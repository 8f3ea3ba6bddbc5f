"""`streamd bench`: the real daemon under N concurrent real-time clients, scored.

    streamd bench --language en --clients 1,2,4,8 --out bench-en
    streamd bench --language ja --clients 1,2 --peers whisper_streaming,whisperlivekit

Builds the evaluation streams (streamd.evaluation.streams: the language's clips joined by
seeded silence / noise / murmur gaps; client i gets seed+i), writes them under OUT/streams
(WAV, reference and gap JSON), transcribes them offline once (in this process, with the
Transcriber that `streamd transcribe` uses: the streaming penalty is the difference), times
one 30 s encoder pass of it to name the machine (latency scales with it), then for each N
starts a fresh `streamd serve` and streams to it from N websocket clients at real-time pace.
Prints a table, writes OUT/results.json, OUT/latency.png and every client's messages under
OUT/messages. Needs the `bench` extra (jiwer, matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from streamd.engine.precision import ENCODER_PRECISIONS, resolve_encoder_precision
from streamd.errors import ConfigError

if TYPE_CHECKING:
    from streamd.evaluation.report import PeerRow
    from streamd.evaluation.streams import EvaluationStream
    from streamd.transcribe import Transcriber

EXIT_OK = 0
EXIT_ERROR = 1
_EXTRAS = ("jiwer", "matplotlib")
_PEERS_HINT = (
    "bench/peers.py of a streamd source checkout, installed with bash bench/peers/setup.sh"
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from streamd.evaluation import MODEL_FOR_LANGUAGE

    b = sub.add_parser(
        "bench",
        help="latency, accuracy and capacity of the daemon under N real-time clients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--language", choices=sorted(MODEL_FOR_LANGUAGE), default="en")
    b.add_argument("--model", default=None, help="default: tiny.en for en, base for ja")
    b.add_argument(
        "--clients", type=_counts, default=[1, 2, 4], help="concurrent streams per run: 1,2,4"
    )
    b.add_argument("--seed", type=int, default=0, help="gap lengths of client i: seed + i")
    b.add_argument("--clips", type=int, default=None, help="only the language's first N clips")
    b.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    b.add_argument(
        "--peers",
        type=_names,
        default=[],
        help="also run these peer systems on client 0's stream (N=1): whisper_streaming,...",
    )
    b.add_argument("--no-offline", action="store_true", help="skip the offline transcription")
    b.add_argument("--device", default="cpu", help="torch device of daemon and offline: cpu/cuda")
    b.add_argument(
        "--encoder-precision",
        choices=ENCODER_PRECISIONS,
        default="auto",
        help="encoder arithmetic of daemon and offline (auto: bf16 where the CPU has it)",
    )
    b.add_argument(
        "--serve-args",
        type=shlex.split,
        default=[],
        help="more `streamd serve` flags, quoted: '--encoder-buckets 10,20,30'",
    )
    b.add_argument("--audio-dir", type=Path, default=None, help="clips and manifest.json")


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; EXIT_ERROR if a peer failed (its error is printed, the rest is
    written). Raises ConfigError for a missing extra, peer setup or audio."""
    _require_extras()
    from streamd.evaluation import MODEL_FOR_LANGUAGE
    from streamd.evaluation.daemon import running_daemon
    from streamd.evaluation.load import run_clients
    from streamd.evaluation.machine import describe_machine
    from streamd.evaluation.report import BenchResults, format_table, write_json, write_plot
    from streamd.evaluation.streams import evaluation_stream, write_stream

    model = args.model or MODEL_FOR_LANGUAGE[args.language]
    peers = _peers_module() if args.peers else None
    if peers is not None:
        unknown = [p for p in args.peers if p not in peers.PEER_SCRIPTS]
        if unknown:
            raise ConfigError(f"unknown peer(s) {unknown}; expected {sorted(peers.PEER_SCRIPTS)}")
        try:
            peers.peer_python()  # the venv must exist before an hour of load runs, not after
        except peers.PeerError as exc:
            raise ConfigError(str(exc)) from exc
    out: Path = args.out
    streams = [
        evaluation_stream(args.language, args.seed + i, args.clips, args.audio_dir)
        for i in range(max(args.clients))
    ]
    for stream in streams:
        write_stream(stream, out / "streams")
    _log(f"{len(streams)} stream(s) of {streams[0].duration_s:.1f} s in {out / 'streams'}")
    precision = resolve_encoder_precision(args.encoder_precision, args.device)
    _log(f"encoder precision: {precision}")
    transcriber = _transcriber(model, args.device, precision)
    machine = describe_machine(transcriber.engine)
    _log(f"machine: {machine.cpu}; one 30 s encoder pass {machine.encoder_pass_s:.2f} s")
    offline = None if args.no_offline else _offline_texts(streams, transcriber)
    serve = ["--model", model, "--device", args.device, "--encoder-precision", precision]
    serve += args.serve_args
    results = BenchResults(
        language=args.language,
        model=model,
        seed=args.seed,
        clips=[u.file for u in streams[0].utterances],
        streams=[s.name for s in streams],
        runs=[],
        daemon_args=serve,
        machine=machine,
    )
    for n in args.clients:
        _log(f"N={n}: {n} client(s) at real-time pace, fresh daemon")
        with (
            tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmp,
            running_daemon(Path(tmp), *serve, "--max-sessions", str(max(64, n))) as daemon,
        ):
            report = run_clients(
                daemon,
                streams[:n],
                model,
                offline_texts=None if offline is None else offline[:n],
                dump_dir=out / "messages",
                audio_dir=args.audio_dir,
            )
        results = replace(results, runs=[*results.runs, report])
        write_json(results, out / "results.json")  # after each run: a long bench keeps its rows
        _log(
            f"N={n}: err {report.error_streaming:.3f}, latency median "
            f"{report.latency_median_s:.2f} s, p90 {report.latency_p90_s:.2f} s"
        )
    failed = 0
    for name in args.peers:
        assert peers is not None
        try:
            row = _peer_row(peers, name, streams[0], model)
            results = replace(results, peers=[*results.peers, row])
        except peers.PeerError as exc:  # the load runs are done: report, keep their results
            print(f"streamd: error: {exc}", file=sys.stderr)
            failed += 1
    write_json(results, out / "results.json")
    write_plot(results, out / "latency.png")
    print(format_table(results))
    _log(f"wrote {out / 'results.json'} and {out / 'latency.png'}")
    return EXIT_ERROR if failed else EXIT_OK


def _require_extras() -> None:
    missing = [name for name in _EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"streamd bench needs {' and '.join(missing)}: pip install 'streamd[bench]'"
        )


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts like 1,2,4, got {text!r}")
    return sorted(set(counts))


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _transcriber(model_name: str, device: str, precision: str) -> Transcriber:
    """What `streamd transcribe` runs, with the daemon's model and precision: it makes the
    offline transcripts, and its engine is the machine's yardstick."""
    from streamd.models.loader import load_model
    from streamd.transcribe import Transcriber

    return Transcriber(load_model(model_name, device=device), encoder_precision=precision)


def _offline_texts(streams: Sequence[EvaluationStream], transcriber: Transcriber) -> list[str]:
    """Offline transcripts of `streams`, as `streamd transcribe` makes them (one batched run)."""
    from streamd.transcribe import TranscribeOptions

    _log(f"offline transcription of {len(streams)} stream(s) with {transcriber.model.name}")
    options = TranscribeOptions(language=streams[0].language)
    return [t.text for t in transcriber.transcribe_many((s.audio for s in streams), options)]


def _peers_module() -> ModuleType:
    """bench.peers, from the source checkout this streamd is installed from."""
    checkout = Path(__file__).resolve().parents[1]
    try:
        return importlib.import_module("bench.peers")
    except ImportError:
        if not (checkout / "bench" / "peers.py").is_file():
            raise ConfigError(f"--peers needs {_PEERS_HINT}") from None
    sys.path.insert(0, str(checkout))  # `streamd` the script does not put the checkout on it
    try:
        return importlib.import_module("bench.peers")
    except ImportError as exc:
        raise ConfigError(f"--peers needs {_PEERS_HINT}: {exc}") from exc


def _peer_row(peers: ModuleType, name: str, stream: EvaluationStream, model: str) -> PeerRow:
    """`name` on `stream` at real-time pace, scored by bench.peers.score_peer (segment level)."""
    from streamd.evaluation.report import PeerRow
    from streamd.evaluation.scoring import median, percentile

    _log(f"peer {name}: one stream at real-time pace")
    started = time.perf_counter()
    segments = peers.run_peer(name, stream.audio, stream.language, model=model)
    wall_s = time.perf_counter() - started
    error, latencies, firsts, gap_words = peers.score_peer(
        stream.language, segments, list(stream.utterances), list(stream.gaps)
    )
    return PeerRow(
        peer=name,
        language=stream.language,
        model=model,
        audio_s=round(stream.duration_s, 2),
        utterances_scored=len(latencies),
        error_streaming=round(error, 4),
        latency_median_s=round(median(latencies), 3),
        latency_p90_s=round(percentile(latencies, 90), 3),
        latency_max_s=round(max(latencies, default=float("nan")), 3),
        first_partial_median_s=round(median(firsts), 3),
        gap_words=len(gap_words),
        wall_s=round(wall_s, 1),
    )


def _log(message: str) -> None:
    print(f"streamd bench: {message}", file=sys.stderr, flush=True)
