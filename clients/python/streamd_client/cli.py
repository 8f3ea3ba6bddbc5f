"""`streamd-client`: stream a file or the microphone to a streamd daemon and print captions.

    streamd-client stream talk.flac --url ws://host:8765/v1/stream --token T
    streamd-client stream talk.flac --no-realtime --jsonl     # events as JSON lines, fast
    streamd-client mic --device 2

Ctrl-C stops sending, lets the daemon flush the last finals, and exits; a second Ctrl-C quits
at once. Exit status: 0 done, 1 error (message on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from streamd_client.audio import BYTES_PER_S, SAMPLE_RATE, paced, read_file
from streamd_client.captions import Captions
from streamd_client.errors import StreamdClientError, UnauthorizedError
from streamd_client.events import Error, Event, event_to_dict
from streamd_client.stream import DEFAULT_URL, Stream, connect

FAST_CHUNK_S = 1.0  # --no-realtime: fewer, larger frames
EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamd-client", description="Live captions from a streamd daemon."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        type=_ws_url,
        default=os.environ.get("STREAMD_URL", DEFAULT_URL),
        help="daemon endpoint (env STREAMD_URL; default %(default)s)",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("STREAMD_TOKEN"),
        help="access token (prefer env STREAMD_TOKEN: flags show up in `ps`)",
    )
    common.add_argument("--language", default=None, help="e.g. en, ja; default: detect")
    common.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    common.add_argument("--prompt", default=None, help="vocabulary: names, jargon")
    common.add_argument(
        "--level-offset-db",
        type=float,
        default=None,
        metavar="DB",
        help="input level against a close microphone at normal gain, e.g. -6 for a quiet one",
    )
    common.add_argument("--jsonl", action="store_true", help="print every event as a JSON line")
    common.add_argument(
        "--no-reconnect", action="store_true", help="fail instead of reconnecting after a drop"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stream", parents=[common], help="stream an audio file")
    s.add_argument("file", type=Path)
    pace = s.add_mutually_exclusive_group()
    pace.add_argument(
        "--no-realtime", action="store_true", help="send as fast as possible, not at speech pace"
    )
    pace.add_argument("--speed", type=float, default=1.0, help="pace multiplier (2 = twice)")
    m = sub.add_parser("mic", parents=[common], help="stream the microphone")
    m.add_argument("--device", default=None, help="input device index or name")
    m.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    return parser


def _ws_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"want ws://HOST:PORT/v1/stream, got {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "stream" and args.speed <= 0:
        build_parser().error("--speed must be positive")
    try:
        return asyncio.run(_main(args, sys.stdout))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except StreamdClientError as exc:
        hint = " (give --token or set STREAMD_TOKEN)" if isinstance(exc, UnauthorizedError) else ""
        print(f"streamd-client: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR


async def _main(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "mic":
        from streamd_client.mic import Microphone, list_devices

        if args.list_devices:
            print(list_devices(), file=out)
            return EXIT_OK
        device = int(args.device) if args.device and args.device.isdigit() else args.device
        async with Microphone(device) as mic:
            print(f"listening on {mic.name} ({mic.sample_rate} Hz)", file=sys.stderr)
            return await _run(args, out, mic, mic.sample_rate)
    if args.no_realtime:
        source = _aiter(read_file(args.file, chunk_s=FAST_CHUNK_S))
    else:
        source = paced(read_file(args.file), bytes_per_s=BYTES_PER_S, speed=args.speed)
    return await _run(args, out, source, SAMPLE_RATE)


async def _run(
    args: argparse.Namespace, out: TextIO, source: AsyncIterator[bytes], sample_rate: int
) -> int:
    stop = asyncio.Event()  # the first Ctrl-C: stop sending, keep the last finals
    show = _jsonl_printer(out) if args.jsonl else _caption_printer(out)
    async with connect(
        args.url,
        token=args.token,
        sample_rate=sample_rate,
        language=args.language,
        task=args.task,
        prompt=args.prompt,
        level_offset_db=args.level_offset_db,
        reconnect=not args.no_reconnect,
    ) as stream:
        with _first_interrupt_sets(stop):
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(_send(stream, source, stop))
                    tasks.create_task(_receive(stream, show))
            except BaseExceptionGroup as group:
                raise _first(group) from None
    return EXIT_OK


async def _send(stream: Stream, source: AsyncIterator[bytes], stop: asyncio.Event) -> None:
    async for chunk in source:
        if stop.is_set():
            break
        await stream.send(chunk)
    await stream.end()


async def _receive(stream: Stream, show: Callable[[Event | None], None]) -> None:
    async for event in stream:
        if isinstance(event, Error):
            print(f"streamd-client: warning: {event.code}: {event.message}", file=sys.stderr)
        show(event)
    show(None)


def _caption_printer(out: TextIO) -> Callable[[Event | None], None]:
    captions = Captions(out)

    def show(event: Event | None) -> None:
        if event is None:
            captions.close_line()
        else:
            captions.show(event)

    return show


def _jsonl_printer(out: TextIO) -> Callable[[Event | None], None]:
    def show(event: Event | None) -> None:
        if event is not None:
            out.write(json.dumps(event_to_dict(event), ensure_ascii=False) + "\n")
            out.flush()

    return show


@contextlib.contextmanager
def _first_interrupt_sets(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C once: set `stop`; twice: the default KeyboardInterrupt."""
    loop = asyncio.get_running_loop()

    def first() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, first)
    except (NotImplementedError, RuntimeError):  # no signal handlers here (Windows, threads)
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error that stopped the task group (the others are cancellations it caused)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _aiter(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


if __name__ == "__main__":
    sys.exit(main())
