"""`streamd replay FILE`: a recording through the live pipeline, as captions or JSONL."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from streamd.errors import ConfigError
from streamd.session_flags import add_session_flags, level_given, session_config

if TYPE_CHECKING:
    from streamd.models.loader import LoadedModel


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_model_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    r = sub.add_parser("replay", help="stream a file through the live pipeline")
    r.add_argument("file", type=Path)
    add_model_flags(r)
    r.add_argument("--realtime", action="store_true", help="feed at wall-clock pace")
    r.add_argument("--jsonl", action="store_true", help="one protocol v1 event per line")
    r.add_argument("--prompt", default=None, help="vocabulary prompt for this stream")
    add_session_flags(r)
    r.add_argument(
        "--encoder-buckets",
        default="30",
        help="encoder context buckets in seconds, e.g. 10,20,30 (faster, see docs/benchmarks.md)",
    )
    r.add_argument(
        "--format", choices=("srt", "vtt"), default=None, help="also write finals as subtitles"
    )
    r.add_argument("--output-dir", type=Path, default=None)


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], LoadedModel]) -> int:
    """Replay `args.file`; `load` gives the model for the model flags."""
    from streamd.audio import load_audio
    from streamd.captions import EventPrinter
    from streamd.decoding.result import Segment, Transcript
    from streamd.streaming.events import Final
    from streamd.streaming.replay import Emitted, replay_realtime, replay_virtual
    from streamd.streaming.session import Session
    from streamd.streaming.window_decoder import WindowDecoder
    from streamd.writers import write_transcript

    if args.format and args.output_dir is None:
        raise ConfigError("--format needs --output-dir")
    config = session_config(args)  # a bad flag fails before the model loads
    audio = load_audio(args.file)
    model = load(args)
    try:
        buckets = tuple(int(b) for b in args.encoder_buckets.split(","))
    except ValueError as exc:
        raise ConfigError(
            f"--encoder-buckets: {args.encoder_buckets!r} is not a list of seconds"
        ) from exc
    from streamd.cli import encoder_precision

    decoder = WindowDecoder(model, buckets_s=buckets, encoder_precision=encoder_precision(args))
    vocabulary: tuple[int, ...] = ()
    if args.prompt:
        vocabulary = tuple(model.tokenizer(args.language).encode(" " + args.prompt.strip()))
    session = Session(config, language=args.language, vocabulary=vocabulary)
    printer = EventPrinter(sys.stdout, args.jsonl, warn=sys.stderr, level_told=level_given(args))
    finals: list[Final] = []

    def on_event(item: Emitted) -> None:
        if isinstance(item.event, Final):
            finals.append(item.event)
        printer(item)

    if args.realtime:
        # computation-aware: the first decode's lazy initialisation is not the talker's wait
        decoder.warm_up()
        asyncio.run(replay_realtime(session, audio, decoder.decode, on_event=on_event))
    else:
        for item in replay_virtual(session, audio, decoder.decode):
            on_event(item)
    printer.close()
    if args.format:
        segments = tuple(
            Segment(
                f.segment, f.start, f.end, f.text, (), f.avg_logprob, f.no_speech_prob, 0.0, f.words
            )
            for f in finals
        )
        text = "".join(f.text for f in finals).strip()
        transcript = Transcript(text, segments, session.language or "en", len(audio) / 16000)
        written = write_transcript(transcript, args.format, args.output_dir, args.file)
        print(f"streamd: wrote {written}", file=sys.stderr)
    return 0
