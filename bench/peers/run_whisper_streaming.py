"""ufal/whisper_streaming's own real-time file simulation, offline, as JSON lines.

Runs INSIDE .peers-venv (bench/peers/setup.sh), never the project's .venv:

    .peers-venv/bin/python bench/peers/run_whisper_streaming.py AUDIO.wav --model-dir DIR \
        [--language en] [--min-chunk-size 1.0] [--no-vac] [--vad] [--compute-type float32]

This executes `whisper_online.py` of ufal/whisper_streaming (LocalAgreement-2 over
faster-whisper; checkout in .peers-venv/src, see setup.sh) as its own `__main__`, in its default
computation-aware mode: audio is released at real-time pace, `OnlineASRProcessor.process_iter`
(or `VACOnlineASRProcessor`'s, with --vac) runs whenever `min_chunk` of new audio has arrived,
and every committed segment is printed with its emission time. Nothing of the algorithm is
replaced. Two shims make it run offline on a CPU, and nothing else is changed:

- its `FasterWhisperASR.load_model` hard-codes `WhisperModel(..., device="cuda",
  compute_type="float16")`; `faster_whisper.WhisperModel` is swapped for a subclass that
  forces `device="cpu"`, `--compute-type` (default float32: the numerics of our CPU engine)
  and `--cpu-threads`;
- its VAD controller loads Silero VAD with `torch.hub.load("snakers4/silero-vad")`, a GitHub
  download; that one call is answered with `silero_vad.load_silero_vad()` (the same JIT model,
  from the PyPI package silero-vad).

Its output lines `EMISSION_MS BEG_MS END_MS TEXT` (times since the simulation started, after
its warm-up; beg/end are audio times) are turned into JSON lines on stdout:
`{"emitted_at": s, "start": s, "end": s, "text": str}`. Its logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any, TextIO

import common

DEFAULT_UFAL_DIR = Path(__file__).resolve().parents[2] / ".peers-venv/src/ufal_whisper_streaming"
SILERO_HUB_REPO = "snakers4/silero-vad"
_VAC_IDLE_PREFIX = "no online update"  # printed by its VAD controller every 40 ms chunk


class _Translate:
    """File-like stdout: its transcript lines in, JSON lines out to `out`."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        parts = line.split(" ", 3)
        if len(parts) < 3:
            return
        try:
            emitted_ms, beg_ms, end_ms = (float(p) for p in parts[:3])
        except ValueError:  # not a transcript line: keep it, as a log line
            sys.stderr.write(line + "\n")
            return
        record = {
            "emitted_at": round(emitted_ms / 1000, 4),
            "start": beg_ms / 1000,
            "end": end_ms / 1000,
            "text": parts[3] if len(parts) > 3 else "",
        }
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()

    def flush(self) -> None:
        self.out.flush()


class _DropIdle:
    """File-like stderr that drops the VAD controller's per-chunk idle line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith(_VAC_IDLE_PREFIX):
                self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _patch_offline_cpu(compute_type: str, cpu_threads: int) -> None:
    import faster_whisper
    import torch

    common.force_cpu_model(faster_whisper, compute_type, cpu_threads)

    hub_load = torch.hub.load

    def offline_hub_load(repo_or_dir: str, model: str, *args: Any, **kwargs: Any) -> Any:
        if repo_or_dir == SILERO_HUB_REPO and model == "silero_vad":
            from silero_vad import load_silero_vad

            return load_silero_vad(), None
        return hub_load(repo_or_dir, model, *args, **kwargs)

    torch.hub.load = offline_hub_load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, "CTranslate2 compute type")
    parser.add_argument("--min-chunk-size", type=float, default=1.0, help="s (theirs: 1.0)")
    parser.add_argument(
        "--vac",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="their VAD controller (Silero); default on, as they recommend",
    )
    parser.add_argument("--vac-chunk-size", type=float, default=0.04, help="s (theirs: 0.04)")
    parser.add_argument("--vad", action="store_true", help="faster-whisper's vad_filter too")
    parser.add_argument("--buffer-trimming-sec", type=float, default=15.0, help="theirs: 15")
    parser.add_argument("--torch-threads", type=int, default=1, help="for Silero VAD")
    parser.add_argument("--log-level", default="WARNING", help="its logging level (to stderr)")
    parser.add_argument(
        "--ufal-dir",
        type=Path,
        default=Path(os.environ.get("UFAL_WHISPER_STREAMING_DIR", DEFAULT_UFAL_DIR)),
    )
    args = parser.parse_args()

    script = args.ufal_dir / "whisper_online.py"
    if not script.is_file():
        sys.exit(
            f"{script} not found: run bench/peers/setup.sh (ufal/whisper_streaming is a "
            "manual step, see there)"
        )
    import torch

    torch.set_num_threads(args.torch_threads)
    _patch_offline_cpu(args.compute_type, args.cpu_threads)
    sys.path.insert(0, str(args.ufal_dir))  # its VAD controller imports silero_vad_iterator
    argv = [str(script), str(args.audio), "--model_dir", args.model_dir,
            "--lan", args.language, "--backend", "faster-whisper",
            "--min-chunk-size", str(args.min_chunk_size),
            "--vac-chunk-size", str(args.vac_chunk_size),
            "--buffer_trimming", "segment", "--buffer_trimming_sec", str(args.buffer_trimming_sec),
            "--log-level", args.log_level]  # fmt: skip
    argv += ["--vac"] if args.vac else []
    argv += ["--vad"] if args.vad else []
    real_stdout = sys.stdout
    sys.argv = argv
    sys.stdout = _Translate(real_stdout)
    sys.stderr = _DropIdle(sys.stderr)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stdout = real_stdout


if __name__ == "__main__":
    main()
