"""Whisper's logit rules for one row, built on openai-whisper's own `LogitFilter`s.

Rows of one batch can have different prompts (and so different `sample_begin`), so the filters
are built per row and applied to `[1, V]` views; the rules themselves are openai-whisper's, which
keeps our greedy output token-for-token equal to its `decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from whisper.decoding import ApplyTimestampRules, LogitFilter, SuppressBlank, SuppressTokens
from whisper.tokenizer import Tokenizer

# openai-whisper's default: the first timestamp may be at most 1 s into the window
MAX_INITIAL_TIMESTAMP_S = 1.0
TIMESTAMP_PRECISION_S = 0.02


def suppressed_tokens(tokenizer: Tokenizer) -> tuple[int, ...]:
    """openai-whisper's `suppress_tokens="-1"`: non-speech symbols plus the special tokens."""
    tokens = set(tokenizer.non_speech_tokens)
    tokens.update(
        [
            tokenizer.transcribe,
            tokenizer.translate,
            tokenizer.sot,
            tokenizer.sot_prev,
            tokenizer.sot_lm,
        ]
    )
    if tokenizer.no_speech is not None:
        tokens.add(tokenizer.no_speech)  # its probability is read separately, at the SOT position
    return tuple(sorted(tokens))


@dataclass(frozen=True)
class RowRules:
    """The filters for one row whose sampled tokens start at `sample_begin`."""

    filters: tuple[LogitFilter, ...]

    @classmethod
    def build(cls, tokenizer: Tokenizer, sample_begin: int, timestamps: bool) -> RowRules:
        filters: list[LogitFilter] = [
            SuppressBlank(tokenizer, sample_begin),
            SuppressTokens(suppressed_tokens(tokenizer)),
        ]
        if timestamps:
            max_index = round(MAX_INITIAL_TIMESTAMP_S / TIMESTAMP_PRECISION_S)
            filters.append(ApplyTimestampRules(tokenizer, sample_begin, max_index))
        return cls(tuple(filters))

    def apply(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Mask `logits` [V] in place given every token so far, `context` [n] (prefix included)."""
        row = logits[None]
        for f in self.filters:
            f.apply(row, context[None])
        return logits
