"""LocalAgreement-2 on words: commit what two consecutive hypotheses agree on.

A word is final once two consecutive decodes of the growing window produce it at the same place
(the same words before it) and it ends before the unstable tail, the last stretch of audio where
the next syllables can still change it ("four" -> "fourteen").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from streamd.streaming.window import HypWord

MAX_OVERLAP_WORDS = 5


def word_key(word: str) -> str:
    """Compare words without case, spacing or punctuation ("Sir," == "sir")."""
    return re.sub(r"[^\w]", "", word.lower())


def agreed_prefix(previous: Sequence[HypWord], current: Sequence[HypWord]) -> int:
    """How many leading words the two hypotheses share."""
    n = 0
    for a, b in zip(previous, current, strict=False):
        if word_key(a.word) != word_key(b.word):
            break
        n += 1
    return n


def stable_count(
    words: Sequence[HypWord], n: int, stable_until_s: float, min_probability: float = 0.0
) -> int:
    """The first `n` words, less any that end inside the unstable tail, and cut before the first
    word the model itself doubts (two steps can agree on the same wrong split of a word:
    "context she" for "contextually"; such a word waits for more audio or the final)."""
    for i in range(n):
        if words[i].probability < min_probability:
            n = i
            break
    while n and words[n - 1].end > stable_until_s:
        n -= 1
    return n


def strip_overlap(committed: Sequence[HypWord], current: list[HypWord]) -> list[HypWord]:
    """Drop words at the start of `current` that repeat the end of `committed`.

    After the window is trimmed at a committed word's end, word-time estimates are never exact:
    the last committed word can be heard again at the start of the next window. Whisper then
    writes it again; the longest such repeat (up to MAX_OVERLAP_WORDS) is removed.
    """
    keys_done = [word_key(w.word) for w in committed[-MAX_OVERLAP_WORDS:]]
    keys_new = [word_key(w.word) for w in current[:MAX_OVERLAP_WORDS]]
    for n in range(min(len(keys_done), len(keys_new)), 0, -1):
        if keys_done[-n:] == keys_new[:n] and any(keys_new[:n]):
            return current[n:]
    return current
