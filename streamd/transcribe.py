"""Offline transcription of whole files: sequential 30 s windows with timestamp-based seeking.

The windowing follows openai-whisper's `transcribe` (greedy, conditioned on previous text, the
no-speech skip rule), so its output is comparable token for token; the work runs on our engine
(static KV cache, no logits for prompt positions) and words come from decode-time attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from streamd.audio import SAMPLE_RATE
from streamd.decoding.greedy import DecodeRequest, DecodeResult, GreedyDecoder
from streamd.decoding.result import Segment, Transcript, Word
from streamd.decoding.segments import WindowSplit, split_window
from streamd.decoding.word_timing import align_words
from streamd.engine.protocol import Engine
from streamd.engine.torch_engine import TorchEngine
from streamd.errors import ConfigError
from streamd.models.loader import LoadedModel

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
# A window quieter than this (RMS, dBFS) holds no speech: skip it rather than let Whisper
# hallucinate on it ("Thank you.", "you"). Speech, even quiet speech, is tens of dB louder.
SILENCE_RMS_DBFS = -60.0
# openai-whisper resets the prompt after a high-temperature fallback; we are greedy, so only the
# length bound applies: the prompt is the last n_text_ctx/2 - 1 tokens of earlier text.


@dataclass(frozen=True)
class TranscribeOptions:
    """language: ISO code or None to detect from the first window; prompt: initial vocabulary."""

    language: str | None = None
    task: str = "transcribe"
    prompt: str | None = None
    word_timestamps: bool = False
    condition_on_previous_text: bool = True
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0


ProgressCallback = Callable[[int, int], None]  # (frames done, frames total)


class Transcriber:
    """Transcribes whole recordings with one model; reuse it across files."""

    def __init__(self, model: LoadedModel, engine: Engine | None = None) -> None:
        self.model = model
        self.engine: Engine = engine or TorchEngine(model.model, model.alignment_heads)
        self.decoder = GreedyDecoder(self.engine, model.tokenizer, model.is_multilingual)

    def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> Transcript:
        """Transcribe 16 kHz mono float32 `audio` of any length."""
        options = options or TranscribeOptions()
        language = _language_code(options.language)
        if language not in (None, "en") and not self.model.is_multilingual:
            raise ConfigError(
                f"model {self.model.name} is English-only; cannot transcribe "
                f"{options.language!r} (use a multilingual model such as `base`)"
            )
        duration_s = len(audio) / SAMPLE_RATE
        if len(audio) == 0:
            return Transcript("", (), language or "en", 0.0)
        mel = log_mel_spectrogram(
            torch.from_numpy(audio), self.model.dims.n_mels, padding=N_SAMPLES
        )
        content_frames = mel.shape[-1] - N_FRAMES
        prompt: list[int] = []
        if options.prompt:
            prompt = self.model.tokenizer(language or "en").encode(" " + options.prompt.strip())
        segments: list[Segment] = []
        seek = 0
        _report(progress, 0, content_frames)
        while seek < content_frames:
            window_frames = min(N_FRAMES, content_frames - seek)
            start_sample = seek * HOP_LENGTH
            chunk = audio[start_sample : start_sample + window_frames * HOP_LENGTH]
            if _rms_dbfs(chunk) < SILENCE_RMS_DBFS:
                seek += window_frames
                _report(progress, seek, content_frames)
                continue
            features = self.engine.encode(
                pad_or_trim(mel[:, seek : seek + window_frames], N_FRAMES)[None]
            )
            if language is None:
                language = self.decoder.detect_language(features)[0][0]
            request = DecodeRequest(
                prompt=tuple(prompt) if options.condition_on_previous_text or seek == 0 else (),
                language=language,
                task=options.task,
            )
            result = self.decoder.decode(features, [request])[0]
            if _is_silence(result, options):
                seek += window_frames
                _report(progress, seek, content_frames)
                continue
            offset_s = seek / FRAMES_PER_SECOND
            split = split_window(result.tokens, self._timestamp_begin(language), window_frames)
            new = self._segments(result, split, offset_s, window_frames, len(segments), options)
            segments.extend(new)
            for seg in new:
                prompt.extend(seg.tokens)
            seek += split.consumed_frames
            _report(progress, seek, content_frames)
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, tuple(segments), language or "en", duration_s)

    def _timestamp_begin(self, language: str | None) -> int:
        return int(self.model.tokenizer(language).timestamp_begin)

    def _segments(
        self,
        result: DecodeResult,
        split: WindowSplit,
        offset_s: float,
        window_frames: int,
        first_id: int,
        options: TranscribeOptions,
    ) -> list[Segment]:
        tokenizer = self.model.tokenizer(result.language, options.task)
        words = []
        if options.word_timestamps:
            words = align_words(
                tokenizer, result.tokens, result.token_logprobs, result.alignment_qk, window_frames
            )
        out: list[Segment] = []
        for span in split.spans:
            tokens = result.tokens[span.first : span.last]
            text = tokenizer.decode([t for t in tokens if t < tokenizer.eot])
            if span.start_s == span.end_s or not text.strip():
                continue  # openai-whisper clears instantaneous or empty segments too
            if not any(ch.isalnum() for ch in text):
                continue  # ". . ." on noise: nothing a reader could use, and not speech
            seg_words = tuple(
                Word(w.word, offset_s + w.start, offset_s + w.end, w.probability)
                for w in words
                if span.first <= w.first_token < span.last
            )
            out.append(
                Segment(
                    id=first_id + len(out),
                    start=round(offset_s + span.start_s, 3),
                    # a timestamp past the real audio (padding) is cut at the window's end
                    end=round(offset_s + min(span.end_s, window_frames / FRAMES_PER_SECOND), 3),
                    text=text,
                    tokens=tokens,
                    avg_logprob=result.avg_logprob,
                    no_speech_prob=result.no_speech_prob,
                    compression_ratio=result.compression_ratio,
                    words=seg_words,
                )
            )
        return out


def _language_code(language: str | None) -> str | None:
    """ISO code for `language` given as a code or an English name, any case; None stays None."""
    if language is None:
        return None
    key = language.strip().lower()
    code = TO_LANGUAGE_CODE.get(key, key)
    if code not in LANGUAGES:
        raise ConfigError(
            f"unknown language {language!r}; use an ISO code such as en, ja, de, or a name "
            "such as english"
        )
    return code


def _is_silence(result: DecodeResult, options: TranscribeOptions) -> bool:
    """openai-whisper's rule: likely no speech, unless the text is confidently decoded."""
    return (
        result.no_speech_prob > options.no_speech_threshold
        and result.avg_logprob <= options.logprob_threshold
    )


def _rms_dbfs(samples: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20 * np.log10(max(rms, 1e-10))


def _report(progress: ProgressCallback | None, done: int, total: int) -> None:
    if progress is not None:
        progress(min(done, total), total)
