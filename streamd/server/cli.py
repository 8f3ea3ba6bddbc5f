"""`streamd serve`: flags -> Config (over STREAMD_* and the TOML file) -> Daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from streamd.engine.precision import ENCODER_PRECISIONS
from streamd.errors import ConfigError

# flag -> dotted setting; these are the common ones, `--set name=value` reaches the rest
_FLAGS = {
    "host": "host",
    "port": "port",
    "model": "model",
    "token": "token",
    "engine": "engine",
    "device": "device",
    "threads": "threads",
    "language": "language",
    "max_sessions": "max_sessions",
    "journal_dir": "journal_dir",
    "encoder_buckets": "encoder_buckets_s",
    "encoder_precision": "encoder_precision",
    "step_ms": "session.step_ms",
    "vad_aggressiveness": "vad.aggressiveness",
    "mqtt_url": "mqtt.url",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the websocket daemon",
        description="Settings: TOML file < STREAMD_* environment < these flags.",
    )
    p.add_argument("--config", type=Path, default=None, help="TOML file (or $STREAMD_CONFIG)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8765; 0: any free)")
    p.add_argument("--model", default=None, help="model name or path (default tiny.en)")
    p.add_argument("--token", default=None, help="clients must present this token")
    p.add_argument("--engine", default=None, choices=("torch", "neuron"))
    p.add_argument("--device", default=None, help="torch device: cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--language", default=None, help="default language of sessions (else detect)")
    p.add_argument("--max-sessions", type=int, default=None)
    p.add_argument("--journal-dir", type=Path, default=None, help="where finals are journaled")
    p.add_argument("--encoder-buckets", default=None, help="encoder context buckets, s: 10,20,30")
    p.add_argument(
        "--encoder-precision",
        default=None,
        choices=ENCODER_PRECISIONS,
        help="encoder arithmetic (default auto: bf16 where the CPU has it natively)",
    )
    p.add_argument("--step-ms", type=int, default=None, help="decode every N ms of new speech")
    p.add_argument("--vad-aggressiveness", type=int, default=None, choices=(0, 1, 2, 3))
    p.add_argument("--mqtt-url", default=None, help="publish finals to mqtt://host[:port]")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any setting by its dotted name, e.g. session.unstable_tail_ms=400",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {item!r}: expected NAME=VALUE")
        out[name.strip()] = value
    for flag, name in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            out[name] = value
    return out


def run(args: argparse.Namespace) -> int:
    from streamd.server.app import Daemon
    from streamd.server.config import load_config

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    path = args.config or (
        Path(os.environ["STREAMD_CONFIG"]) if "STREAMD_CONFIG" in os.environ else None
    )
    config = load_config(path, overrides=overrides(args))
    return asyncio.run(Daemon(config).run())
