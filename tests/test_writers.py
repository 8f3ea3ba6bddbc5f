"""Transcript writers: exact txt/srt/vtt/json output, JSON round trip, files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamd.decoding.result import Segment, Transcript, Word
from streamd.errors import ConfigError
from streamd.writers import FORMATS, to_json, to_srt, to_txt, to_vtt, write_transcript


def _segment(id: int, start: float, end: float, text: str, words: tuple[Word, ...] = ()) -> Segment:
    return Segment(
        id=id,
        start=start,
        end=end,
        text=text,
        tokens=(50364 + id, 400, 370),
        avg_logprob=-0.25,
        no_speech_prob=0.01,
        compression_ratio=1.5,
        words=words,
    )


TRANSCRIPT = Transcript(
    text=" And so my fellow Americans, 日本語ちゃんと聞き取れてますか he said --> go",
    segments=(
        _segment(
            0,
            0.0,
            1.9996,  # rounds up to 2.000, carrying into the seconds
            " And so my fellow Americans,",
            words=(Word(" And", 0.0, 0.3, 0.9), Word(" so", 0.3, 0.5, 0.875)),
        ),
        _segment(1, 2.0, 4.5, "   "),  # empty after stripping: no cue, no line, no number
        _segment(2, 4.5, 7.25, " 日本語ちゃんと聞き取れてますか"),
        _segment(3, 3725.0004, 3727.5, " he said --> go\n\nand ---> left"),
    ),
    language="en",
    duration_s=3730.0,
)


def test_txt_is_one_stripped_line_per_non_empty_segment() -> None:
    assert to_txt(TRANSCRIPT) == (
        "And so my fellow Americans,\n"
        "日本語ちゃんと聞き取れてますか\n"
        "he said --> go\nand ---> left\n"  # blank lines dropped, arrows harmless here
    )


def test_srt_exact() -> None:
    assert to_srt(TRANSCRIPT) == (
        "1\n"
        "00:00:00,000 --> 00:00:02,000\n"
        "And so my fellow Americans,\n"
        "\n"
        "2\n"
        "00:00:04,500 --> 00:00:07,250\n"
        "日本語ちゃんと聞き取れてますか\n"
        "\n"
        "3\n"
        "01:02:05,000 --> 01:02:07,500\n"
        "he said -> go\n"
        "and -> left\n"
        "\n"
    )


def test_vtt_exact() -> None:
    assert to_vtt(TRANSCRIPT) == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.000\n"
        "And so my fellow Americans,\n"
        "\n"
        "00:00:04.500 --> 00:00:07.250\n"
        "日本語ちゃんと聞き取れてますか\n"
        "\n"
        "01:02:05.000 --> 01:02:07.500\n"
        "he said -> go\n"
        "and -> left\n"
        "\n"
    )


def test_cue_text_never_contains_a_timing_arrow() -> None:
    for rendered in (to_srt(TRANSCRIPT), to_vtt(TRANSCRIPT)):
        arrows = [line for line in rendered.splitlines() if "-->" in line]
        assert len(arrows) == 3
        assert all(line.count(" --> ") == 1 and line[0].isdigit() for line in arrows)


@pytest.mark.parametrize(
    ("seconds", "srt"),
    [
        (0.0, "00:00:00,000"),
        (0.0004, "00:00:00,000"),
        (1.9996, "00:00:02,000"),
        (59.9999, "00:01:00,000"),
        (3599.9996, "01:00:00,000"),
        (36_000.0, "10:00:00,000"),
        (-0.01, "00:00:00,000"),  # a slightly early first timestamp must not print as negative
    ],
)
def test_timestamp_rounding(seconds: float, srt: str) -> None:
    transcript = Transcript("x", (_segment(0, seconds, seconds, "x"),), "en", 1.0)
    assert to_srt(transcript).splitlines()[1] == f"{srt} --> {srt}"
    assert (
        to_vtt(transcript).splitlines()[2] == f"{srt.replace(',', '.')} --> {srt.replace(',', '.')}"
    )


def test_empty_transcript() -> None:
    empty = Transcript("", (), "en", 0.0)
    assert to_txt(empty) == ""
    assert to_srt(empty) == ""
    assert to_vtt(empty) == "WEBVTT\n\n"
    assert json.loads(to_json(empty)) == {
        "text": "",
        "language": "en",
        "duration_s": 0.0,
        "segments": [],
    }


def test_json_exact_and_keeps_japanese_readable() -> None:
    transcript = Transcript(
        text="日本語",
        segments=(_segment(0, 0.5, 1.25, "日本語", words=(Word("日本語", 0.5, 1.25, 0.5),)),),
        language="ja",
        duration_s=2.0,
    )
    assert to_json(transcript) == (
        "{\n"
        '  "text": "日本語",\n'
        '  "language": "ja",\n'
        '  "duration_s": 2.0,\n'
        '  "segments": [\n'
        "    {\n"
        '      "id": 0,\n'
        '      "start": 0.5,\n'
        '      "end": 1.25,\n'
        '      "text": "日本語",\n'
        '      "tokens": [\n'
        "        50364,\n"
        "        400,\n"
        "        370\n"
        "      ],\n"
        '      "avg_logprob": -0.25,\n'
        '      "no_speech_prob": 0.01,\n'
        '      "compression_ratio": 1.5,\n'
        '      "words": [\n'
        "        {\n"
        '          "word": "日本語",\n'
        '          "start": 0.5,\n'
        '          "end": 1.25,\n'
        '          "probability": 0.5\n'
        "        }\n"
        "      ]\n"
        "    }\n"
        "  ]\n"
        "}\n"
    )


def test_json_round_trips_every_field() -> None:
    doc = json.loads(to_json(TRANSCRIPT))
    rebuilt = Transcript(
        text=doc["text"],
        language=doc["language"],
        duration_s=doc["duration_s"],
        segments=tuple(
            Segment(
                **{key: value for key, value in seg.items() if key not in ("tokens", "words")},
                tokens=tuple(seg["tokens"]),
                words=tuple(Word(**word) for word in seg["words"]),
            )
            for seg in doc["segments"]
        ),
    )
    # Unlike the subtitle formats, JSON keeps everything: empty segments and raw text included.
    assert rebuilt == TRANSCRIPT


def test_write_one_format(tmp_path: Path) -> None:
    out_dir = tmp_path / "out" / "nested"  # created on demand
    path = write_transcript(TRANSCRIPT, "srt", out_dir, "/recordings/meeting.2024.flac")
    assert path == out_dir / "meeting.2024.srt"
    assert path.read_bytes() == to_srt(TRANSCRIPT).encode("utf-8")
    assert sorted(p.name for p in out_dir.iterdir()) == ["meeting.2024.srt"]


def test_write_all_writes_four_files(tmp_path: Path) -> None:
    path = write_transcript(TRANSCRIPT, "all", tmp_path, Path("talk.wav"))
    assert path == tmp_path / "talk.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "talk.json",
        "talk.srt",
        "talk.txt",
        "talk.vtt",
    ]
    renderers = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}
    for ext, render in renderers.items():
        # Exact bytes: UTF-8 and "\n" line ends whatever the platform.
        assert (tmp_path / f"talk.{ext}").read_bytes() == render(TRANSCRIPT).encode("utf-8")
    assert set(renderers) | {"all"} == set(FORMATS)


@pytest.mark.parametrize("fmt", ["tsv", "", "SRT", "all "])
def test_unknown_format_is_a_config_error(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(ConfigError, match="unknown output format"):
        write_transcript(TRANSCRIPT, fmt, tmp_path / "out", "talk.wav")
    assert not (tmp_path / "out").exists()  # rejected before anything is written
