"""`streamd` command line: transcribe, replay, serve, mic, bench, models."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from streamd.engine.precision import ENCODER_PRECISIONS
from streamd.errors import ClientError, ConfigError, StreamdError

if TYPE_CHECKING:
    import numpy as np

    from streamd.decoding.result import Transcript
    from streamd.models.loader import LoadedModel

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from streamd.models.registry import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, imported name or path")
    p.add_argument("--language", default=None, help="ISO code (en, ja, ...); default: detect")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument(
        "--encoder-precision",
        choices=ENCODER_PRECISIONS,
        default="auto",
        help="encoder arithmetic; auto: bf16 where the CPU has it natively, else fp32",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files offline")
    t.add_argument("files", nargs="+", type=Path)
    _add_model_flags(t)
    t.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    t.add_argument("--prompt", default=None, help="vocabulary / context to prime the decoder")
    t.add_argument(
        "--format",
        default=None,
        choices=("txt", "srt", "vtt", "json", "all"),
        help="write this format (default: print plain text to stdout)",
    )
    t.add_argument("--output-dir", type=Path, default=None, help="write files here")
    t.add_argument("--word-timestamps", action="store_true", help="word times in json output")
    t.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    from streamd import replay_cli

    replay_cli.add_parser(sub, _add_model_flags)

    from streamd import bench_cli, mic_cli
    from streamd.server import cli as serve_cli

    serve_cli.add_parser(sub)
    mic_cli.add_parser(sub, _add_model_flags)
    bench_cli.add_parser(sub)

    m = sub.add_parser("models", help="list and manage models")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="built-in and imported models and where they come from")
    mp = msub.add_parser("path", help="convert if needed and print the cached checkpoint path")
    mp.add_argument("name")
    mi = msub.add_parser("import", help="convert a CTranslate2 dir, .pt or HF dir into the cache")
    mi.add_argument("src")
    mi.add_argument("--name", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "transcribe":
            return _transcribe(args)
        if args.command == "replay":
            from streamd import replay_cli

            return replay_cli.run(args, _load)
        if args.command == "serve":
            from streamd.server import cli as serve_cli

            return serve_cli.run(args)
        if args.command == "mic":
            from streamd import mic_cli

            return mic_cli.run(args, _load)
        if args.command == "bench":
            from streamd import bench_cli

            return bench_cli.run(args)
        return _models(args)
    except StreamdError as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _models(args: argparse.Namespace) -> int:
    from streamd.models import registry

    match args.models_command:
        case "list":
            for name, builtin in registry.BUILTIN_MODELS.items():
                print(f"{name:<10} built-in  {builtin.description}")
            for name, path in registry.imported_models().items():
                print(f"{name:<10} imported  {path}")
            print(f"cache: {registry.cache_dir()}")
        case "path":
            print(registry.cached_checkpoint_path(args.name))
        case "import":
            print(registry.import_model(args.src, args.name))
    return EXIT_OK


def _load(args: argparse.Namespace) -> LoadedModel:
    import torch

    from streamd.models.loader import load_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device)


def encoder_precision(args: argparse.Namespace) -> str:
    """fp32 or bf16, from the model flags (`--encoder-precision`, `--device`)."""
    from streamd.engine.precision import resolve_encoder_precision

    return resolve_encoder_precision(args.encoder_precision, args.device)


def _transcribe(args: argparse.Namespace) -> int:
    from streamd.audio import load_audio
    from streamd.transcribe import TranscribeOptions, Transcriber

    if args.format == "all" and args.output_dir is None:
        raise ConfigError("--format all needs --output-dir")
    model = _load(args)
    transcriber = Transcriber(model, encoder_precision=encoder_precision(args))
    options = TranscribeOptions(
        language=args.language,
        task=args.task,
        prompt=args.prompt,
        word_timestamps=args.word_timestamps or args.format in ("json", "all"),
    )
    loaded: list[Path] = []
    failures = 0

    def audios() -> Iterator[np.ndarray]:
        nonlocal failures
        for path in args.files:
            try:
                audio = load_audio(path)
            except ClientError as exc:  # report, and go on with the other files
                print(f"streamd: error: {exc}", file=sys.stderr)
                failures += 1
                continue
            loaded.append(path)
            yield audio

    label = args.files[0].name if len(args.files) == 1 else f"{len(args.files)} files"
    with _progress(label, enabled=not args.no_progress) as report:
        # windows of different files are decoded as one batch; results come in input order
        for index, transcript in enumerate(transcriber.transcribe_many(audios(), options, report)):
            _emit(transcript, loaded[index], args)
    return EXIT_ERROR if failures else EXIT_OK


def _emit(transcript: Transcript, path: Path, args: argparse.Namespace) -> None:
    from streamd.writers import to_json, to_srt, to_txt, to_vtt, write_transcript

    if args.output_dir is not None:
        try:
            written = write_transcript(transcript, args.format or "txt", args.output_dir, path)
        except OSError as exc:
            raise ConfigError(f"cannot write to {args.output_dir}: {exc.strerror or exc}") from exc
        print(f"streamd: wrote {written}", file=sys.stderr)
        return
    render = {"srt": to_srt, "vtt": to_vtt, "json": to_json}.get(args.format or "txt", to_txt)
    out = render(transcript)
    if not out.endswith("\n") and out:
        out += "\n"
    sys.stdout.write(out if args.format else transcript.text + "\n")
    sys.stdout.flush()


class _progress:
    """A tqdm bar on stderr when it is a terminal; a no-op callback otherwise."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="s", desc=label, leave=False, file=sys.stderr)

    def __enter__(self) -> Callable[[int, int], None]:
        return self.report

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def report(self, done_frames: int, total_frames: int) -> None:
        if self.bar is not None:
            self.bar.total = round(total_frames / 100, 1)
            self.bar.n = round(done_frames / 100, 1)
            self.bar.refresh()
