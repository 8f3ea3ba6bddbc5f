"""Peers side by side: the same audio and weights through other streaming Whisper systems.

    bash bench/peers/setup.sh                  # once: installs the peers into .peers-venv
    .venv/bin/python -m bench.peers --peer whisper_streaming [--language en] [--json out.json]
    .venv/bin/python -m bench.peers --peer whisperlivekit -- --cpu-threads 2
    .venv/bin/python -m bench.peers --peer whisperlive --clip en/jfk.flac --show  # quick check

Peers (DESIGN.md §7), each run computation-aware at real-time pace by a script in bench/peers/
under .peers-venv/bin/python (their dependencies must not touch this venv):
- `whisper_streaming`: ufal/whisper_streaming's own file simulation (LocalAgreement-2 over
  faster-whisper, with its Silero VAD controller), bench/peers/run_whisper_streaming.py;
- `whisperlivekit`: QuentinFuxa/WhisperLiveKit's server (LocalAgreement-2 over faster-whisper,
  Silero VAC) over its websocket, bench/peers/run_whisperlivekit.py;
- `whisperlive`: collabora/WhisperLive's server (faster-whisper backend: re-transcribes the
  uncommitted audio, a segment is final once Whisper starts another or it repeats 10 times)
  over its websocket, bench/peers/run_whisperlive.py.
All get the built-in model in CTranslate2 format (tiny.en for English, base for Japanese),
float32 CPU inference and as many CTranslate2 threads as cores (as torch for streamd) unless
told otherwise (flags after `--`). The stream is bench.streaming's (same clips, gaps and
seed), scored by `score_peer`, which mirrors bench.streaming's `_score`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.scoring import error_rate
from bench.streaming import (
    GAP_KINDS,
    GAP_MARGIN_S,
    MODEL_FOR_LANGUAGE,
    _percentile,
    _voiced_bounds,
)
from streamd.evaluation.streams import write_wav
from tests.synth import Gap, Utterance, build_stream, manifest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PEERS_VENV = PROJECT_ROOT / ".peers-venv"
PEER_SCRIPTS = {
    "whisper_streaming": PROJECT_ROOT / "bench" / "peers" / "run_whisper_streaming.py",
    "whisperlivekit": PROJECT_ROOT / "bench" / "peers" / "run_whisperlivekit.py",
    "whisperlive": PROJECT_ROOT / "bench" / "peers" / "run_whisperlive.py",
}
SAMPLE_RATE = 16_000
UTTERANCE_MARGIN_S = 0.3  # as bench.streaming: output this close to an utterance belongs to it
_CT2_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")


class PeerError(RuntimeError):
    """A peer is not installed, or its run failed; the message says what to do."""


@dataclass(frozen=True)
class PeerSegment:
    """Text a peer emitted: `final` (committed, never changes) or tentative.

    `emitted_at` is wall seconds since the peer was handed audio time 0; `start`/`end` are
    seconds of stream audio time, as the peer reported them (tentative WhisperLiveKit text has
    no times of its own: see bench/peers/run_whisperlivekit.py).
    """

    emitted_at: float
    start: float
    end: float
    text: str
    final: bool = True


def peer_python() -> Path:
    """The peers' interpreter; raises PeerError with the fix if the venv is missing."""
    python = PEERS_VENV / "bin" / "python"
    if not python.is_file():
        raise PeerError(f"{PEERS_VENV} is missing: run bench/peers/setup.sh")
    return python


def ct2_model_dir(model: str) -> Path:
    """A CTranslate2 (faster-whisper) directory for a built-in model name or a path.

    tiny.en is its weight package's own directory; base's model.bin is split across two
    packages (DESIGN.md §6), so it is joined once into <streamd cache>/ct2/base.
    """
    from streamd.models.registry import BUILTIN_MODELS, cache_dir

    if Path(model).is_dir():
        return Path(model)
    if model not in BUILTIN_MODELS:
        raise PeerError(f"model {model!r}: expected one of {sorted(BUILTIN_MODELS)} or a dir")
    builtin = BUILTIN_MODELS[model]
    parts = builtin.bin_parts()
    config_dir = builtin.config_json().parent
    if len(parts) == 1 and parts[0].parent == config_dir:
        return config_dir
    target = cache_dir() / "ct2" / model
    size = sum(p.stat().st_size for p in parts)
    if (target / "model.bin").is_file() and (target / "model.bin").stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / model
        staging.mkdir()
        with (staging / "model.bin").open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out)
        for name in _CT2_FILES:
            if (config_dir / name).is_file():
                shutil.copy(config_dir / name, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def run_peer(
    name: str,
    audio: np.ndarray,
    language: str,
    model: str | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float | None = None,
) -> list[PeerSegment]:
    """Stream 16 kHz float32 `audio` through peer `name` at real-time pace; what it emitted.

    Blocks for about the audio's duration plus model loading. Raises PeerError if the peer
    is not installed or fails (with the tail of its log).
    """
    if name not in PEER_SCRIPTS:
        raise PeerError(f"unknown peer {name!r}; expected one of {sorted(PEER_SCRIPTS)}")
    python = peer_python()
    model_dir = ct2_model_dir(model or MODEL_FOR_LANGUAGE[language])
    with tempfile.TemporaryDirectory(prefix="streamd-peer-") as tmp:
        wav, log = Path(tmp) / "audio.wav", Path(tmp) / "peer.log"
        write_wav(wav, audio)
        command = [str(python), str(PEER_SCRIPTS[name]), str(wav), "--model-dir", str(model_dir)]
        command += ["--language", language, *extra_args]
        with log.open("wb") as stderr:
            result = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=stderr, timeout=timeout_s, check=False
            )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise PeerError(
                f"peer {name} failed ({result.returncode}): {' '.join(command)}\n{tail}"
            )
    segments = []
    for line in result.stdout.decode().splitlines():
        if line.strip():
            record = json.loads(line)
            segments.append(
                PeerSegment(
                    float(record["emitted_at"]),
                    float(record["start"]),
                    float(record["end"]),
                    str(record["text"]),
                    bool(record.get("final", True)),
                )
            )
    return segments


def _owner(segment: PeerSegment, utterances: list[Utterance]) -> int | None:
    """Index of the utterance whose window [start-0.3, end+0.3) overlaps `segment` most."""
    best, best_overlap = None, 0.0
    for i, u in enumerate(utterances):
        lo, hi = u.start_s - UTTERANCE_MARGIN_S, u.end_s + UTTERANCE_MARGIN_S
        overlap = min(hi, max(segment.end, segment.start + 1e-3)) - max(lo, segment.start)
        if overlap > best_overlap:
            best, best_overlap = i, overlap
    return best


def score_peer(
    language: str,
    segments: list[PeerSegment],
    utterances: list[Utterance],
    gaps: list[Gap],
) -> tuple[float, list[float], list[float], list[str]]:
    """(error, finalization latencies, first-partial latencies, gap words), as
    `streamd.evaluation.scoring.score_events` gives for streamd.

    Peers give segment times, not word times, so this differs from `score_events`:
    - a segment belongs to the utterance whose window (±0.3 s, as ours) it overlaps most; ours
      gives each final word to the utterance its start time falls in;
    - finalization latency: arrival of the committed segment holding the utterance's last word
      as the peer transcribed it (the utterance's committed segment with the latest end; the
      first to arrive if several end there), minus the voiced end of the clip. Ours: arrival
      of the latest final holding a word of the utterance, minus the same voiced end. Both
      measure when the utterance's transcript was complete, whatever its last word; neither
      asks that the peer's last word is the reference's last word. (Matching segment times
      to the voiced end would not work: it is a level threshold, and in jfk.flac it is the
      end of the clip, 0.5-0.9 s after both peers place the end of "country".)
    - first partial: the first segment of the utterance, tentative or committed (the
      whisper_streaming simulation prints committed text only), minus the first voiced frame;
    - gap words: a committed segment's words are spread evenly over [start, end], and those
      whose middle lies inside a gap (0.2 s margin, as ours) count. Ours uses word times;
    - WER/CER: committed texts joined by spaces, against the references joined.
    """
    finals = [s for s in segments if s.final]
    ref = " ".join(u.text for u in utterances)
    error = error_rate([ref], [" ".join(s.text for s in finals)], language)
    owners = [_owner(s, utterances) for s in segments]
    latencies, first_partials = [], []
    for i, u in enumerate(utterances):
        first, last = _voiced_bounds(u.file)
        voiced_end = u.start_s + last
        mine = [s for s, owner in zip(segments, owners, strict=True) if owner == i]
        committed = [s for s in mine if s.final]
        if committed:
            holder = min(committed, key=lambda s: (-s.end, s.emitted_at))
            latencies.append(holder.emitted_at - voiced_end)
        if mine:
            first_partials.append(min(s.emitted_at for s in mine) - (u.start_s + first))
    gap_words = []
    for s in finals:
        words = s.text.split()
        for k, word in enumerate(words):
            middle = s.start + (k + 0.5) * (s.end - s.start) / len(words)
            if any(g.start_s + GAP_MARGIN_S < middle < g.end_s - GAP_MARGIN_S for g in gaps):
                gap_words.append(word)
    return error, latencies, first_partials, gap_words


@dataclass(frozen=True)
class PeerReport:
    peer: str
    language: str
    model: str
    extra_args: list[str]
    audio_s: float
    utterances: int
    utterances_scored: int
    error_streaming: float
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    first_partial_median_s: float
    gap_words: int
    gap_word_list: list[str]
    wall_s: float


def run(
    peer: str,
    language: str,
    seed: int,
    extra_args: Sequence[str] = (),
    clip: str | None = None,
    show: bool = False,
) -> PeerReport:
    """bench.streaming's evaluation stream through `peer`, scored by `score_peer`.

    With `clip` (a manifest file, e.g. en/jfk.flac), only that clip between two silence
    gaps: a quick check that a peer works. `show` prints every segment it emitted.
    """
    if clip is None:
        files = [m["file"] for m in manifest() if m["language"] == language]
        kinds = [GAP_KINDS[i % len(GAP_KINDS)] for i in range(len(files) + 1)]
    else:
        files, kinds = [clip], ["silence", "silence"]
    audio, utterances, gaps = build_stream(files, kinds, seed=seed)  # type: ignore[arg-type]
    started = time.perf_counter()
    segments = run_peer(peer, audio, language, extra_args=extra_args)
    wall = time.perf_counter() - started
    for s in segments if show else []:
        kind = "final" if s.final else "partial"
        print(f"{s.emitted_at:8.3f}s  [{s.start:7.2f} {s.end:7.2f}] {kind:>7} {s.text!r}")
    error, latencies, firsts, gap_words = score_peer(language, segments, utterances, gaps)
    return PeerReport(
        peer=peer,
        language=language,
        model=MODEL_FOR_LANGUAGE[language],
        extra_args=list(extra_args),
        audio_s=round(len(audio) / SAMPLE_RATE, 2),
        utterances=len(utterances),
        utterances_scored=len(latencies),
        error_streaming=round(error, 4),
        latency_median_s=round(statistics.median(latencies), 3) if latencies else float("nan"),
        latency_p90_s=round(_percentile(latencies, 90), 3),
        latency_max_s=round(max(latencies), 3) if latencies else float("nan"),
        first_partial_median_s=round(statistics.median(firsts), 3) if firsts else float("nan"),
        gap_words=len(gap_words),
        gap_word_list=gap_words,
        wall_s=round(wall, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer", choices=sorted(PEER_SCRIPTS), required=True)
    parser.add_argument("--language", choices=sorted(MODEL_FOR_LANGUAGE), default="en")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--clip", default=None, help="one manifest clip only, e.g. en/jfk.flac")
    parser.add_argument("--show", action="store_true", help="print every emitted segment")
    parser.add_argument("extra_args", nargs="*", help="after --: flags for the peer's script")
    args = parser.parse_args()
    report = run(args.peer, args.language, args.seed, args.extra_args, args.clip, args.show)
    for key, value in asdict(report).items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
