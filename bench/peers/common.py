"""What the peer runner scripts share (imported as `common`: they run as scripts from this
folder under .peers-venv/bin/python, so this folder is first on sys.path)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_common_args(parser: argparse.ArgumentParser, compute_help: str) -> None:
    """The audio and model flags every runner takes."""
    parser.add_argument("audio", type=Path, help="16 kHz mono wav")
    parser.add_argument("--model-dir", required=True, help="faster-whisper (CTranslate2) dir")
    parser.add_argument("--language", default="en")
    parser.add_argument("--compute-type", default="float32", help=compute_help)
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=os.cpu_count() or 0,
        help="CTranslate2 threads; default: the cores (as torch for streamd); 0: its own 4",
    )


def force_cpu_model(module: Any, compute_type: str, cpu_threads: int) -> None:
    """Replace `module.WhisperModel` (faster-whisper's, as the peer imported it) by one that
    always loads on the CPU with our compute type and threads, from local files only: the same
    inference for every system, and no hub download."""
    base = module.WhisperModel

    class CpuWhisperModel(base):  # type: ignore[misc, valid-type]
        def __init__(self, model_size_or_path: str, **kwargs: Any) -> None:
            kwargs.update(device="cpu", compute_type=compute_type, local_files_only=True)
            kwargs["cpu_threads"] = cpu_threads
            print(
                f"peers shim: WhisperModel({model_size_or_path!r}, device=cpu, "
                f"compute_type={compute_type}, cpu_threads={cpu_threads})",
                file=sys.stderr,
            )
            super().__init__(model_size_or_path, **kwargs)

    module.WhisperModel = CpuWhisperModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(
    process: subprocess.Popen[bytes],
    name: str,
    log: Path,
    probe: Callable[[], bool],
    timeout_s: float,
    poll_s: float,
) -> None:
    """Until `probe()` says the peer server is up (an OSError counts as not yet); a clear
    RuntimeError with its log's tail if it exits first or never comes up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{name} server exited ({process.returncode}):\n{tail}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{name} server not up after {timeout_s:.0f}s; see {log}")
