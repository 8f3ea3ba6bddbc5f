"""collabora/WhisperLive's server, offline, driven over its websocket; JSON lines out.

Runs INSIDE .peers-venv (bench/peers/setup.sh), never the project's .venv:

    .peers-venv/bin/python bench/peers/run_whisperlive.py AUDIO.wav --model-dir DIR \
        [--language en] [--compute-type float32] [--no-vad]

Starts `whisper_live.server.TranscriptionServer().run(...)` in a child process on a free
loopback port with `backend="faster_whisper"`, `faster_whisper_custom_model_path=DIR` and
`single_model=True`, the rest at its defaults. One warm-up connection (the first second of
AUDIO) makes it load the model; then a second connection sends its options
(`use_vad` true by default: faster-whisper's Silero filter on each chunk), streams AUDIO as
int16 at real-time pace in 20 ms frames and `END_OF_AUDIO`, and reads until it closes.

One shim: its backend builds `WhisperModel(..., device="cpu", compute_type="int8")` on a CPU
machine; in the child the class is swapped for a subclass forcing `--compute-type` (default
float32, our engine's numerics; "int8" gives WhisperLive's own choice) and `--cpu-threads`.

Its messages carry the last 10 completed segments plus the current incomplete one, each with
start/end (audio seconds) and `completed`. A segment completes when Whisper has started a next
one, or after its text repeated 10 times. Output, one JSON object per line on stdout:
`{"emitted_at", "start", "end", "text", "final"}`: each completed segment once, when it first
arrives (`final` true), and the incomplete one whenever its text changes (`final` false).
At END_OF_AUDIO it closes the connection without completing the last segment; like its own
client, the runner then takes that segment as final (emitted at the close).
`emitted_at` is seconds since the first audio frame was sent (audio time 0).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import common
import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
FRAME_S = 0.02
READY_TIMEOUT_S = 120.0
CLOSE_TIMEOUT_S = 120.0  # after END_OF_AUDIO, for its last messages


def _serve(port: int, model_dir: str, compute_type: str, cpu_threads: int) -> None:
    """Child process: the stock server, with its WhisperModel's compute type forced."""
    import whisper_live.backend.faster_whisper_backend as backend
    from whisper_live.server import TranscriptionServer

    common.force_cpu_model(backend, compute_type, cpu_threads)
    TranscriptionServer().run(
        "127.0.0.1",
        port=port,
        backend="faster_whisper",
        faster_whisper_custom_model_path=model_dir,
        single_model=True,
    )


def _session(url: str, audio: np.ndarray, options: dict[str, Any]) -> list[tuple[Any, float]]:
    """One client session; its messages with arrival times since audio time 0."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    frame = int(SAMPLE_RATE * FRAME_S) * 2
    received: list[tuple[Any, float]] = []
    with connect(url, max_size=None) as ws:
        ws.send(json.dumps({**options, "uid": str(uuid.uuid4()), "audio_format": "int16"}))
        ready = json.loads(ws.recv(timeout=READY_TIMEOUT_S))
        if ready.get("message") != "SERVER_READY":
            raise RuntimeError(f"whisperlive did not get ready: {ready}")
        start = time.perf_counter()
        offsets = range(0, len(pcm), frame)
        for i, offset in enumerate(offsets):
            due = start + (i + 1) * FRAME_S  # frame i is complete at (i + 1) * 20 ms
            while (wait := due - time.perf_counter()) > 0:
                try:
                    raw = ws.recv(timeout=wait)
                except TimeoutError:
                    break
                received.append((json.loads(raw), round(time.perf_counter() - start, 4)))
            ws.send(pcm[offset : offset + frame])
        ws.send(b"END_OF_AUDIO")
        try:
            while True:
                raw = ws.recv(timeout=CLOSE_TIMEOUT_S)
                received.append((json.loads(raw), round(time.perf_counter() - start, 4)))
        except (ConnectionClosed, TimeoutError):
            pass
    received.append(({"closed": True}, round(time.perf_counter() - start, 4)))
    return received


def translate(messages: list[tuple[Any, float]]) -> list[dict[str, Any]]:
    """Its messages -> completed segments (once each) and changes of the incomplete one.

    At the close, the incomplete segment of its last message becomes final, as its own client
    does when it writes the transcript (`write_srt_file`).
    """
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    tentative: dict[str, Any] | None = None
    for message, at in messages:
        if message.get("closed"):
            if tentative is not None and tentative["text"].strip():
                out.append({**tentative, "emitted_at": at, "final": True})
            break
        if "segments" not in message:
            continue
        tentative_text = tentative["text"] if tentative else None
        tentative = None
        for segment in message["segments"]:
            key = (segment["start"], segment["end"], segment["text"])
            record = {
                "emitted_at": at,
                "start": float(segment["start"]),
                "end": float(segment["end"]),
                "text": segment["text"],
            }
            if segment.get("completed"):
                if key not in seen:
                    seen.add(key)
                    out.append({**record, "final": True})
            else:
                tentative = record
                if segment["text"] != tentative_text:
                    out.append({**record, "final": False})
    return out


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_port, model_dir, compute_type, cpu_threads = sys.argv[2:6]
        _serve(int(serve_port), model_dir, compute_type, int(cpu_threads))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, "CTranslate2; theirs: int8")
    parser.add_argument(
        "--vad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="its use_vad option (faster-whisper's Silero filter); its client's default: on",
    )
    parser.add_argument("--log", type=Path, default=None, help="server log (default: temp)")
    args = parser.parse_args()

    audio, rate = sf.read(args.audio, dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE or audio.ndim != 1:
        sys.exit(f"{args.audio}: need 16 kHz mono, got {rate} Hz, shape {audio.shape}")
    port = common.free_port()
    url = f"ws://127.0.0.1:{port}"
    options = {"language": args.language, "task": "transcribe", "model": args.model_dir}
    options["use_vad"] = args.vad
    with tempfile.TemporaryDirectory(prefix="whisperlive-") as tmp:
        log = args.log or Path(tmp) / "server.log"
        command = [sys.executable, __file__, "--serve", str(port), args.model_dir]
        command += [args.compute_type, str(args.cpu_threads)]
        with log.open("wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                common.wait_up(
                    process, "whisperlive", log, lambda: _listening(port), READY_TIMEOUT_S, 0.3
                )
                _session(url, audio[:SAMPLE_RATE], options)  # warm-up: loads the model
                messages = _session(url, audio, options)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    for record in translate(messages):
        print(json.dumps(record, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
