"""Command-line flags for the streaming policy, shared by `streamd replay` and `streamd mic`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: building the parser stays light
    from streamd.streaming.config import SessionConfig


def add_session_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-ms", type=int, default=None, help="decode every N ms of new speech")
    p.add_argument(
        "--level-offset-db",
        type=float,
        default=0.0,
        metavar="DB",
        help="input level against a close microphone at normal gain, e.g. -6 for a quiet one "
        "(shifts the VAD's level thresholds; docs/vad.md)",
    )


def session_config(args: argparse.Namespace) -> SessionConfig:
    """The SessionConfig the flags ask for (defaults otherwise); a bad value raises
    ConfigError."""
    from streamd.streaming.config import SessionConfig
    from streamd.vad import VadConfig

    vad = VadConfig(level_offset_db=args.level_offset_db)
    if args.step_ms is None:
        return SessionConfig(vad=vad)
    return SessionConfig(vad=vad, step_ms=args.step_ms)


def level_given(args: argparse.Namespace) -> bool:
    """The user gave the input's level (`--level-offset-db`): no advice about it is due."""
    return bool(args.level_offset_db != 0.0)
