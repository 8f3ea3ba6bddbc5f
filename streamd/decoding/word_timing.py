"""Word timestamps from the alignment heads' cross-attention, collected while decoding.

openai-whisper re-runs the decoder over the final text to get these scores; we already have them:
the engine returns the alignment heads' scores at every position that predicted a token (prefill
for accepted draft tokens, decode steps for the rest), so no extra pass is needed. The DTW, the
median filter and the punctuation merging are openai-whisper's own (`whisper.timing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from whisper.audio import TOKENS_PER_SECOND
from whisper.timing import WordTiming, dtw, median_filter, merge_punctuations
from whisper.tokenizer import Tokenizer

MEDFILT_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
# a word longer than this many median word durations at a sentence edge is clipped (openai rule)
MAX_DURATION_MEDIANS = 2.0


@dataclass(frozen=True)
class TimedWord:
    """A word, window-relative times in seconds, mean token probability, its tokens, and the
    index (into the tokens given to `align_words`) of its first token, which tells which segment
    it belongs to."""

    word: str
    start: float
    end: float
    probability: float
    first_token: int
    tokens: tuple[int, ...] = ()


def align_words(
    tokenizer: Tokenizer,
    tokens: tuple[int, ...],
    token_logprobs: tuple[float, ...],
    alignment_qk: np.ndarray,
    n_frames: int,
) -> list[TimedWord]:
    """Words of the sampled `tokens` with times relative to the window start.

    alignment_qk: [A, len(tokens) + 1, n_audio_ctx] (see `DecodeResult`); n_frames: mel frames
    of real audio in the window (attention beyond them is padding and is ignored).
    """
    text_idx = [i for i, t in enumerate(tokens) if t < tokenizer.eot]
    if not text_idx or n_frames < 2:
        return []
    text_tokens = [tokens[i] for i in text_idx]
    # the row that predicted each text token, plus the one after the last (what followed it)
    rows = [*text_idx, text_idx[-1] + 1]
    weights = torch.from_numpy(alignment_qk[:, rows, : n_frames // 2]).float().softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / (std + 1e-10), MEDFILT_WIDTH)
    text_indices, time_indices = dtw(-weights.mean(dim=0))

    words, word_tokens = tokenizer.split_to_word_tokens([*text_tokens, tokenizer.eot])
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    probs = np.exp(np.asarray([token_logprobs[i] for i in text_idx]))
    timings = [
        WordTiming(w, list(t), float(jump_times[a]), float(jump_times[b]), float(probs[a:b].mean()))
        for w, t, a, b in zip(
            words[:-1], word_tokens[:-1], boundaries[:-1], boundaries[1:], strict=True
        )
    ]
    _clip_long_edges(timings)
    merge_punctuations(timings, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
    out: list[TimedWord] = []
    consumed = 0  # text tokens before this word: merged words stay contiguous and in order
    for t in timings:
        if t.word:
            first = text_idx[consumed]
            start, end = round(t.start, 3), round(t.end, 3)
            out.append(
                TimedWord(t.word, start, end, round(t.probability, 4), first, tuple(t.tokens))
            )
        consumed += len(t.tokens)
    return out


def _clip_long_edges(timings: list[WordTiming]) -> None:
    """Alignment often stretches the word before a pause; cap it as openai-whisper does."""
    durations = np.array([t.end - t.start for t in timings])
    durations = durations[durations.nonzero()]
    if durations.size == 0:
        return
    max_duration = min(0.7, float(np.median(durations))) * MAX_DURATION_MEDIANS
    sentence_end = set(".。!！?？")
    for i in range(1, len(timings)):
        if timings[i].end - timings[i].start > max_duration:
            if timings[i].word in sentence_end:
                timings[i].end = timings[i].start + max_duration
            elif timings[i - 1].word in sentence_end:
                timings[i].start = timings[i].end - max_duration
