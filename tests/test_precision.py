"""Encoder precision: when "auto" picks bfloat16, and what bfloat16 does to the encoder's output
and to a transcript of real speech (tiny.en, the JFK clip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from whisper.audio import log_mel_spectrogram, pad_or_trim

from streamd.audio import load_audio
from streamd.engine.precision import cpu_has_native_bf16, resolve_encoder_precision
from streamd.engine.torch_engine import TorchEngine
from streamd.errors import ConfigError, EngineError
from streamd.models.loader import LoadedModel, load_model
from streamd.transcribe import TranscribeOptions, Transcriber
from tests.audio_fixtures import shared_audio_dir

# bf16 keeps 8 bits of mantissa: measured 2.2% of the largest feature (tiny.en, JFK, 30 s)
BF16_FEATURE_RTOL = 0.05


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(cpuinfo(tmp_path, "fpu sse2 avx512f amx_bf16 amx_tile"))
    assert cpu_has_native_bf16(cpuinfo(tmp_path, "fpu avx512f avx512_bf16"))
    assert not cpu_has_native_bf16(cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512_vnni"))
    assert not cpu_has_native_bf16(tmp_path / "no-such-file")


def test_auto_picks_bf16_only_on_a_cpu_that_has_it(tmp_path: Path) -> None:
    amx = cpuinfo(tmp_path, "avx512f amx_bf16")
    plain = cpuinfo(tmp_path, "avx2")
    assert resolve_encoder_precision("auto", "cpu", amx) == "bf16"
    assert resolve_encoder_precision("auto", "cpu", plain) == "fp32"
    assert resolve_encoder_precision("auto", "cuda:0", amx) == "fp32"
    assert resolve_encoder_precision("fp32", "cpu", amx) == "fp32"
    assert resolve_encoder_precision("bf16", "cpu", plain) == "bf16"  # asked for knowingly
    with pytest.raises(ConfigError, match="auto, fp32, bf16"):
        resolve_encoder_precision("fp16", "cpu", amx)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny.en")


@pytest.fixture(scope="module")
def jfk() -> torch.Tensor:
    return torch.from_numpy(load_audio(shared_audio_dir() / "en" / "jfk.flac"))


@pytest.mark.usefixtures("one_torch_thread")
def test_bf16_encoder_gives_float32_features_close_to_fp32(
    tiny: LoadedModel, jfk: torch.Tensor
) -> None:
    mel = log_mel_spectrogram(pad_or_trim(jfk))[None]  # [1, 80, 3000]
    fp32 = TorchEngine(tiny.model, tiny.alignment_heads, max_batch=1)
    bf16 = TorchEngine(tiny.model, tiny.alignment_heads, max_batch=1, encoder_precision="bf16")
    for frames in (3000, 2000):  # the full context and a 20 s bucket
        want = fp32.encode(mel[:, :, :frames])
        got = bf16.encode(mel[:, :, :frames])
        assert got.dtype == torch.float32 and got.shape == want.shape
        error = float((got - want).abs().max() / want.abs().max())
        print(f"bf16 vs fp32 features, {frames} frames: {error:.2e} of the largest")
        assert 0 < error < BF16_FEATURE_RTOL  # not zero: bf16 really ran


@pytest.mark.usefixtures("one_torch_thread")
def test_bf16_encoder_transcribes_real_speech_like_fp32(
    tiny: LoadedModel, jfk: torch.Tensor
) -> None:
    audio = jfk.numpy()
    options = TranscribeOptions(language="en")
    want = Transcriber(tiny).transcribe(audio, options).text
    got = Transcriber(tiny, encoder_precision="bf16").transcribe(audio, options).text
    assert "ask not what your country can do for you" in got.lower()
    assert got == want


def test_an_unknown_engine_precision_is_refused(tiny: LoadedModel) -> None:
    with pytest.raises(EngineError, match="fp32 or bf16"):
        TorchEngine(tiny.model, tiny.alignment_heads, max_batch=1, encoder_precision="auto")
