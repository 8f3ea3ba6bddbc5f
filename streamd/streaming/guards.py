"""Hallucination guards: decide which words of a window's hypothesis to believe.

Whisper loops on murmur and near-silence ("Thank you. Thank you.", one word over and over). The
VAD keeps most of that audio away; these rules catch what gets through, and each one is counted
so that operators can see what is being dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from streamd.streaming.agreement import word_key
from streamd.streaming.window import HypWord, WindowResult

# Known Whisper hallucinations (subtitle credits and sign-offs learned from its training data).
# Dropped only when the evidence for them is weak: a speaker may really say "thank you".
HALLUCINATION_PHRASES = (
    "thank you for watching",
    "thanks for watching",
    "please subscribe",
    "subscribe to my channel",
    "like and subscribe",
    "subtitles by",
    "amara.org",
    "see you in the next video",
    "thank you",
    "you",
    "bye",
    "yeah",  # on applause: JFK's clip tail, word probability 0.09-0.15, no_speech 0.50
    "yes",  # the same applause, decoded 0.4 s after its last voiced frame: probability 0.09
    "ご視聴ありがとうございました",
    "ご覧いただきありがとうございます",
    "チャンネル登録",
    "おやすみなさい",
)

# compared without spaces or punctuation: Japanese has no spaces, and Whisper's word split varies
_PHRASE_KEYS = frozenset(word_key(p) for p in HALLUCINATION_PHRASES)


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds of the guards; openai-whisper's defaults where it has one."""

    no_speech_prob: float = 0.6  # with avg_logprob below `logprob`: the window holds no speech
    logprob: float = -1.0
    compression_ratio: float = 2.4  # gzip ratio of the text above this: a loop
    repeat_ngram_max: int = 4  # look for word n-grams up to this long...
    repeat_times: int = 3  # ...repeated this many times in a row
    echo_words: int = 3  # the window's first forced words written again: it started over
    echo_chars: int = 12  # or more than echo_words of them, verbatim, this many characters long
    doubtful_probability: float = 0.3  # mean word probability; with avg_logprob < logprob
    edge_s: float = 0.15  # a word starting this close to the end of the audio...
    min_word_s: float = 0.03  # ...and shorter than this was not heard
    max_tokens_per_s: float = 12.0  # fast speech is ~5-7 tokens/s; above this is a runaway
    token_slack: int = 8  # tokens allowed on top of the rate, for very short windows
    weak_logprob: float = -0.7  # "weak evidence" for the phrase list
    weak_no_speech_prob: float = 0.3
    weak_word_probability: float = 0.5


@dataclass
class GuardStats:
    """How often each guard fired (words dropped per guard)."""

    dropped_words: Counter[str] = field(default_factory=Counter)

    def count(self, guard: str, words: int) -> None:
        if words:
            self.dropped_words[guard] += words


def _loop_start(words: list[HypWord], config: GuardConfig) -> int | None:
    """Index where a run of `repeat_times` identical n-grams starts (keeping one copy), or None."""
    keys = [word_key(w.word) for w in words]
    for n in range(1, config.repeat_ngram_max + 1):
        for i in range(len(keys) - n * config.repeat_times + 1):
            gram = keys[i : i + n]
            if not any(gram):
                continue
            if all(
                keys[i + k * n : i + (k + 1) * n] == gram for k in range(1, config.repeat_times)
            ):
                return i + n  # keep the first occurrence, cut the repeats
    return None


def _is_known_phrase(words: list[HypWord]) -> bool:
    """The whole hypothesis is one known hallucination (a real sentence merely containing
    "thank you" is left alone)."""
    squashed = "".join(word_key(w.word) for w in words)
    return squashed in _PHRASE_KEYS


def _echo_start(
    words: list[HypWord], forced: list[HypWord], min_words: int, min_chars: int
) -> int | None:
    """Index where `words` start the window over: its first `min_words` forced words again.

    With committed words forced at the start of the window, Whisper sometimes "starts over" and
    writes them again after the prefix: "fellow Americans. And so my fellow Americans." Only a
    repeat of the window's *beginning* counts: speakers repeat phrases ("ask not what your
    country can do for you, ask what you can do for your country").
    """
    done = [word_key(w.word) for w in forced]
    new = [word_key(w.word) for w in words]
    head = done[:min_words]
    for i in range(len(new)):
        if len(head) == min_words and any(head) and new[i : i + min_words] == head:
            return i
        if _longest_run(new, i, done, min_chars) > min_words:
            return i
    return None


def _longest_run(new: list[str], i: int, done: list[str], min_chars: int) -> int:
    """Words in the longest run of `done`, verbatim, that `new` has from index `i`; 0 unless
    that run is at least `min_chars` characters: a longer verbatim run of earlier words,
    anywhere, is a re-reading too, but a few Japanese words are a few characters, and a talker
    says "ちゃんと聞こえてんの" twice in a row (seen: the guard then dropped every later word)."""
    best = 0
    for j in range(len(done)):
        k = 0
        while i + k < len(new) and j + k < len(done) and new[i + k] == done[j + k]:
            k += 1
        best = max(best, k)
    # characters grow with the run, so only the longest run can pass
    return best if len("".join(new[i : i + best])) >= min_chars else 0


def apply_guards(
    result: WindowResult,
    uncommitted_audio_s: float,
    config: GuardConfig,
    stats: GuardStats,
    forced: list[HypWord] | None = None,
    window_end_s: float | None = None,
) -> list[HypWord]:
    """The words of `result` worth believing; drops are counted in `stats` by guard name.

    forced: the committed words the window starts with (its forced prefix).
    window_end_s: where the window's audio ends (stream time).
    """
    words = list(result.words)
    if not words:
        return words
    # judged on the whole hypothesis too: a cut below can leave a known phrase's first word
    # ("ご" of "ご視聴ありがとうございました", the rest squeezed past the audio's end)
    known_whole = _is_known_phrase(words) and _weak(result, words, config)
    if result.no_speech_prob > config.no_speech_prob and result.avg_logprob < config.logprob:
        stats.count("no_speech", len(words))
        return []
    if window_end_s is not None:
        # Words the alignment squeezed into nothing at the very end of the audio were not
        # heard: Whisper wrote on past what it was given ("Ask not. Ask not." at the end).
        for i, w in enumerate(words):
            edge = w.start >= window_end_s - config.edge_s
            if edge and w.end - w.start < config.min_word_s:
                stats.count("beyond_audio", len(words) - i)
                words = words[:i]
                break
    mean_probability = sum(w.probability for w in words) / len(words) if words else 1.0
    if result.avg_logprob < config.logprob and mean_probability < config.doubtful_probability:
        # what the model wrote it does not believe itself: a breath, noise, a stray syllable
        stats.count("low_confidence", len(words))
        return []
    echo = _echo_start(words, forced or [], config.echo_words, config.echo_chars)
    if echo is not None:
        stats.count("echo", len(words) - echo)
        words = words[:echo]
    # a loop may continue from committed words: look at them too, cut only the new part
    context = list(forced or [])[-config.repeat_ngram_max * config.repeat_times :]
    cut = _loop_start(context + words, config)
    if cut is not None:
        cut = max(cut - len(context), 0)
    if cut is None and result.compression_ratio > config.compression_ratio:
        cut = len(words) // 2  # a loop we could not localise: keep the part before it
    if cut is not None:
        stats.count("repetition", len(words) - cut)
        words = words[:cut]
    budget = int(config.max_tokens_per_s * uncommitted_audio_s) + config.token_slack
    used = 0
    for i, w in enumerate(words):
        used += len(w.tokens)
        if used > budget:
            stats.count("token_rate", len(words) - i)
            words = words[:i]
            break
    if words and (known_whole or (_is_known_phrase(words) and _weak(result, words, config))):
        stats.count("phrase", len(words))
        return []
    return words


def _weak(result: WindowResult, words: list[HypWord], config: GuardConfig) -> bool:
    """The evidence for `words` is weak enough to drop them if they are a known phrase."""
    mean_probability = sum(w.probability for w in words) / len(words)
    return (
        result.avg_logprob < config.weak_logprob
        or result.no_speech_prob > config.weak_no_speech_prob
        or mean_probability < config.weak_word_probability
    )
