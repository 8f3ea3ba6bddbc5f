"""`WindowDecoder`: runs batches of `WindowRequest`s on an engine and returns their words.

This is the torch side of the session/engine boundary: log-mel, the encoder, greedy decoding
with the forced prefix and the draft, and word times from the alignment heads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import torch
from whisper.audio import N_SAMPLES, log_mel_spectrogram

from streamd.audio import SAMPLE_RATE
from streamd.decoding.greedy import DecodeRequest, GreedyDecoder
from streamd.decoding.word_timing import align_words
from streamd.engine.protocol import Engine
from streamd.engine.torch_engine import TorchEngine
from streamd.errors import ConfigError, EngineError
from streamd.models.loader import LoadedModel
from streamd.streaming.window import HypWord, WindowRequest, WindowResult

HOP_SAMPLES = 160
# Encoder context buckets (DESIGN.md §3): a window is encoded padded to the smallest of these
# that holds it. (10, 20, 30) makes a step ~35% cheaper, but on our English stream it cost
# 1-2 more word errors per 150 and Whisper writes past the audio far more often (the guards
# catch it, at the price of decoder passes); docs/benchmarks.md has the numbers. Quality first
# by default: always 30 s, but for an utterance's first look (below). `--encoder-buckets
# 10,20,30` trades it for capacity.
DEFAULT_BUCKETS_S = (30,)
# An utterance's first look: a partial step with no draft (nothing of it decoded since its
# start or its last commit). Its words are only shown, or committed once a full-context step
# agrees with them, and a draft changes no greedy result, only its cost; so it may take a
# small context and come sooner (one corner: a first look that heard the whole utterance is
# its final, docs/streaming.md).
# base on 2 cores: Japanese first partials 0.56 s instead of 2.34 s after the talker starts,
# finals' text the same on all eight evaluation streams (docs/streaming.md, "First look").
DEFAULT_FIRST_LOOK_BUCKETS_S = (10, 20, 30)


class WindowDecoder:
    """Decodes windows from any number of sessions; one instance per engine."""

    def __init__(
        self,
        model: LoadedModel,
        engine: Engine | None = None,
        buckets_s: tuple[int, ...] = DEFAULT_BUCKETS_S,
        encoder_precision: str = "fp32",
        first_look_buckets_s: tuple[int, ...] = DEFAULT_FIRST_LOOK_BUCKETS_S,
    ) -> None:
        """encoder_precision: fp32 or bf16 for the torch engine built when `engine` is None
        (`streamd.engine.precision.resolve_encoder_precision` turns "auto" into one).
        first_look_buckets_s: the buckets of a batch of first looks (`is_first_look`); empty:
        encode them like any other window."""
        self.model = model
        self.buckets_s = self.check_buckets(buckets_s)
        self.first_look_buckets_s = (
            self.check_buckets(first_look_buckets_s, "first_look_buckets_s")
            if first_look_buckets_s
            else ()
        )
        self.engine: Engine = engine or TorchEngine(
            model.model, model.alignment_heads, encoder_precision=encoder_precision
        )
        self.decoder = GreedyDecoder(self.engine, model.tokenizer, model.is_multilingual)

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    def check_buckets(
        self, buckets_s: tuple[int, ...], setting: str = "encoder_buckets_s"
    ) -> tuple[int, ...]:
        """`buckets_s` sorted, or ConfigError naming `setting`: positive, the largest being the
        full context."""
        full_s = 2 * self.model.dims.n_audio_ctx * HOP_SAMPLES // SAMPLE_RATE
        if not buckets_s or max(buckets_s) != full_s or min(buckets_s) <= 0:
            raise ConfigError(
                f"{setting} must be positive and end at {full_s} s, got {list(buckets_s)}"
            )
        return tuple(sorted(buckets_s))

    def warm_up(self) -> float:
        """Decode one second of faint noise once; return how long that took, in seconds.

        The first decode of a process pays for lazy initialisation (kernel selection,
        buffers). A live driver calls this before its clock starts, so that the first
        talker's first finals do not pay for it (docs/streaming.md, "Shape of the code").
        """
        noise = np.random.default_rng(0).normal(0, 0.01, SAMPLE_RATE).astype(np.float32)
        warm = WindowRequest("warmup", 0, ((0, 0),), noise, (), (), (), "en", "transcribe", True)
        started = time.monotonic()
        self.decode([warm])
        if self.first_look_buckets_s:  # and the smallest context, which a first look takes
            self.decode([replace(warm, final=False)])
        return time.monotonic() - started

    def decode(
        self,
        requests: list[WindowRequest],
        buckets_s: tuple[int, ...] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[WindowResult]:
        """Results in request order; batches of up to `max_batch` windows share each pass.

        buckets_s: encoder context buckets for this call (checked `check_buckets` ones);
        default: the decoder's own.
        cancel: when set (from another thread), the decode stops at the engine's next check
        with `DecodeCancelled` (`streamd.engine.cancel`).
        """
        out: list[WindowResult] = []
        for start in range(0, len(requests), self.max_batch):
            batch = requests[start : start + self.max_batch]
            out.extend(self._decode_batch(batch, self._buckets(batch, buckets_s), cancel))
        return out

    def _buckets(
        self, batch: list[WindowRequest], buckets_s: tuple[int, ...] | None
    ) -> tuple[int, ...]:
        """The call's buckets (or the decoder's own), and a first look's too if every request
        of the batch is one: a batch is encoded at one context."""
        chosen = buckets_s or self.buckets_s
        if self.first_look_buckets_s and all(is_first_look(r) for r in batch):
            return tuple(sorted({*chosen, *self.first_look_buckets_s}))
        return chosen

    def _decode_batch(
        self,
        requests: list[WindowRequest],
        buckets_s: tuple[int, ...],
        cancel: threading.Event | None,
    ) -> list[WindowResult]:
        for r in requests:
            if not 0 < len(r.audio) <= N_SAMPLES:
                raise EngineError(f"window of {len(r.audio)} samples: must be 1..{N_SAMPLES}")
        longest_s = max(len(r.audio) for r in requests) / SAMPLE_RATE
        bucket_s = next(b for b in buckets_s if b >= longest_s)
        frames = bucket_s * SAMPLE_RATE // HOP_SAMPLES
        mel = torch.stack(
            [
                log_mel_spectrogram(
                    torch.from_numpy(r.audio), self.model.dims.n_mels, padding=N_SAMPLES
                )[:, :frames]
                for r in requests
            ]
        )
        features = self.engine.encode(mel, cancel)
        decoded = self.decoder.decode(
            features,
            [
                DecodeRequest(
                    prompt=r.prompt,
                    forced=r.forced,
                    draft=r.draft,
                    language=r.language,
                    task=r.task,
                    without_timestamps=True,
                    max_tokens=r.max_tokens,
                )
                for r in requests
            ],
            cancel,
        )
        results = []
        for r, d in zip(requests, decoded, strict=True):
            tokenizer = self.model.tokenizer(d.language if self.model.is_multilingual else None)
            timed = align_words(
                tokenizer,
                (*d.forced, *d.tokens),
                (*d.forced_logprobs, *d.token_logprobs),
                d.alignment_qk,
                len(r.audio) // HOP_SAMPLES,
            )
            words = tuple(
                HypWord(
                    w.word,
                    # a word whose alignment starts before its piece (in a cut-out gap) starts
                    # with the piece
                    max(r.to_stream_s(w.start), r.piece_start_s(w.end)),
                    r.to_stream_s(w.end),
                    w.probability,
                    w.tokens,
                )
                for w in timed
                if w.first_token >= len(d.forced)
            )
            results.append(
                WindowResult(
                    request_id=r.request_id,
                    words=words,
                    language=d.language,
                    avg_logprob=d.avg_logprob,
                    no_speech_prob=d.no_speech_prob,
                    compression_ratio=d.compression_ratio,
                    forward_passes=d.stats.forward_passes,
                    draft_tokens=d.stats.draft_tokens,
                    accepted_tokens=d.stats.accepted_tokens,
                )
            )
        return results


def is_first_look(request: WindowRequest) -> bool:
    """A partial step with nothing of its utterance decoded since the utterance's start or its
    last commit: no draft to verify, not a probe, not a final (`DEFAULT_FIRST_LOOK_BUCKETS_S`)."""
    return not request.final and not request.probe and not request.draft
