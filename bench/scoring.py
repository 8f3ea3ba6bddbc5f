"""Text scoring shared by the benchmarks: WER for English, CER for Japanese (DESIGN.md §7)."""

from __future__ import annotations

import unicodedata
import warnings

import jiwer
from whisper.normalizers import EnglishTextNormalizer

with warnings.catch_warnings():
    # openai-whisper reads its spelling table without closing the file
    warnings.simplefilter("ignore", ResourceWarning)
    _english = EnglishTextNormalizer()


def normalize(text: str, language: str) -> str:
    """English: openai-whisper's normalizer. Others: NFKC, no punctuation, no spaces."""
    if language == "en":
        return _english(text)
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if not unicodedata.category(c).startswith(("P", "Z", "S")))


def error_rate(references: list[str], hypotheses: list[str], language: str) -> float:
    """Corpus WER (en) or CER (other languages) over normalized texts."""
    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    if language == "en":
        return float(jiwer.wer(refs, hyps))
    return float(jiwer.cer(refs, hyps))
