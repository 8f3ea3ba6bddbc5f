"""load_audio and resample on the real clips in ../shared/audio, PyAV re-encodes and bad files."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamd.audio import SAMPLE_RATE, load_audio, resample
from streamd.errors import AudioError, ClientError
from tests.audio_fixtures import (
    shared_audio_dir,
    shared_manifest,
    transcode,
    write_array,
    write_video_only,
    write_wav,
)

JFK = "en/jfk.flac"
MAX_CODEC_DELAY_S = 0.1  # how far a lossy codec's output may be shifted against the original


def _rms_db(samples: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(samples, dtype=np.float64))))


def _aligned(samples: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both signals cut to their overlap at the lag (within MAX_CODEC_DELAY_S) that fits best."""
    max_lag = int(MAX_CODEC_DELAY_S * SAMPLE_RATE)
    n = len(samples) + len(reference)
    xcorr = np.fft.irfft(np.fft.rfft(samples, n) * np.conj(np.fft.rfft(reference, n)), n)
    lags = np.r_[0 : max_lag + 1, -max_lag:0]
    lag = int(lags[np.argmax(xcorr[lags])])
    a, b = (samples[lag:], reference) if lag >= 0 else (samples, reference[-lag:])
    m = min(len(a), len(b))
    return a[:m], b[:m]


def _assert_16k_mono_float32(samples: np.ndarray) -> None:
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert np.all(np.isfinite(samples))


# --- the real clips ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", shared_manifest(), ids=lambda entry: entry["file"])
def test_shared_clip_decodes_to_manifest_duration(entry: dict[str, Any]) -> None:
    samples = load_audio(shared_audio_dir() / entry["file"])
    _assert_16k_mono_float32(samples)
    assert len(samples) / SAMPLE_RATE == pytest.approx(entry["duration_s"], abs=0.05)
    assert 0.01 < float(np.abs(samples).max()) <= 1.0  # speech, at a sane level, averaged


def test_8khz_clip_is_resampled_not_slowed_down() -> None:
    path = shared_audio_dir() / "en/osr_harvard_list72_8khz.wav"
    samples = load_audio(path)
    assert len(samples) / SAMPLE_RATE == pytest.approx(35.55, abs=0.05)
    # Telephone band: next to nothing above 4 kHz after upsampling.
    power = np.abs(np.fft.rfft(samples)) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)
    assert power[freqs > 4_100].sum() < 1e-3 * power.sum()


def test_load_audio_accepts_str_paths() -> None:
    path = shared_audio_dir() / "en/librispeech_a_man_said.flac"
    np.testing.assert_array_equal(load_audio(str(path)), load_audio(path))


# --- PyAV re-encodes of jfk.flac (44.1 kHz stereo FLAC) --------------------------------------


@pytest.fixture(scope="module")
def jfk_reference() -> np.ndarray:
    return load_audio(shared_audio_dir() / JFK)


@pytest.fixture(scope="module")
def reencoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    source, out = shared_audio_dir() / JFK, tmp_path_factory.mktemp("jfk")
    return {
        "mp3": transcode(source, out / "jfk.mp3", "libmp3lame"),
        "m4a": transcode(source, out / "jfk.m4a", "aac"),
        "opus": transcode(source, out / "jfk.ogg", "libopus", rate=48_000),
        "wav44k_stereo": transcode(source, out / "jfk_44k.wav", "pcm_s16le", layout="stereo"),
        "wav8k": transcode(source, out / "jfk_8k.wav", "pcm_s16le", rate=8_000, layout="mono"),
        "flac16k": transcode(source, out / "jfk_16k.flac", "flac", rate=16_000, layout="mono"),
    }


@pytest.mark.parametrize("name", ["mp3", "m4a", "opus", "wav44k_stereo", "wav8k", "flac16k"])
def test_reencoded_jfk_matches_original(
    name: str, reencoded: dict[str, Path], jfk_reference: np.ndarray
) -> None:
    samples = load_audio(reencoded[name])
    _assert_16k_mono_float32(samples)
    assert abs(len(samples) - len(jfk_reference)) / SAMPLE_RATE < 0.1
    assert _rms_db(samples) == pytest.approx(_rms_db(jfk_reference), abs=1.0)
    got, want = _aligned(samples, jfk_reference)
    assert len(got) > 0.98 * len(jfk_reference)
    assert np.corrcoef(got, want)[0, 1] > 0.99


@pytest.mark.parametrize("name", ["wav44k_stereo", "flac16k"])
def test_lossless_reencode_is_sample_close(
    name: str, reencoded: dict[str, Path], jfk_reference: np.ndarray
) -> None:
    samples = load_audio(reencoded[name])
    assert len(samples) == len(jfk_reference)  # no delay, no padding
    np.testing.assert_allclose(samples, jfk_reference, atol=2e-3)


# --- WAV variants written here ------------------------------------------------------------

TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)


def test_16k_mono_wav_loads_unchanged(tmp_path: Path) -> None:
    samples = load_audio(write_wav(tmp_path / "tone.wav", TONE, SAMPLE_RATE))
    np.testing.assert_allclose(samples, TONE, atol=1 / 32767)


@pytest.mark.parametrize(
    ("right", "expected"),
    [(TONE, TONE), (-TONE, 0 * TONE), (0 * TONE, TONE / 2)],
    ids=["same", "opposite", "silent-right"],
)
def test_stereo_is_averaged_without_gain(
    tmp_path: Path, right: np.ndarray, expected: np.ndarray
) -> None:
    # swresample's stereo->mono matrix would give (L+R)/sqrt(2): +3 dB, and peaks over 1.0.
    samples = load_audio(write_wav(tmp_path / "stereo.wav", np.stack([TONE, right]), SAMPLE_RATE))
    np.testing.assert_allclose(samples, expected, atol=2 / 32767)


@pytest.mark.parametrize("codec", ["pcm_u8", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le"])
def test_wav_sample_formats(tmp_path: Path, codec: str) -> None:
    path = write_array(tmp_path / f"{codec}.wav", np.stack([TONE, TONE]), SAMPLE_RATE, codec)
    np.testing.assert_allclose(load_audio(path), TONE, atol=1 / 127)


def test_wav_with_a_chunk_before_fmt(tmp_path: Path) -> None:
    data = write_wav(tmp_path / "tone.wav", TONE, SAMPLE_RATE).read_bytes()
    extra = b"LIST" + struct.pack("<I", 5) + b"INFOx\0"  # odd size: padded to even
    patched = bytearray(data[:12] + extra + data[12:])
    struct.pack_into("<I", patched, 4, len(patched) - 8)
    (path := tmp_path / "list_first.wav").write_bytes(bytes(patched))
    np.testing.assert_allclose(load_audio(path), TONE, atol=1 / 32767)


def test_wav_with_zero_samples_gives_empty_array(tmp_path: Path) -> None:
    samples = load_audio(write_wav(tmp_path / "empty.wav", np.zeros(0), SAMPLE_RATE))
    assert samples.shape == (0,)
    assert samples.dtype == np.float32


# --- bad input: one-line AudioError naming the file ------------------------------------------


def _assert_audio_error(path: Path, match: str) -> None:
    with pytest.raises(AudioError, match=match) as info:
        load_audio(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert isinstance(info.value, ClientError)  # the caller's fault: reported, not fatal


def test_missing_file(tmp_path: Path) -> None:
    _assert_audio_error(tmp_path / "nope.wav", "no such file")


def test_directory(tmp_path: Path) -> None:
    _assert_audio_error(tmp_path, "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    (path := tmp_path / "empty.wav").write_bytes(b"")
    _assert_audio_error(path, r"empty \(0 bytes\)")


# FFmpeg picks a demuxer by extension when probing fails; the FLAC one then "opens" anything.
@pytest.mark.parametrize("ext", ["wav", "mp3", "flac", "ogg", "m4a", "webm"])
def test_text_file_with_audio_extension(tmp_path: Path, ext: str) -> None:
    (path := tmp_path / f"notes.{ext}").write_text("not samples\n" * 50, encoding="utf-8")
    _assert_audio_error(path, "not a readable audio file")


@pytest.mark.parametrize("ext", ["wav", "mp3", "flac", "ogg"])
def test_random_bytes(tmp_path: Path, ext: str) -> None:
    (path := tmp_path / f"noise.{ext}").write_bytes(np.random.default_rng(0).bytes(50_000))
    _assert_audio_error(path, "not a readable audio file")


def test_video_without_audio(tmp_path: Path) -> None:
    _assert_audio_error(write_video_only(tmp_path / "silent.mp4"), "contains no audio stream")


# Byte offsets in the canonical 44-byte header written by `write_wav`.
_RIFF_ID, _FORMAT_TAG, _CHANNELS, _RATE, _BITS = 0, 20, 22, 24, 34


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        # FFmpeg alone would decode these as noise at the wrong length or speed.
        (_BITS, "<H", 8, "corrupt WAV header"),
        (_BITS, "<H", 24, "corrupt WAV header"),
        (_CHANNELS, "<H", 2, "corrupt WAV header"),
        (_RATE, "<I", 8_000, "corrupt WAV header"),
        (_RATE, "<I", 1, "corrupt WAV header"),  # would be 32,000 s: a 1 GB array
        (_CHANNELS, "<H", 0, "corrupt WAV header"),
        (_FORMAT_TAG, "<H", 0x0099, "no decoder"),
        (_RIFF_ID, "4s", b"RIFX", "not a readable audio file"),
    ],
    ids=["bits-8", "bits-24", "channels-2", "rate-8k", "rate-1", "channels-0", "tag", "riff"],
)
def test_corrupt_wav_header(
    tmp_path: Path, offset: int, fmt: str, value: int | bytes, match: str
) -> None:
    data = bytearray(write_wav(tmp_path / "tone.wav", TONE, SAMPLE_RATE).read_bytes())
    struct.pack_into(fmt, data, offset, value)
    (path := tmp_path / "corrupt.wav").write_bytes(bytes(data))
    _assert_audio_error(path, match)


@pytest.mark.parametrize(
    ("size", "match"), [(4, "not a readable"), (20, "truncated"), (30, "truncated"), (44, None)]
)
def test_truncated_wav_header(tmp_path: Path, size: int, match: str | None) -> None:
    data = write_wav(tmp_path / "tone.wav", TONE, SAMPLE_RATE).read_bytes()
    (path := tmp_path / "truncated.wav").write_bytes(data[:size])
    if match is None:  # the whole header, no data: a valid empty recording
        assert load_audio(path).shape == (0,)
    else:
        _assert_audio_error(path, match)


def test_wav_cut_short_in_its_data_keeps_what_is_there(tmp_path: Path) -> None:
    data = write_wav(tmp_path / "tone.wav", TONE, SAMPLE_RATE).read_bytes()
    (path := tmp_path / "cut.wav").write_bytes(data[: 44 + 2 * 1000])
    np.testing.assert_allclose(load_audio(path), TONE[:1000], atol=1 / 32767)


def test_flac_cut_mid_frame(tmp_path: Path) -> None:
    data = (shared_audio_dir() / JFK).read_bytes()
    (path := tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    _assert_audio_error(path, r"corrupt or truncated audio at \d+\.\d\d s")


def test_nan_samples(tmp_path: Path) -> None:
    tone = TONE.copy()
    tone[100] = np.nan
    path = write_array(tmp_path / "nan.wav", tone[None], SAMPLE_RATE, "pcm_f32le")
    _assert_audio_error(path, "NaN")


# --- resample --------------------------------------------------------------------------------


def test_resample_8k_to_16k_doubles_length_and_keeps_pitch() -> None:
    rate = 8_000
    tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    out = resample(tone, rate)
    assert out.dtype == np.float32
    assert len(out) == 2 * len(tone)
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * SAMPLE_RATE / len(out)
    assert peak_hz == pytest.approx(440, abs=1)


def test_resample_identity_at_16k() -> None:
    out = resample(TONE.astype(np.float64), SAMPLE_RATE)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, TONE)


def test_resample_empty() -> None:
    assert resample(np.zeros(0, dtype=np.float32), 44_100).shape == (0,)


@pytest.mark.parametrize(
    ("from_rate", "to_rate"), [(0, SAMPLE_RATE), (-8_000, SAMPLE_RATE), (8_000, 0)]
)
def test_resample_rejects_non_positive_rates(from_rate: int, to_rate: int) -> None:
    with pytest.raises(AudioError, match="must be positive"):
        resample(TONE, from_rate, to_rate)
