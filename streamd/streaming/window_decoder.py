"""`WindowDecoder`: runs batches of `WindowRequest`s on an engine and returns their words.

This is the torch side of the session/engine boundary: log-mel, the encoder, greedy decoding
with the forced prefix and the draft, and word times from the alignment heads.
"""

from __future__ import annotations

import torch
from whisper.audio import N_SAMPLES, log_mel_spectrogram

from streamd.decoding.greedy import DecodeRequest, GreedyDecoder
from streamd.decoding.word_timing import align_words
from streamd.engine.protocol import Engine
from streamd.engine.torch_engine import TorchEngine
from streamd.errors import EngineError
from streamd.models.loader import LoadedModel
from streamd.streaming.window import HypWord, WindowRequest, WindowResult

HOP_SAMPLES = 160


class WindowDecoder:
    """Decodes windows from any number of sessions; one instance per engine."""

    def __init__(self, model: LoadedModel, engine: Engine | None = None) -> None:
        self.model = model
        self.engine: Engine = engine or TorchEngine(model.model, model.alignment_heads)
        self.decoder = GreedyDecoder(self.engine, model.tokenizer, model.is_multilingual)

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    def decode(self, requests: list[WindowRequest]) -> list[WindowResult]:
        """Results in request order; batches of up to `max_batch` windows share each pass."""
        out: list[WindowResult] = []
        for start in range(0, len(requests), self.max_batch):
            out.extend(self._decode_batch(requests[start : start + self.max_batch]))
        return out

    def _decode_batch(self, requests: list[WindowRequest]) -> list[WindowResult]:
        for r in requests:
            if not 0 < len(r.audio) <= N_SAMPLES:
                raise EngineError(f"window of {len(r.audio)} samples: must be 1..{N_SAMPLES}")
        mel = torch.stack(
            [
                log_mel_spectrogram(
                    torch.from_numpy(r.audio), self.model.dims.n_mels, padding=N_SAMPLES
                )[:, : 2 * self.engine.n_audio_ctx]
                for r in requests
            ]
        )
        features = self.engine.encode(mel)
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
                )
                for r in requests
            ],
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
                    w.word, r.to_stream_s(w.start), r.to_stream_s(w.end), w.probability, w.tokens
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
