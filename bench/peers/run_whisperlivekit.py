"""QuentinFuxa/WhisperLiveKit's server, offline, driven over its websocket; JSON lines out.

Runs INSIDE .peers-venv (bench/peers/setup.sh), never the project's .venv:

    .peers-venv/bin/python bench/peers/run_whisperlivekit.py AUDIO.wav --model-dir DIR \
        [--language en] [--compute-type float32] [--no-vac] [-- EXTRA SERVER ARGS]

Starts `whisperlivekit.basic_server` (the `whisperlivekit-server` program) on a free loopback
port with `--backend faster-whisper --backend-policy localagreement --model_dir DIR
--pcm-input` (LocalAgreement-2 over faster-whisper on the given CTranslate2 weights; its other
settings at their defaults: Silero VAC on, min chunk 0.1 s, segment trimming at 15 s), streams
the wav to `ws://HOST:PORT/asr` as s16le at real-time pace in 20 ms frames, then an empty
frame (its end-of-stream signal), and reads its messages until `ready_to_stop`.

One shim, as in run_whisper_streaming.py: its faster-whisper backend creates
`WhisperModel(..., device="auto", compute_type="auto")`; the server runs in a child process in
which `faster_whisper.WhisperModel` forces `device="cpu"`, `--compute-type` (default float32,
our engine's numerics; "auto" gives WhisperLiveKit's own choice) and `--cpu-threads`. Its
warm-up (by default a download of jfk.wav) is given the first second of AUDIO instead.

Its messages carry the whole transcript each time: `lines` (committed text, each line with
start/end as H:MM:SS.cc) and `buffer_transcription` (the tentative tail, no times). Output, one
JSON object per line on stdout:
- committed: `{"emitted_at", "start", "end", "text", "final": true}` for each growth of the
  committed text; `end` is the end of the last line (= its last committed word), `start` the
  end of the text committed before (or the start of the line the new text opens);
- tentative: `{"emitted_at", "start", "end", "text", "final": false}` when the buffer text
  changes; it has no times of its own, so `start` is the committed end and `end` the audio
  sent so far (an upper bound).
`emitted_at` is seconds since the first audio frame was sent (audio time 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import common
import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
FRAME_S = 0.02
READY_TIMEOUT_S = 300.0
SILENCE_SPEAKER = -2  # WhisperLiveKit's marker for a silence line


def _serve(compute_type: str, cpu_threads: int, server_args: list[str]) -> None:
    """Child process: the stock server, with WhisperModel forced onto the CPU."""
    import faster_whisper

    common.force_cpu_model(faster_whisper, compute_type, cpu_threads)
    sys.argv = ["whisperlivekit-server", *server_args]
    runpy.run_module("whisperlivekit.basic_server", run_name="__main__", alter_sys=True)


def _clock(text: str) -> float:
    """H:MM:SS.cc -> seconds."""
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def translate(messages: list[tuple[dict[str, Any], float]], audio_s: float) -> list[dict[str, Any]]:
    """Its full-state messages (with arrival times) -> committed and tentative segments."""
    out: list[dict[str, Any]] = []
    committed, committed_end, buffer = "", 0.0, ""
    for message, at in messages:
        if "lines" not in message:
            continue
        lines = [
            (line["text"], _clock(line["start"]), _clock(line["end"]))
            for line in message["lines"]
            if line.get("text") and line.get("speaker") != SILENCE_SPEAKER
        ]
        full = "".join(text for text, _, _ in lines)
        same = 0
        while same < min(len(full), len(committed)) and full[same] == committed[same]:
            same += 1
        if same < len(committed):
            print(f"warning: committed text changed at {at:.2f}s: {committed[same:]!r} -> "
                  f"{full[same:]!r}", file=sys.stderr)  # fmt: skip
        if len(full) > same:
            offset, start = 0, lines[-1][1]
            for text, line_start, _ in lines:
                if offset <= same < offset + len(text):
                    start = line_start if same == offset else max(line_start, committed_end)
                    break
                offset += len(text)
            committed_end = lines[-1][2]
            record = {"emitted_at": at, "start": start, "end": committed_end}
            out.append({**record, "text": full[same:], "final": True})
        committed = full
        tentative = message.get("buffer_transcription") or ""
        if tentative.strip() and tentative != buffer:
            record = {"emitted_at": at, "start": committed_end, "end": min(at, audio_s)}
            out.append({**record, "text": tentative, "final": False})
        buffer = tentative
    return out


async def _stream(url: str, audio: np.ndarray) -> list[tuple[dict[str, Any], float]]:
    from websockets.asyncio.client import connect

    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    frame = int(SAMPLE_RATE * FRAME_S) * 2
    received: list[tuple[dict[str, Any], float]] = []
    async with connect(url, max_size=None) as ws:
        first = json.loads(await ws.recv())  # {"type": "config", ...}
        if first.get("type") != "config":
            raise RuntimeError(f"unexpected first message: {first}")
        start = time.perf_counter()

        async def send() -> None:
            for i, offset in enumerate(range(0, len(pcm), frame)):
                await asyncio.sleep(max(0.0, (i + 1) * FRAME_S - (time.perf_counter() - start)))
                await ws.send(pcm[offset : offset + frame])
            await ws.send(b"")  # its end-of-stream signal

        sender = asyncio.create_task(send())
        async for raw in ws:
            message = json.loads(raw)
            received.append((message, round(time.perf_counter() - start, 4)))
            if message.get("type") == "ready_to_stop":
                break
        await sender
    return received


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        compute_type, cpu_threads, *server_args = sys.argv[2:]
        _serve(compute_type, int(cpu_threads), server_args)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, "CTranslate2; 'auto' = theirs")
    parser.add_argument(
        "--vac",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="its Silero voice activity controller (its default: on)",
    )
    parser.add_argument("--log", type=Path, default=None, help="server log (default: temp)")
    parser.add_argument("server_args", nargs="*", help="more whisperlivekit-server flags")
    args = parser.parse_args()

    audio, rate = sf.read(args.audio, dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE or audio.ndim != 1:
        sys.exit(f"{args.audio}: need 16 kHz mono, got {rate} Hz, shape {audio.shape}")
    port = common.free_port()
    with tempfile.TemporaryDirectory(prefix="wlk-") as tmp:
        warmup = Path(tmp) / "warmup.wav"
        sf.write(warmup, audio[:SAMPLE_RATE], SAMPLE_RATE)
        log = args.log or Path(tmp) / "server.log"
        server_args = [
            "--host", "127.0.0.1", "--port", str(port),
            "--backend", "faster-whisper", "--backend-policy", "localagreement",
            "--model_dir", args.model_dir, "--lan", args.language, "--pcm-input",
            "--warmup-file", str(warmup), "--log-level", "INFO",
            *([] if args.vac else ["--no-vac"]), *args.server_args,
        ]  # fmt: skip
        command = [sys.executable, __file__, "--serve", args.compute_type, str(args.cpu_threads)]
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [*command, *server_args], stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )  # fmt: skip
            try:
                health = f"http://127.0.0.1:{port}/health"
                common.wait_up(
                    process, "whisperlivekit", log, lambda: _healthy(health), READY_TIMEOUT_S, 0.5
                )
                url = f"ws://127.0.0.1:{port}/asr?language={args.language}"
                messages = asyncio.run(_stream(url, audio))
            finally:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    for record in translate(messages, len(audio) / SAMPLE_RATE):
        print(json.dumps(record, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
