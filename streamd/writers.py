"""Render a `Transcript` as plain text, SRT, WebVTT or JSON, and write `<stem>.<ext>` files."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streamd.decoding.result import Segment, Transcript
from streamd.errors import ConfigError

FORMATS = ("txt", "srt", "vtt", "json", "all")

_ARROW = re.compile(r"-{2,}>")  # the SRT/VTT timing separator, however many dashes


def to_txt(transcript: Transcript) -> str:
    """Each non-empty segment's text, stripped, on its own line; empty string for no speech."""
    texts = (_clean(seg.text) for seg in transcript.segments)
    return "".join(f"{text}\n" for text in texts if text)


def to_srt(transcript: Transcript) -> str:
    """SubRip: 1-based cue numbers, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each cue."""
    return "".join(
        f"{index}\n{_timestamp(seg.start, ',')} --> {_timestamp(seg.end, ',')}\n{text}\n\n"
        for index, (seg, text) in enumerate(_cues(transcript), start=1)
    )


def to_vtt(transcript: Transcript) -> str:
    """WebVTT: a `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    cues = "".join(
        f"{_timestamp(seg.start, '.')} --> {_timestamp(seg.end, '.')}\n{text}\n\n"
        for seg, text in _cues(transcript)
    )
    return f"WEBVTT\n\n{cues}"


def to_json(transcript: Transcript) -> str:
    """Everything in the transcript, word timings included, as indented JSON; non-ASCII kept."""
    doc: dict[str, Any] = {
        "text": transcript.text,
        "language": transcript.language,
        "duration_s": transcript.duration_s,
        "segments": [_segment_dict(seg) for seg in transcript.segments],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


_RENDERERS: dict[str, Callable[[Transcript], str]] = {
    "txt": to_txt,
    "srt": to_srt,
    "vtt": to_vtt,
    "json": to_json,
}


def write_transcript(
    transcript: Transcript, fmt: str, output_dir: str | Path, source_path: str | Path
) -> Path:
    """Write `<stem of source_path>.<ext>` into `output_dir` (created if missing), UTF-8.

    Returns the file written; for `fmt="all"` every format is written and the `.json` path (the
    lossless one) is returned. Raises `ConfigError` for a format not in `FORMATS`, before writing.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(source_path).stem
    exts = tuple(_RENDERERS) if fmt == "all" else (fmt,)
    for ext in exts:
        # newline="" so the file holds exactly the "\n" the formats specify, on every platform.
        with (output_dir / f"{stem}.{ext}").open("w", encoding="utf-8", newline="") as out:
            out.write(_RENDERERS[ext](transcript))
    return output_dir / f"{stem}.{exts[-1]}"


def _cues(transcript: Transcript) -> Iterator[tuple[Segment, str]]:
    """Non-empty segments with text safe for a cue: stripped, no blank lines, no stray `-->`."""
    for seg in transcript.segments:
        # `-->` marks a timing line, so it may not appear in cue text.
        text = _clean(_ARROW.sub("->", seg.text))
        if text:
            yield seg, text


def _clean(text: str) -> str:
    """`text` stripped, without blank lines (a blank line would end an SRT/VTT cue early)."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _timestamp(seconds: float, decimal_marker: str) -> str:
    """`HH:MM:SS<marker>mmm`, rounded to the millisecond (1.9996 -> 00:00:02.000); hours grow."""
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _segment_dict(seg: Segment) -> dict[str, Any]:
    return {
        "id": seg.id,
        "start": seg.start,
        "end": seg.end,
        "text": seg.text,
        "tokens": list(seg.tokens),
        "avg_logprob": seg.avg_logprob,
        "no_speech_prob": seg.no_speech_prob,
        "compression_ratio": seg.compression_ratio,
        "words": [
            {"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
            for w in seg.words
        ],
    }
