"""The narrow interface every inference backend implements (torch CPU/CUDA, Neuron, fakes).

Static shapes by design (DESIGN.md §3): Neuron compiles one graph per shape, so callers think in
fixed buckets. Tensor conventions, B = batch rows, A = alignment heads:

- mel:       float32 [B, n_mels, F]      log-mel, F = 3000 for a 30 s window (zero-padded), or
                                         a smaller even bucket (encoder context buckets)
- features:  float32 [B, F / 2, d]       encoder output (n_audio_ctx = 1500 for 30 s)
- tokens:    int64   [B, T]              T <= n_text_ctx (448), rows right-padded
- lengths:   int64   [B]                 real tokens per row
- positions: int64   [B]                 where each row's next token goes in the KV cache
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class PrefillOutput:
    """logits: float32 [B, T - first_logit, V]: next-token logits for positions first_logit..T-1.
    alignment_qk: float32 [B, A, T, F / 2]: pre-softmax cross-attention scores of the
    alignment heads (DTW word timing wants them unnormalised, to softmax over real frames only).
    """

    logits: torch.Tensor
    alignment_qk: torch.Tensor


@dataclass(frozen=True)
class StepOutput:
    """logits: float32 [B, V]; alignment_qk: float32 [B, A, F / 2] for the fed token."""

    logits: torch.Tensor
    alignment_qk: torch.Tensor


class Engine(Protocol):
    """A Whisper runtime with a preallocated decoder KV cache for up to `max_batch` rows.

    Call order per decode: `encode` (any time) -> `prefill` (fills cross-attention K/V and the
    self-attention cache for positions < T) -> any number of `decode_step` for the same rows.
    A new `prefill` starts a new decode and invalidates the previous cache contents.
    """

    n_mels: int
    n_audio_ctx: int
    n_text_ctx: int
    n_vocab: int
    max_batch: int
    n_alignment_heads: int

    def encode(self, mel: torch.Tensor, cancel: threading.Event | None = None) -> torch.Tensor:
        """mel [B, n_mels, F] -> features [B, F / 2, d]; F = 2 * n_audio_ctx is a full window.

        cancel: when set, stop with `DecodeCancelled` at the next point the engine can
        (`streamd.engine.cancel`): between layers on torch, before the graph on Neuron."""
        ...

    def prefill(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        features: torch.Tensor,
        first_logit: int = 0,
    ) -> PrefillOutput:
        """Run every token of every row at once, caching K/V; see `PrefillOutput`."""
        ...

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        """Feed one token per row at `positions` (per row), after a `prefill` of the same rows."""
        ...
