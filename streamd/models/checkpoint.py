"""The common form every weight source is converted to before it becomes a torch module."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class WhisperCheckpoint:
    """Weights in openai-whisper's layout.

    dims: the fields of `whisper.model.ModelDimensions`.
    state_dict: `Whisper.state_dict()` names -> float32 arrays (numpy or torch).
    alignment_heads: `(decoder layer, head)` pairs used for word timestamps.
    """

    dims: dict[str, int]
    state_dict: dict[str, np.ndarray | torch.Tensor]
    alignment_heads: tuple[tuple[int, int], ...]


def default_alignment_heads(dims: dict[str, int]) -> tuple[tuple[int, int], ...]:
    """openai-whisper's fallback: every head of the second half of the decoder layers."""
    n_layer, n_head = dims["n_text_layer"], dims["n_text_head"]
    return tuple((layer, head) for layer in range(n_layer // 2, n_layer) for head in range(n_head))
