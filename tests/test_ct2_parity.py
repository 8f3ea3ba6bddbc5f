"""Numerical proof that the converted built-in weights are the CTranslate2 originals (DESIGN §6).

For tiny.en on en/jfk.flac and base on ja/reazonspeech_test_ja_2.wav, the same log-mel input is
given to CTranslate2 (the `model.bin` the weights come from, float32 on CPU) and to the
openai-whisper `Whisper` module that `streamd.models.loader.load_model` builds from it:

1. encoder outputs agree (max abs diff < 1e-3);
2. the per-step log-probabilities of CTranslate2's greedy decode agree with the openai module's,
   teacher-forced on the same tokens (max abs diff < 1e-3), and both suppress the same tokens;
3. CTranslate2's greedy tokens and text equal openai-whisper's own greedy `whisper.decode`.

Run with `pytest -s` to see the measured differences.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
import whisper
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask

from streamd.audio import load_audio
from streamd.models.loader import LoadedModel, load_model
from streamd.models.registry import BUILTIN_MODELS

pytestmark = pytest.mark.slow

AUDIO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
TOLERANCE = 1e-3
ENCODER_RTOL = 1e-4  # of the largest feature magnitude
# openai-whisper's default `sample_len` (n_text_ctx // 2); CTranslate2's max_length counts
# generated tokens only, like sample_len.
MAX_NEW_TOKENS = 224
# CTranslate2 marks suppressed tokens in `logits_vocab` with float32's lowest value.
_CT2_SUPPRESSED = -1e30


@dataclass(frozen=True)
class Case:
    model: str
    audio: str  # relative to AUDIO_DIR
    language: str


CASES = [
    Case("tiny.en", "en/jfk.flac", "en"),
    Case("base", "ja/reazonspeech_test_ja_2.wav", "ja"),
]


@dataclass
class Parity:
    """Everything one model's checks need, computed once per module."""

    case: Case
    loaded: LoadedModel
    mel: torch.Tensor  # [n_mels, 3000]
    prompt: list[int]  # SOT sequence incl. language and <|notimestamps|>
    ct2_encoded: np.ndarray  # [1, 1500, d_model]
    ct2_tokens: list[int]  # greedy, without prompt and EOT
    ct2_logits: np.ndarray  # [len(ct2_tokens) + 1, n_vocab], after CT2's suppression


def _ct2_model(name: str, workdir: Path) -> ctranslate2.models.Whisper:
    """The CTranslate2 original of a built-in model, float32 on CPU."""
    builtin = BUILTIN_MODELS[name]
    parts = builtin.bin_parts()
    config_dir = builtin.config_json().parent
    if len(parts) == 1 and parts[0].parent == config_dir:
        model_dir = config_dir  # already a complete CTranslate2 directory
    else:
        model_dir = workdir
        with (model_dir / "model.bin").open("wb") as out:
            for part in parts:  # joined byte for byte, in order
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(config_dir / extra, model_dir / extra)
    return ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")


@pytest.fixture(scope="module", params=CASES, ids=[c.model for c in CASES])
def parity(request: pytest.FixtureRequest) -> Iterator[Parity]:
    case: Case = request.param
    audio_path = AUDIO_DIR / case.audio
    if not audio_path.is_file():
        pytest.fail(f"shared test audio missing: {audio_path} (expected under {AUDIO_DIR})")

    loaded = load_model(case.model)
    audio = load_audio(audio_path)
    mel = whisper.audio.log_mel_spectrogram(whisper.audio.pad_or_trim(audio), loaded.dims.n_mels)
    tokenizer = loaded.tokenizer(case.language)
    prompt = list(tokenizer.sot_sequence_including_notimestamps)

    # CTranslate2 reads the whole model.bin into memory, so a joined copy can go at once.
    with tempfile.TemporaryDirectory(prefix="streamd-ct2-") as tmp:
        ct2 = _ct2_model(case.model, Path(tmp))
    features = ctranslate2.StorageView.from_array(
        np.ascontiguousarray(mel.numpy()[None], dtype=np.float32)
    )
    encoded = np.asarray(ct2.encode(features, to_cpu=True))
    # Greedy with CTranslate2's default suppression (suppress_tokens=[-1] -> config.json's
    # suppress_ids, suppress_blank=True), i.e. the same rules as openai's default
    # DecodingOptions. `generate` has no `without_timestamps` argument: <|notimestamps|> at the
    # end of the prompt is what turns timestamp rules off. `return_logits_vocab` (ctranslate2
    # >= 4.4) gives, for every generated token and the final EOT, the full-vocabulary logits
    # after suppression (suppressed entries set to float32's lowest value).
    (result,) = ct2.generate(
        features,
        [prompt],
        beam_size=1,
        max_length=MAX_NEW_TOKENS,
        return_logits_vocab=True,
    )
    tokens = [int(t) for t in result.sequences_ids[0]]
    logits = np.stack([np.asarray(step, dtype=np.float32) for step in result.logits[0]])
    yield Parity(case, loaded, mel, prompt, encoded, tokens, logits)


def _decoding_options(case: Case) -> DecodingOptions:
    return DecodingOptions(
        language=case.language, without_timestamps=True, temperature=0.0, fp16=False
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    out: np.ndarray = x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
    return out


def test_encoder_output_matches_ctranslate2(parity: Parity) -> None:
    with torch.inference_mode():
        ours = parity.loaded.model.embed_audio(parity.mel[None]).numpy()
    assert ours.shape == parity.ct2_encoded.shape
    diff = float(np.abs(ours - parity.ct2_encoded).max())
    scale = float(np.abs(parity.ct2_encoded).max())
    print(
        f"\n[{parity.case.model}] encoder max abs diff vs CTranslate2: {diff:.3e} (of {scale:.1f})"
    )
    # Relative: the features reach tens, and float32 summation order differs between CPUs
    # (AMD EPYC/AVX2 gave 6e-4 for base, an Intel Xeon 1.2e-3: both ~1e-5 of the range).
    assert diff < ENCODER_RTOL * scale


def test_greedy_log_probs_match_ctranslate2(parity: Parity) -> None:
    model = parity.loaded.model
    n_prompt, n_gen = len(parity.prompt), len(parity.ct2_tokens)
    assert n_gen > 0
    assert parity.ct2_logits.shape == (n_gen + 1, model.dims.n_vocab)
    ct2_suppressed = parity.ct2_logits < _CT2_SUPPRESSED
    chosen = [*parity.ct2_tokens, parity.loaded.tokenizer(parity.case.language).eot]
    # CTranslate2 reports logits after its own suppression; its greedy choice is their argmax.
    assert parity.ct2_logits.argmax(-1).tolist() == chosen

    # Teacher-force prompt + generated tokens; row i predicts generated token i (last: EOT).
    tokens = torch.tensor([parity.prompt + parity.ct2_tokens])
    with torch.inference_mode():
        audio_features = model.embed_audio(parity.mel[None])
        logits = model.logits(tokens, audio_features)[0, n_prompt - 1 :].clone()
        # openai-whisper's own suppression filters, applied exactly as decoding would.
        task = DecodingTask(model, _decoding_options(parity.case))
        for step in range(n_gen + 1):
            for logit_filter in task.logit_filters:
                logit_filter.apply(logits[step : step + 1], tokens[:, : n_prompt + step])
    ours = logits.double().numpy()
    ours_suppressed = np.isneginf(ours)
    mismatch = np.argwhere(ours_suppressed != ct2_suppressed)
    assert mismatch.size == 0, f"suppressed (step, token) differ: {mismatch[:10].tolist()}"

    keep = ~ct2_suppressed
    ours_lp = np.where(keep, torch.log_softmax(logits.double(), -1).numpy(), 0.0)
    ct2_lp = np.where(keep, _log_softmax(parity.ct2_logits), 0.0)
    full_diff = float(np.abs(ours_lp - ct2_lp).max())
    rows = np.arange(n_gen + 1)
    chosen_diff = float(np.abs(ours_lp[rows, chosen] - ct2_lp[rows, chosen]).max())
    print(
        f"\n[{parity.case.model}] greedy log-prob max abs diff vs CTranslate2 over {n_gen + 1} "
        f"steps: chosen tokens {chosen_diff:.3e}, full vocabulary {full_diff:.3e}"
    )
    assert chosen_diff < TOLERANCE
    assert full_diff < TOLERANCE


def test_greedy_text_matches_openai_whisper_decode(parity: Parity) -> None:
    result = whisper.decode(parity.loaded.model, parity.mel, _decoding_options(parity.case))
    assert isinstance(result, DecodingResult)
    tokenizer = parity.loaded.tokenizer(parity.case.language)
    ct2_text = tokenizer.decode(parity.ct2_tokens).strip()
    name = parity.case.model
    print(f"\n[{name}] CTranslate2: {ct2_text!r}\n[{name}] openai-whisper: {result.text!r}")
    assert result.tokens == parity.ct2_tokens
    assert result.text == ct2_text
    if parity.case.language == "en":
        assert "ask not what your country can do for you" in ct2_text.lower()
    else:
        assert any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in ct2_text)
