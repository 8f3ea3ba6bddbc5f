"""`streamd mic`: live captions (or protocol v1 JSONL) from a microphone, transcribed locally."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from streamd.session_flags import add_session_flags, level_given, session_config

if TYPE_CHECKING:
    from streamd.mic import AudioSource, CaptureStats, InputDevice
    from streamd.models.loader import LoadedModel
    from streamd.streaming.replay import Emitted, LiveDecodeFn
    from streamd.streaming.session import Session


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_model_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    # `--device` is the audio input here, as in other capture tools; "resolve" lets it replace
    # the model flags' torch `--device`, which becomes `--torch-device` (same dest for loading).
    m = sub.add_parser(
        "mic",
        help="live captions from a microphone",
        description="Live captions from a microphone; Ctrl-C stops and prints the last words.",
        conflict_handler="resolve",
    )
    add_model_flags(m)
    m.add_argument(
        "--device",
        dest="input_device",
        default=None,
        metavar="DEVICE",
        help="audio input: index or part of the name from --list-devices (default: the default)",
    )
    m.add_argument(
        "--torch-device", dest="device", default="cpu", metavar="NAME", help="cpu or cuda"
    )
    m.add_argument("--list-devices", action="store_true", help="list audio inputs and exit")
    m.add_argument("--jsonl", action="store_true", help="one protocol v1 event per line")
    m.add_argument("--prompt", default=None, help="vocabulary prompt for this stream")
    add_session_flags(m)


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], LoadedModel]) -> int:
    """List devices, or capture from the chosen one until Ctrl-C; `load` gives the model."""
    from streamd import mic
    from streamd.captions import EventPrinter
    from streamd.streaming.session import Session
    from streamd.streaming.window_decoder import WindowDecoder

    if args.list_devices:
        _print_devices(mic.list_input_devices())
        return 0
    # flags and the device are checked before the model loads: a mistake fails in an instant
    config = session_config(args)
    source = mic.open_input(args.input_device, on_drop=_warn_dropped)
    model = load(args)
    vocabulary: tuple[int, ...] = ()
    if args.prompt:
        vocabulary = tuple(model.tokenizer(args.language).encode(" " + args.prompt.strip()))
    session = Session(config, language=args.language, vocabulary=vocabulary)
    from streamd.cli import encoder_precision

    decoder = WindowDecoder(model, encoder_precision=encoder_precision(args))
    decoder.warm_up()  # before the first words, not during them
    on_event = EventPrinter(sys.stdout, args.jsonl, warn=sys.stderr, level_told=level_given(args))

    resampled = "" if source.rate_hz == 16000 else f", resampled from {source.rate_hz} Hz"
    print(
        f"streamd: listening on {source.device.label}{resampled}; Ctrl-C to stop",
        file=sys.stderr,
    )
    try:
        asyncio.run(_capture(source, session, decoder.decode, on_event))
    finally:
        on_event.close()
        _report(source.stats)
    return 0


async def _capture(
    source: AudioSource, session: Session, decode: LiveDecodeFn, on_event: Callable[[Emitted], None]
) -> None:
    """`run_live` until the source ends or Ctrl-C; a second Ctrl-C quits without the flush."""
    from streamd.streaming.replay import run_live

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def interrupted() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstreamd: stopping; Ctrl-C again to quit at once", file=sys.stderr)

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
    except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
        handled = False
    else:
        handled = True
    try:
        await run_live(source, session, decode, on_event, stop)
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)


def _print_devices(devices: list[InputDevice]) -> None:
    if not devices:
        print("no audio input devices found (PortAudio sees none)")
        return
    for d in devices:
        mark = "*" if d.is_default else " "
        print(
            f"{mark}{d.index:>3}  {d.name}  [{d.hostapi}, {d.max_channels} ch, "
            f"{d.default_rate_hz} Hz]"
        )
    print("(* default input; choose one with --device INDEX or part of its name)")


def _warn_dropped(stats: CaptureStats) -> None:
    print(
        f"streamd: warning: audio dropped, transcription fell behind the microphone "
        f"({stats.dropped_s:.1f} s so far; silence stands in for it)",
        file=sys.stderr,
    )


def _report(stats: CaptureStats) -> None:
    if stats.dropped_s:
        print(f"streamd: {stats.dropped_s:.1f} s of audio were dropped", file=sys.stderr)
    if stats.input_overflows:
        print(
            f"streamd: the audio device overflowed {stats.input_overflows} times (input lost)",
            file=sys.stderr,
        )
