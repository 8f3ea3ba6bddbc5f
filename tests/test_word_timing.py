"""Word timestamps from decode-time attention (`align_words`) on en/jfk.flac with tiny.en.

The window is built as openai-whisper's `transcribe` builds it (log-mel of the whole clip, the
real frames, zero-padded to 30 s), so the decoded tokens are exactly openai's and the words can
be compared one to one with `whisper.transcribe(..., word_timestamps=True)`, which re-runs the
decoder over the final text to get its attention; we take ours from the decode itself.

Run with `pytest -s` to see the measured timing error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import whisper
from whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisper.tokenizer import Tokenizer

from streamd.audio import SAMPLE_RATE, load_audio
from streamd.decoding.greedy import DecodeRequest, DecodeResult, GreedyDecoder
from streamd.decoding.word_timing import TimedWord, align_words
from streamd.engine.torch_engine import TorchEngine
from streamd.models.loader import LoadedModel, load_model
from tests.audio_fixtures import shared_audio_dir

pytestmark = pytest.mark.slow

JFK = "en/jfk.flac"
# Where words really are in jfk.flac, read off its RMS envelope in 50 ms frames (speech bursts
# at 0.30-0.50 "And", 0.65-1.25 "so my", 1.35-2.10 "fellow Americans", silence to 3.25, 3.25-3.65
# "ask", 4.00-4.30 "not", ..., the last burst "country" fading out by ~10.3 s).
AMERICANS_S = (1.75, 2.15)
NOT_START_S = 4.0
LAST_WORD_END_S = 10.3
TRUE_TIME_TOLERANCE_S = 0.6
VS_OPENAI_MEAN_S = 0.2  # mean |start - openai's start| per word
FRAME_S = 0.02  # one DTW step (whisper's TOKENS_PER_SECOND = 50)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Jfk:
    loaded: LoadedModel
    tokenizer: Tokenizer
    audio: np.ndarray
    n_frames: int  # mel frames of real audio in the window
    decoder: GreedyDecoder
    features: torch.Tensor  # [1, 1500, 384]
    result: DecodeResult  # plain greedy: every token but the first timed by a decode step
    words: list[TimedWord]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def align(self, result: DecodeResult) -> list[TimedWord]:
        return align_words(
            self.tokenizer, result.tokens, result.token_logprobs, result.alignment_qk, self.n_frames
        )


@pytest.fixture(scope="module")
def jfk() -> Jfk:
    loaded = load_model("tiny.en")
    with warnings.catch_warnings():
        # openai-whisper reads its .tiktoken vocabulary without closing the file
        warnings.simplefilter("ignore", ResourceWarning)
        tokenizer = loaded.tokenizer()
    audio = load_audio(shared_audio_dir() / JFK)
    # as openai-whisper's transcribe (and streamd.transcribe) build the first window
    mel = log_mel_spectrogram(torch.from_numpy(audio), loaded.dims.n_mels, padding=N_SAMPLES)
    n_frames = mel.shape[-1] - N_FRAMES
    engine = TorchEngine(loaded.model, loaded.alignment_heads, max_batch=1)
    features = engine.encode(pad_or_trim(mel[:, :n_frames], N_FRAMES)[None])
    decoder = GreedyDecoder(engine, loaded.tokenizer, loaded.is_multilingual)
    (result,) = decoder.decode(features, [DecodeRequest(language="en")])
    jfk = Jfk(loaded, tokenizer, audio, n_frames, decoder, features, result, [])
    jfk.words = jfk.align(result)
    return jfk


@pytest.fixture(scope="module")
def openai_words(jfk: Jfk) -> tuple[list[int], list[dict[str, Any]]]:
    """openai-whisper's transcribe of the same clip: its tokens and its timed words."""
    out = whisper.transcribe(
        jfk.loaded.model, jfk.audio, word_timestamps=True, temperature=0.0, fp16=False
    )
    segments = out["segments"]
    assert isinstance(segments, list)
    tokens = [t for seg in segments for t in seg["tokens"]]
    return tokens, [w for seg in segments for w in seg["words"]]


def test_words_spell_the_decoded_text(jfk: Jfk) -> None:
    text = "".join(w.word for w in jfk.words)
    print(f"\n[tiny.en jfk] {len(jfk.words)} words: {text!r}")
    assert len(jfk.words) == 22
    assert text.replace(" ", "") == jfk.result.text.replace(" ", "")
    # each word points at its first token, which decodes to the start of the word
    for w in jfk.words:
        first = jfk.tokenizer.decode([jfk.result.tokens[w.first_token]])
        assert w.word.strip().startswith(first.strip())
        assert 0 < w.probability <= 1


def test_times_are_ordered_and_inside_the_clip(jfk: Jfk) -> None:
    previous_end = 0.0
    for w in jfk.words:
        assert previous_end <= w.start <= w.end, w
        previous_end = w.end
    assert jfk.words[0].start >= 0.0
    assert jfk.words[-1].end <= jfk.duration_s
    assert jfk.words[-1].end > jfk.words[0].start  # not all collapsed to one instant
    # frames past `n_frames` are never used: told the window holds 6 s, every word fits in 6 s
    r = jfk.result
    short = align_words(jfk.tokenizer, r.tokens, r.token_logprobs, r.alignment_qk, 600)
    assert [w.word for w in short] == [w.word for w in jfk.words]
    assert max(w.end for w in short) <= 6.0


def test_words_land_near_their_true_times(jfk: Jfk) -> None:
    americans = next(w for w in jfk.words if w.word.strip(" ,") == "Americans")
    not_ = next(w for w in jfk.words if w.word.strip() == "not")
    last = jfk.words[-1]
    print(
        f"\n[tiny.en jfk] 'Americans' {americans.start:.2f}-{americans.end:.2f} s "
        f"(spoken {AMERICANS_S[0]}-{AMERICANS_S[1]}), 'not' from {not_.start:.2f} s "
        f"(spoken {NOT_START_S}), '{last.word.strip()}' ends {last.end:.2f} s "
        f"(spoken {LAST_WORD_END_S})"
    )
    assert last.word.strip(" .") == "country"
    assert abs(americans.start - AMERICANS_S[0]) < TRUE_TIME_TOLERANCE_S
    assert abs(americans.end - AMERICANS_S[1]) < TRUE_TIME_TOLERANCE_S
    assert abs(not_.start - NOT_START_S) < TRUE_TIME_TOLERANCE_S
    assert abs(last.end - LAST_WORD_END_S) < TRUE_TIME_TOLERANCE_S


def test_close_to_openai_word_timestamps(
    jfk: Jfk, openai_words: tuple[list[int], list[dict[str, Any]]]
) -> None:
    their_tokens, theirs = openai_words
    assert list(jfk.result.tokens) == their_tokens  # same decode, so the words pair up
    assert [w.word for w in jfk.words] == [w["word"] for w in theirs]
    start_diffs = np.array(
        [abs(a.start - b["start"]) for a, b in zip(jfk.words, theirs, strict=True)]
    )
    end_diffs = np.array([abs(a.end - b["end"]) for a, b in zip(jfk.words, theirs, strict=True)])
    print(
        f"\n[tiny.en jfk] vs openai-whisper word timestamps over {len(theirs)} words: "
        f"start mean {start_diffs.mean():.4f} s (max {start_diffs.max():.2f}), "
        f"end mean {end_diffs.mean():.4f} s (max {end_diffs.max():.2f})"
    )
    assert start_diffs.mean() < VS_OPENAI_MEAN_S
    assert end_diffs.mean() < VS_OPENAI_MEAN_S


def test_prefill_attention_times_words_as_decode_steps_do(jfk: Jfk) -> None:
    """With the tokens as draft, every score comes from the prefill instead of decode steps."""
    (drafted,) = jfk.decoder.decode(
        jfk.features, [DecodeRequest(language="en", draft=jfk.result.tokens)]
    )
    assert drafted.tokens == jfk.result.tokens
    assert drafted.stats.forward_passes == 1
    words = jfk.align(drafted)
    assert [w.word for w in words] == [w.word for w in jfk.words]
    diff = max(
        max(abs(a.start - b.start), abs(a.end - b.end))
        for a, b in zip(words, jfk.words, strict=True)
    )
    print(f"\n[tiny.en jfk] words from prefill vs decode-step attention: max diff {diff:.3f} s")
    assert diff <= FRAME_S


def test_nothing_to_align_gives_no_words(jfk: Jfk) -> None:
    heads = jfk.result.alignment_qk.shape[0]
    empty = np.zeros((heads, 1, 1500), dtype=np.float32)
    assert align_words(jfk.tokenizer, (), (), empty, jfk.n_frames) == []
    # timestamps alone are no words
    ts = jfk.tokenizer.timestamp_begin
    only_timestamps = np.zeros((heads, 3, 1500), dtype=np.float32)
    assert (
        align_words(jfk.tokenizer, (ts, ts + 50), (-0.1, -0.1, -0.1), only_timestamps, 1100) == []
    )
    # no real audio frames
    r = jfk.result
    assert align_words(jfk.tokenizer, r.tokens, r.token_logprobs, r.alignment_qk, 1) == []
