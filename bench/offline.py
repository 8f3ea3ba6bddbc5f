"""Offline transcription: streamd vs openai-whisper `transcribe`, same converted weights.

    .venv/bin/python -m bench.offline [--repeats 3] [--json out.json]

Both run greedy (temperature 0), conditioned on previous text, language given, on every clip of
../shared/audio (English with tiny.en, Japanese with base). Wall time is measured in one run,
alternating the implementations so machine noise hits them alike:
- streamd: all clips in one `transcribe_many` call, as `streamd transcribe FILE...` does
  (windows of different files share a batch);
- streamd 1-by-1: one `transcribe` call per clip (the single-file cost);
- openai: `whisper.transcribe` per clip (it has no multi-file mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import whisper

from bench.scoring import error_rate
from streamd.audio import load_audio
from streamd.models.loader import LoadedModel, load_model
from streamd.transcribe import TranscribeOptions, Transcriber

SHARED_AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
MODEL_FOR_LANGUAGE = {"en": "tiny.en", "ja": "base"}


@dataclass(frozen=True)
class Row:
    language: str
    model: str
    clips: int
    audio_s: float
    streamd_error: float
    openai_error: float
    streamd_s: float
    streamd_one_by_one_s: float
    openai_s: float


def _openai(model: LoadedModel, audio: np.ndarray, language: str) -> str:
    result = whisper.transcribe(
        model.model, torch.from_numpy(audio), temperature=0.0, fp16=False, language=language
    )
    return str(result["text"])


def _streamd(transcriber: Transcriber, audio: np.ndarray, options: TranscribeOptions) -> str:
    return transcriber.transcribe(audio, options).text


def _timed(fn: Callable[..., str], *args: object) -> tuple[str, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run(repeats: int) -> list[Row]:
    manifest = json.loads((SHARED_AUDIO / "manifest.json").read_text())
    rows = []
    for language, model_name in MODEL_FOR_LANGUAGE.items():
        clips = [c for c in manifest if c["language"] == language]
        model = load_model(model_name)
        transcriber = Transcriber(model)
        options = TranscribeOptions(language=language)
        audios = [load_audio(SHARED_AUDIO / c["file"]) for c in clips]
        transcriber.transcribe(audios[0], options)  # warm-up, both sides share the weights
        _openai(model, audios[0], language)
        many_t: list[float] = []
        ours_t: list[float] = []
        theirs_t: list[float] = []
        ours_txt: list[str] = []
        theirs_txt: list[str] = []
        for _ in range(repeats):
            start = time.perf_counter()
            many_txt = [t.text for t in transcriber.transcribe_many(audios, options)]
            many_t.append(time.perf_counter() - start)
            ours_total = theirs_total = 0.0
            ours_txt, theirs_txt = [], []
            for audio in audios:
                t, dt = _timed(_streamd, transcriber, audio, options)
                ours_txt.append(t)
                ours_total += dt
                t, dt = _timed(_openai, model, audio, language)
                theirs_txt.append(t)
                theirs_total += dt
            ours_t.append(ours_total)
            theirs_t.append(theirs_total)
        if many_txt != ours_txt:
            raise SystemExit(f"batched and one-by-one transcripts differ: {many_txt} {ours_txt}")
        refs = [c["reference"] for c in clips]
        rows.append(
            Row(
                language=language,
                model=model_name,
                clips=len(clips),
                audio_s=round(sum(len(a) for a in audios) / 16000, 2),
                streamd_error=round(error_rate(refs, ours_txt, language), 4),
                openai_error=round(error_rate(refs, theirs_txt, language), 4),
                streamd_s=round(statistics.median(many_t), 2),
                streamd_one_by_one_s=round(statistics.median(ours_t), 2),
                openai_s=round(statistics.median(theirs_t), 2),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = run(args.repeats)
    print(
        "| language | model | clips | audio s | streamd WER/CER | openai WER/CER "
        "| streamd s | streamd 1-by-1 s | openai s | speed-up | 1-by-1 speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.language} | {r.model} | {r.clips} | {r.audio_s} | {r.streamd_error:.4f} "
            f"| {r.openai_error:.4f} | {r.streamd_s} | {r.streamd_one_by_one_s} | {r.openai_s} "
            f"| {r.openai_s / r.streamd_s:.2f}x | {r.openai_s / r.streamd_one_by_one_s:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
