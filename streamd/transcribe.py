"""Offline transcription of whole files: sequential 30 s windows with timestamp-based seeking.

The windowing follows openai-whisper's `transcribe` (greedy, conditioned on previous text, the
no-speech skip rule), so its output is comparable token for token; the work runs on our engine
(static KV cache, no logits for prompt positions) and words come from decode-time attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

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


@dataclass
class _FileJob:
    """One recording's progress through its windows (mutable; internal to `Transcriber`)."""

    audio: np.ndarray
    mel: torch.Tensor
    content_frames: int
    language: str | None
    prompt: list[int]
    seek: int = 0
    segments: list[Segment] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames

    @property
    def window_frames(self) -> int:
        return min(N_FRAMES, self.content_frames - self.seek)

    def window_is_silent(self) -> bool:
        start = self.seek * HOP_LENGTH
        return _rms_dbfs(self.audio[start : start + self.window_frames * HOP_LENGTH]) < (
            SILENCE_RMS_DBFS
        )

    def transcript(self, default_language: str | None) -> Transcript:
        text = "".join(s.text for s in self.segments).strip()
        language = self.language or default_language or "en"
        return Transcript(text, tuple(self.segments), language, len(self.audio) / SAMPLE_RATE)

    def window_mel(self) -> torch.Tensor:
        return pad_or_trim(self.mel[:, self.seek : self.seek + self.window_frames], N_FRAMES)


class Transcriber:
    """Transcribes whole recordings with one model; reuse it across files.

    Windows of one file depend on each other (the next starts where the last timestamp ended and
    is prompted with the text so far), but windows of different files do not: `transcribe_many`
    decodes the current window of every file as one batch. A decode step at batch size B costs
    little more than at 1 on CPU (it is bound by reading the 51,864-row vocabulary projection),
    so a folder of files is transcribed several times faster than file by file, with output
    identical to transcribing each file alone.
    """

    def __init__(
        self, model: LoadedModel, engine: Engine | None = None, encoder_precision: str = "fp32"
    ) -> None:
        """encoder_precision: fp32 or bf16 for the torch engine built when `engine` is None."""
        self.model = model
        self.engine: Engine = engine or TorchEngine(
            model.model, model.alignment_heads, encoder_precision=encoder_precision
        )
        self.decoder = GreedyDecoder(self.engine, model.tokenizer, model.is_multilingual)

    def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> Transcript:
        """Transcribe 16 kHz mono float32 `audio` of any length."""
        return next(self.transcribe_many([audio], options, progress))

    def transcribe_many(
        self,
        audios: Iterable[np.ndarray],
        options: TranscribeOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> Iterator[Transcript]:
        """Transcripts of several recordings, in input order, their windows batched together.

        At most `engine.max_batch` recordings are held at once: the next is taken from `audios`
        (which may be a lazy generator) when one finishes, so memory stays bounded for any
        number of files. `progress` gets (frames done, frames of the recordings taken so far).
        """
        options = options or TranscribeOptions()
        language = language_code(options.language)
        if language not in (None, "en") and not self.model.is_multilingual:
            raise ConfigError(
                f"model {self.model.name} is English-only; cannot transcribe "
                f"{options.language!r} (use a multilingual model such as `base`)"
            )
        source = iter(audios)
        active: list[tuple[int, _FileJob]] = []
        finished: dict[int, Transcript] = {}
        taken = emitted = done_frames = total_frames = 0
        exhausted = False
        _report(progress, 0, 0)
        while True:
            while not exhausted and len(active) < self.engine.max_batch:
                audio = next(source, None)
                if audio is None:
                    exhausted = True
                    break
                job = self._new_job(audio, language, options)
                total_frames += job.content_frames
                active.append((taken, job))
                taken += 1
            for _, job in active:
                while not job.done and job.window_is_silent():
                    job.seek += job.window_frames  # no speech here: costs nothing
            if ready := [j for _, j in active if not j.done]:
                self._step(ready, options)
            for index, job in [(i, j) for i, j in active if j.done]:
                finished[index] = job.transcript(language)
                done_frames += job.content_frames
                active.remove((index, job))
            in_flight = sum(min(j.seek, j.content_frames) for _, j in active)
            _report(progress, done_frames + in_flight, total_frames)
            while emitted in finished:
                yield finished.pop(emitted)
                emitted += 1
            if exhausted and not active:
                return

    def _new_job(
        self, audio: np.ndarray, language: str | None, options: TranscribeOptions
    ) -> _FileJob:
        mel = log_mel_spectrogram(
            torch.from_numpy(audio), self.model.dims.n_mels, padding=N_SAMPLES
        )
        prompt: list[int] = []
        if options.prompt:
            prompt = self.model.tokenizer(language or "en").encode(" " + options.prompt.strip())
        content_frames = mel.shape[-1] - N_FRAMES if len(audio) else 0
        return _FileJob(audio, mel, content_frames, language, prompt)

    def _step(self, jobs: list[_FileJob], options: TranscribeOptions) -> None:
        """Decode the current window of each job as one batch and advance each job."""
        features = self.engine.encode(torch.stack([j.window_mel() for j in jobs]))
        undetected = [i for i, j in enumerate(jobs) if j.language is None]
        if undetected:
            detected = self.decoder.detect_language(features[undetected])
            for i, (lang, _) in zip(undetected, detected, strict=True):
                jobs[i].language = lang
        requests = [
            DecodeRequest(
                prompt=tuple(j.prompt) if options.condition_on_previous_text or j.seek == 0 else (),
                language=j.language,
                task=options.task,
            )
            for j in jobs
        ]
        for job, result in zip(jobs, self.decoder.decode(features, requests), strict=True):
            if _is_silence(result, options):
                job.seek += job.window_frames
                continue
            split = split_window(
                result.tokens, self._timestamp_begin(job.language), job.window_frames
            )
            new = self._segments(
                result,
                split,
                job.seek / FRAMES_PER_SECOND,
                job.window_frames,
                len(job.segments),
                options,
            )
            job.segments.extend(new)
            for seg in new:
                job.prompt.extend(seg.tokens)
            job.seek += split.consumed_frames

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


def language_code(language: str | None) -> str | None:
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
