"""`streamd transcribe` and `streamd models` from the command line: output formats, files,
bad input (one-line errors, no tracebacks), models, and the progress bar on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamd import cli
from streamd.audio import SAMPLE_RATE
from tests.audio_fixtures import shared_audio_dir, shared_manifest, transcode, write_wav

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MAN_SAID = "en/librispeech_a_man_said.flac"  # 4.65 s: "A MAN SAID TO THE UNIVERSE SIR I EXIST"
QUILTER = "en/librispeech_mister_quilter.flac"
JFK = "en/jfk.flac"
HARVARD = "en/osr_harvard_list72_8khz.wav"  # 35.55 s
MAN_SAID_WORDS = "a man said to the universe sir i exist"
JFK_WORDS = "ask not what your country can do for you"
SRT_TIME = r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}"
VTT_TIME = r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}"


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


def _clip(name: str) -> str:
    return str(shared_audio_dir() / name)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("streamd: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# --- output formats -----------------------------------------------------------------------


def test_default_prints_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID))
    assert rc == 0, err
    assert err == ""  # no progress bar, no chatter when stderr is not a terminal
    assert out.endswith("\n") and out.count("\n") == 1
    assert _words(out) == MAN_SAID_WORDS


def test_format_srt(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--format", "srt")
    assert rc == 0, err
    assert re.match(r"1\n00:00:00,000 --> 00:00:0\d,\d{3}\n\S.*\n\n", out), out
    cues = re.findall(rf"(?m)^(\d+)\n{SRT_TIME}\n(.+)\n\n", out)
    assert [int(n) for n, _ in cues] == list(range(1, len(cues) + 1))
    assert _words(" ".join(text for _, text in cues)) == MAN_SAID_WORDS


def test_format_vtt(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--format", "vtt")
    assert rc == 0, err
    assert out.startswith("WEBVTT\n\n00:00:00.000 --> ")
    cues = re.findall(rf"(?m)^{VTT_TIME}\n(.+)\n\n", out)
    assert cues
    assert _words(" ".join(cues)) == MAN_SAID_WORDS


def test_format_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert _words(doc["text"]) == MAN_SAID_WORDS
    assert doc["language"] == "en"
    assert doc["duration_s"] == pytest.approx(4.65, abs=0.05)
    segs = doc["segments"]
    assert segs and _words(" ".join(s["text"] for s in segs)) == MAN_SAID_WORDS
    words = [w for s in segs for w in s["words"]]  # json output carries word times
    assert _words(" ".join(w["word"] for w in words)) == MAN_SAID_WORDS
    assert all(0.0 <= w["start"] <= w["end"] <= 5.2 for w in words)


def test_output_dir_with_format_all_writes_four_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out" / "nested"
    rc, out, err = _run(
        capsys, "transcribe", _clip(MAN_SAID), "--format", "all", "--output-dir", str(out_dir)
    )
    assert rc == 0, err
    assert out == ""  # everything went to files
    stem = Path(MAN_SAID).stem
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{stem}.{ext}" for ext in ("txt", "srt", "vtt", "json")
    )
    assert f"streamd: wrote {out_dir / stem}.json" in err
    assert _words((out_dir / f"{stem}.txt").read_text()) == MAN_SAID_WORDS
    assert re.match(rf"1\n{SRT_TIME}\n", (out_dir / f"{stem}.srt").read_text())
    assert (out_dir / f"{stem}.vtt").read_text().startswith("WEBVTT\n\n")
    assert _words(json.loads((out_dir / f"{stem}.json").read_text())["text"]) == MAN_SAID_WORDS


def test_format_all_without_output_dir_fails_before_loading_a_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(*_: object) -> None:
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(cli, "_load", no_load)
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--format", "all")
    assert rc != 0
    assert out == ""
    _assert_one_line_error(err, "--format all", "--output-dir")


def test_unwritable_output_dir_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--output-dir", str(not_a_dir))
    assert rc != 0
    assert out == ""
    _assert_one_line_error(err, "cannot write", str(not_a_dir))


def test_several_files_in_one_call(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), _clip(QUILTER))
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert _words(lines[0]) == MAN_SAID_WORDS
    assert "manner less interesting than his matter" in _words(lines[1])


def test_prompt_flag(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(QUILTER), "--prompt", "Mr. Kwilter")
    assert rc == 0, err
    assert "Kwilter's manner" in out  # without the prompt tiny.en spells it "Quilter"


@pytest.fixture(scope="module")
def jfk_encodings(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("encoded")
    source = shared_audio_dir() / JFK
    return [
        transcode(source, out / "jfk.mp3", "libmp3lame"),
        transcode(source, out / "jfk.m4a", "aac"),
        transcode(source, out / "jfk.ogg", "libopus", rate=48_000),
    ]


def test_compressed_formats(capsys: pytest.CaptureFixture[str], jfk_encodings: list[Path]) -> None:
    rc, out, err = _run(capsys, "transcribe", *map(str, jfk_encodings))
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == len(jfk_encodings), out
    for path, line in zip(jfk_encodings, lines, strict=True):
        assert JFK_WORDS in _words(line), (path.name, line)
        assert "ask what you can do for your country" in _words(line), (path.name, line)


# --- bad input ----------------------------------------------------------------------------


def test_missing_file_is_reported_and_the_others_are_still_transcribed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.wav"
    rc, out, err = _run(capsys, "transcribe", str(missing), _clip(MAN_SAID))
    assert rc != 0
    _assert_one_line_error(err, str(missing), "no such file")
    assert _words(out) == MAN_SAID_WORDS


def _corrupt_header_wav(path: Path) -> Path:
    write_wav(path, np.zeros(SAMPLE_RATE, np.float32) + 0.1, SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    assert data[34:36] == struct.pack("<H", 16)
    data[34:36] = struct.pack("<H", 8)  # bits per sample 8, but block align still says 2 bytes
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("kind", "make", "needle"),
    [
        ("empty", lambda p: p.write_bytes(b""), "empty"),
        ("text", lambda p: p.write_text("this is not audio, just some text\n" * 20), "not a"),
        ("corrupt_header", _corrupt_header_wav, "corrupt WAV header"),
        ("directory", lambda p: p.mkdir(), "directory"),
    ],
)
def test_bad_file_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str, make: object, needle: str
) -> None:
    path = tmp_path / f"{kind}.wav"
    assert callable(make)
    make(path)
    rc, out, err = _run(capsys, "transcribe", str(path))
    assert rc != 0
    assert out == ""
    _assert_one_line_error(err, str(path), needle)


@pytest.mark.parametrize("seconds", [0, 5])
def test_zero_samples_or_silence_gives_an_empty_transcript(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, seconds: int
) -> None:
    path = write_wav(tmp_path / f"silent{seconds}.wav", np.zeros(seconds * SAMPLE_RATE), 16_000)
    for fmt in ("txt", "srt", "json"):
        rc, out, err = _run(capsys, "transcribe", str(path), "--format", fmt)
        assert rc == 0, err
        assert err == ""
        if fmt == "json":
            doc = json.loads(out)
            assert doc["text"] == "" and doc["segments"] == []
        else:
            assert out == ""
    rc, out, err = _run(capsys, "transcribe", str(path))
    assert rc == 0 and err == ""
    assert out.strip() == ""


def test_english_only_model_with_other_language(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--language", "ja")
    assert rc != 0
    assert out == ""
    _assert_one_line_error(err, "English-only")


def test_unknown_language(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--language", "xx")
    assert rc != 0
    assert out == ""
    _assert_one_line_error(err, "unknown language 'xx'")


# --- models -------------------------------------------------------------------------------


def test_unknown_model_fails_fast_listing_what_is_available(
    capsys: pytest.CaptureFixture[str],
) -> None:
    start = time.monotonic()
    rc, out, err = _run(capsys, "transcribe", _clip(MAN_SAID), "--model", "large-v9")
    assert time.monotonic() - start < 5.0
    assert rc != 0
    assert out == ""
    _assert_one_line_error(err, "'large-v9'", "not available offline", "tiny.en", "base")


def test_models_list(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "models", "list")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines() if "built-in" in line]
    assert names[:2] == ["tiny.en", "base"]


def test_models_path(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "models", "path", "tiny.en")
    assert rc == 0
    path = Path(out.strip())
    assert path.suffix == ".pt"
    assert path.is_file() and path.stat().st_size > 10_000_000  # 39M params in float32


def test_transcribe_without_files_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["transcribe"])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


# --- the long file and the progress bar ----------------------------------------------------


def _harvard_reference() -> str:
    return next(e["reference"] for e in shared_manifest() if e["file"] == HARVARD)


def test_long_file_without_a_terminal_has_no_progress_bar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, err = _run(capsys, "transcribe", _clip(HARVARD))
    assert rc == 0, err
    assert err == ""
    assert out.count("\n") == 1
    text = _words(out)
    sentences = [_words(s) for s in _harvard_reference().split(".") if s.strip()]
    found = [s for s in sentences if s in text]
    assert len(found) >= 8, (found, text)  # of 10, across both 30 s windows
    assert sentences[0] in text and sentences[-1] in text


def _run_with_tty_stderr(argv: list[str]) -> tuple[int, str, str]:
    """Run `python -m streamd ARGV` with stderr on a pseudo-terminal; (rc, stdout, stderr)."""
    master, slave = pty.openpty()
    # a pty starts 0 columns wide, and tqdm draws nothing in 0 columns: give it a real size
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    received = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the child has closed its end
                return
            if not chunk:
                return
            received.extend(chunk)

    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamd", *argv],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
    finally:
        os.close(slave)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, out.decode(), received.decode(errors="replace")


def test_long_file_on_a_terminal_shows_a_progress_bar() -> None:
    rc, out, err = _run_with_tty_stderr(["transcribe", _clip(HARVARD)])
    assert rc == 0, err
    assert "Traceback" not in err
    # tqdm: "<file>:  83%|███▍  | 29.6/35.5 [...]", redrawn in place, ending at 100 %
    name = Path(HARVARD).name
    assert re.search(rf"\r{re.escape(name)}: +\d+%\|", err), err
    assert re.search(r"100%\|[^\r]*\| 35\.5/35\.5 ", err), err
    assert err.endswith("\r")  # leave=False: the bar is cleared, not left on screen
    assert "when you hear the bell come quickly" in _words(out)
    assert "%|" not in out


def test_no_progress_flag_on_a_terminal() -> None:
    rc, out, err = _run_with_tty_stderr(["transcribe", "--no-progress", _clip(MAN_SAID)])
    assert rc == 0, err
    assert err == ""
    assert _words(out) == MAN_SAID_WORDS
