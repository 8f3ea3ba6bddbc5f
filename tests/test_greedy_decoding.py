"""`GreedyDecoder` on `TorchEngine` against openai-whisper's own `whisper.decode`, on real clips.

1. tiny.en, three English clips in one batch, with and without timestamps: the same tokens and
   text, avg_logprob and no_speech_prob within 1e-4; per-row prompts of different lengths in one
   batch give what openai-whisper gives for each row with `DecodingOptions(prompt=...)`.
2. base with language detection on Japanese and English: the same, language 'ja' / 'en'; the
   language probabilities are openai-whisper's `detect_language`.
3. Draft verification: the previous tokens as draft give the same tokens in exactly one forward
   pass; a draft that goes wrong half way costs one pass per token after the accepted prefix.
4. Sampling (temperature > 0) is reproducible for one seed, and the seed matters.
5. A decode that runs into the 448-token context stops where openai-whisper's does; more
   requests than engine rows come back in order.

Run with `pytest -s` to see the forward passes saved.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import whisper
from whisper.audio import log_mel_spectrogram, pad_or_trim
from whisper.decoding import DecodingOptions, DecodingResult

from streamd.audio import load_audio
from streamd.decoding.greedy import DecodeRequest, DecodeResult, GreedyDecoder
from streamd.engine.protocol import StepOutput
from streamd.engine.torch_engine import TorchEngine
from streamd.errors import DecodeCancelled, EngineError
from streamd.models.loader import LoadedModel, load_model
from tests.audio_fixtures import shared_audio_dir

pytestmark = pytest.mark.slow

EN_CLIPS = ("en/jfk.flac", "en/librispeech_a_man_said.flac", "en/librispeech_mister_quilter.flac")
JA_CLIP = "ja/reazonspeech_test_ja_2.wav"
JFK = "en/jfk.flac"
TOLERANCE = 1e-4  # avg_logprob and no_speech_prob, fp32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Model:
    loaded: LoadedModel
    decoder: GreedyDecoder
    mel: torch.Tensor  # [B, n_mels, 3000], one clip per row
    features: torch.Tensor  # [B, 1500, d]
    # without_timestamps -> (our plain greedy results, openai-whisper's), computed on first use
    plain: dict[bool, tuple[list[DecodeResult], list[DecodingResult]]] = field(default_factory=dict)


def _model(name: str, clips: tuple[str, ...]) -> Model:
    loaded = load_model(name)
    with warnings.catch_warnings():
        # openai-whisper reads its .tiktoken vocabulary without closing the file; load it here,
        # once (lru-cached), before openai-whisper's own decode asks for it
        warnings.simplefilter("ignore", ResourceWarning)
        loaded.tokenizer("ja" if loaded.is_multilingual else None)
    audio_dir = shared_audio_dir()
    mel = torch.stack(
        [
            log_mel_spectrogram(pad_or_trim(load_audio(audio_dir / clip)), loaded.dims.n_mels)
            for clip in clips
        ]
    )
    engine = TorchEngine(loaded.model, loaded.alignment_heads, max_batch=4)
    decoder = GreedyDecoder(engine, loaded.tokenizer, loaded.is_multilingual)
    return Model(loaded, decoder, mel, engine.encode(mel))


@pytest.fixture(scope="module")
def tiny() -> Model:
    return _model("tiny.en", EN_CLIPS)


@pytest.fixture(scope="module")
def base() -> Model:
    return _model("base", (JA_CLIP, JFK))


def _openai(model: Model, mel: torch.Tensor, **options: object) -> list[DecodingResult]:
    opts = DecodingOptions(fp16=False, temperature=0.0, **options)
    result = whisper.decode(model.loaded.model, mel, opts)
    return result if isinstance(result, list) else [result]


def _plain(
    model: Model, without_timestamps: bool
) -> tuple[list[DecodeResult], list[DecodingResult]]:
    """Greedy results for every clip of `model`, ours (one batch) and openai-whisper's."""
    if without_timestamps not in model.plain:
        request = DecodeRequest(language="en", without_timestamps=without_timestamps)
        ours = model.decoder.decode(model.features, [request] * model.features.shape[0])
        theirs = _openai(model, model.mel, language="en", without_timestamps=without_timestamps)
        model.plain[without_timestamps] = (ours, theirs)
    return model.plain[without_timestamps]


def _assert_same(ours: DecodeResult, theirs: DecodingResult, *, ends_with_eot: bool = True) -> None:
    assert list(ours.tokens) == theirs.tokens
    assert ours.text == theirs.text
    assert ours.language == theirs.language
    assert abs(ours.avg_logprob - theirs.avg_logprob) < TOLERANCE
    assert abs(ours.no_speech_prob - theirs.no_speech_prob) < TOLERANCE
    assert ours.compression_ratio == pytest.approx(theirs.compression_ratio)
    # one log-probability per sampled token (plus EOT's), and they make up the average
    assert len(ours.token_logprobs) == len(ours.tokens) + ends_with_eot
    assert ours.avg_logprob == pytest.approx(sum(ours.token_logprobs) / (len(ours.tokens) + 1))
    assert ours.alignment_qk.shape[1:] == (len(ours.tokens) + 1, 1500)


@pytest.mark.parametrize("without_timestamps", [True, False], ids=["no-timestamps", "timestamps"])
def test_greedy_equals_openai_decode(tiny: Model, without_timestamps: bool) -> None:
    ours, theirs = _plain(tiny, without_timestamps)
    assert len(ours) == len(theirs) == len(EN_CLIPS)
    for clip, a, b in zip(EN_CLIPS, ours, theirs, strict=True):
        print(
            f"\n[tiny.en {clip}] {a.text!r}: avg_logprob {a.avg_logprob:.6f} "
            f"(openai {b.avg_logprob:.6f}), no_speech_prob {a.no_speech_prob:.6f} "
            f"(openai {b.no_speech_prob:.6f})"
        )
        _assert_same(a, b)
        # plain greedy: the prefill predicts the first token, then one step per token
        assert a.stats.forward_passes == len(a.tokens) + 1
        assert (a.stats.draft_tokens, a.stats.accepted_tokens) == (0, 0)
        timestamps = [t for t in a.tokens if t >= tiny.loaded.tokenizer().timestamp_begin]
        assert bool(timestamps) is not without_timestamps
    assert "ask not what your country can do for you" in ours[0].text.lower()


def test_prompts_of_different_lengths_in_one_batch(tiny: Model) -> None:
    tokenizer = tiny.loaded.tokenizer()
    prompts = [
        tuple(tokenizer.encode(" President Kennedy's inaugural address, January 1961.")),
        (),
        tuple(tokenizer.encode(" Sir.")),
    ]
    requests = [DecodeRequest(prompt=p, language="en") for p in prompts]
    ours = tiny.decoder.decode(tiny.features, requests)
    for i, prompt in enumerate(prompts):
        (theirs,) = _openai(tiny, tiny.mel[i], language="en", prompt=list(prompt) or None)
        _assert_same(ours[i], theirs)
        # the sampled tokens start after <|startofprev|>, the prompt and the SOT sequence
        start = len(tokenizer.sot_sequence) + (len(prompt) + 1 if prompt else 0)
        assert ours[i].sample_begin == start
    plain, _ = _plain(tiny, without_timestamps=False)
    # the prompt did change the first decode, or this test would not show it is used
    assert ours[0].tokens != plain[0].tokens


def test_language_detection_and_decode_on_base(base: Model) -> None:
    detected = base.decoder.detect_language(base.features)
    assert [lang for lang, _ in detected] == ["ja", "en"]
    tokenizer = base.loaded.tokenizer()
    with torch.inference_mode():
        _, their_probs = base.loaded.model.detect_language(base.features, tokenizer)
    assert isinstance(their_probs, list)
    for (_, probs), theirs in zip(detected, their_probs, strict=True):
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert max(abs(probs[c] - theirs[c]) for c in theirs) < TOLERANCE

    ours = base.decoder.decode(base.features, [DecodeRequest(language=None)] * 2)
    theirs_results = _openai(base, base.mel, language=None)
    for a, b in zip(ours, theirs_results, strict=True):
        print(f"\n[base] {a.language}: {a.text!r}")
        _assert_same(a, b)
    assert [r.language for r in ours] == ["ja", "en"]
    assert "テスト" in ours[0].text
    assert "your country" in ours[1].text


@pytest.mark.parametrize("without_timestamps", [True, False], ids=["no-timestamps", "timestamps"])
def test_exact_draft_takes_one_forward_pass(tiny: Model, without_timestamps: bool) -> None:
    plain, theirs = _plain(tiny, without_timestamps)
    requests = [
        DecodeRequest(language="en", without_timestamps=without_timestamps, draft=r.tokens)
        for r in plain
    ]
    drafted = tiny.decoder.decode(tiny.features, requests)
    saved = 0
    for a, p, b in zip(drafted, plain, theirs, strict=True):
        _assert_same(a, b)
        assert a.tokens == p.tokens
        assert a.token_logprobs == pytest.approx(p.token_logprobs, abs=TOLERANCE)
        assert a.stats.forward_passes == 1
        assert a.stats.draft_tokens == a.stats.accepted_tokens == len(p.tokens)
        saved += p.stats.forward_passes - a.stats.forward_passes
    print(
        f"\n[tiny.en] exact drafts ({'no ' if without_timestamps else ''}timestamps): "
        f"{saved} forward passes saved over {len(EN_CLIPS)} clips "
        f"({sum(p.stats.forward_passes for p in plain)} -> {len(EN_CLIPS)})"
    )
    assert saved == sum(len(p.tokens) for p in plain)


@pytest.mark.parametrize("without_timestamps", [True, False], ids=["no-timestamps", "timestamps"])
def test_draft_wrong_after_half_costs_one_pass_per_remaining_token(
    tiny: Model, without_timestamps: bool
) -> None:
    plain, _ = _plain(tiny, without_timestamps)
    garbage = tuple(tiny.loaded.tokenizer().encode(" banana pancake tractor") * 20)
    drafts = []
    for r in plain:
        keep = len(r.tokens) // 2
        assert garbage[0] != r.tokens[keep]  # the draft really goes wrong at `keep`
        drafts.append(r.tokens[:keep] + garbage[: len(r.tokens) - keep])
    requests = [
        DecodeRequest(language="en", without_timestamps=without_timestamps, draft=d) for d in drafts
    ]
    drafted = tiny.decoder.decode(tiny.features, requests)
    saved = 0
    for a, p, draft in zip(drafted, plain, drafts, strict=True):
        assert a.tokens == p.tokens
        assert a.avg_logprob == pytest.approx(p.avg_logprob, abs=TOLERANCE)
        keep = len(p.tokens) // 2
        assert a.stats.draft_tokens == len(draft)
        assert a.stats.accepted_tokens == keep
        # the prefill gives the accepted prefix and the first token after it; each of the
        # len - keep tokens from there on is then fed by one decode step (the last step's
        # prediction is EOT)
        assert a.stats.forward_passes == 1 + (len(p.tokens) - keep)
        saved += p.stats.forward_passes - a.stats.forward_passes
    print(
        f"\n[tiny.en] half-right drafts ({'no ' if without_timestamps else ''}timestamps): "
        f"{saved} forward passes saved over {len(EN_CLIPS)} clips"
    )
    assert saved == sum(len(p.tokens) // 2 for p in plain)


def test_draft_running_past_the_end_stops_at_eot(tiny: Model) -> None:
    """A draft longer than the new hypothesis (the speaker said less) still costs one pass."""
    plain, _ = _plain(tiny, without_timestamps=False)
    extra = tuple(tiny.loaded.tokenizer().encode(" and more"))
    requests = [DecodeRequest(language="en", draft=r.tokens + extra) for r in plain]
    for a, p in zip(tiny.decoder.decode(tiny.features, requests), plain, strict=True):
        assert a.tokens == p.tokens
        assert a.stats.forward_passes == 1
        assert a.stats.accepted_tokens == len(p.tokens)
        assert a.stats.draft_tokens == len(p.tokens) + len(extra)


def test_sampling_is_seeded(tiny: Model) -> None:
    plain, _ = _plain(tiny, without_timestamps=False)
    rows = slice(1, None)  # the two short LibriSpeech clips keep this quick

    def sample(seed: int) -> list[DecodeResult]:
        # a draft is ignored when sampling: what was said before is not what this seed draws
        request = DecodeRequest(language="en", temperature=0.5, seed=seed, draft=plain[1].tokens)
        return tiny.decoder.decode(tiny.features[rows], [request] * 2)

    first, again, other = sample(0), sample(0), sample(1)
    assert [r.tokens for r in first] == [r.tokens for r in again]
    assert [r.token_logprobs for r in first] == [r.token_logprobs for r in again]
    assert [r.tokens for r in first] != [r.tokens for r in other]
    assert [r.tokens for r in first] != [r.tokens for r in plain[rows]]
    for r in first:
        assert r.stats.draft_tokens == r.stats.accepted_tokens == 0
        assert r.stats.forward_passes == len(r.tokens) + 1


def test_more_requests_than_engine_rows_come_back_in_order(tiny: Model) -> None:
    """Requests beyond the engine's max_batch go in further batches on the same cache."""
    plain, _ = _plain(tiny, without_timestamps=False)
    engine = TorchEngine(tiny.loaded.model, tiny.loaded.alignment_heads, max_batch=2)
    decoder = GreedyDecoder(engine, tiny.loaded.tokenizer, tiny.loaded.is_multilingual)
    # exact drafts keep it to one prefill per batch; language None: English-only model, so "en"
    requests = [DecodeRequest(draft=r.tokens) for r in plain]
    results = decoder.decode(tiny.features, requests)
    assert [r.tokens for r in results] == [r.tokens for r in plain]
    assert [r.language for r in results] == ["en"] * len(EN_CLIPS)
    assert [r.stats.forward_passes for r in results] == [1] * len(EN_CLIPS)
    for a, p in zip(results, plain, strict=True):
        assert a.no_speech_prob == pytest.approx(p.no_speech_prob, abs=TOLERANCE)


def test_feature_rows_must_match_requests(tiny: Model) -> None:
    with pytest.raises(EngineError, match="feature rows"):
        tiny.decoder.decode(tiny.features, [DecodeRequest(language="en")])


def test_decode_that_runs_into_the_context_limit_matches_openai(tiny: Model) -> None:
    """A full-length prompt (as conditioning on earlier text gives) and a repetition loop."""
    tokenizer = tiny.loaded.tokenizer()
    prompt = tuple(tokenizer.encode(" ha" * 300)[:223])  # the most openai keeps: n_ctx // 2 - 1
    (theirs,) = _openai(
        tiny, tiny.mel[0], language="en", without_timestamps=True, prompt=list(prompt)
    )
    prefix = 1 + len(prompt) + len(tokenizer.sot_sequence_including_notimestamps)
    assert len(theirs.tokens) == 448 + 1 - prefix  # the loop did run into the context limit
    # openai's tokens as draft: the whole decode is one prefill, and it must stop where openai did
    request = DecodeRequest(
        prompt=prompt, language="en", without_timestamps=True, draft=tuple(theirs.tokens)
    )
    (ours,) = tiny.decoder.decode(tiny.features[:1], [request])
    _assert_same(ours, theirs, ends_with_eot=False)


def test_forced_prefix_continues_like_plain_greedy(tiny: Model) -> None:
    """Forcing the first half of the greedy output yields exactly the second half."""
    plain = tiny.decoder.decode(
        tiny.features, [DecodeRequest(language="en", without_timestamps=True)] * 3
    )
    forced = [r.tokens[: len(r.tokens) // 2] for r in plain]
    out = tiny.decoder.decode(
        tiny.features,
        [DecodeRequest(language="en", without_timestamps=True, forced=f) for f in forced],
    )
    for p, f, o in zip(plain, forced, out, strict=True):
        assert o.forced == f
        assert f + o.tokens == p.tokens
        # forced tokens are scored too: the same log-probs greedy decoding gave them, except
        # that greedy's first token was also renormalised without blank/EOT (SuppressBlank)
        assert o.forced_logprobs[1:] == pytest.approx(p.token_logprobs[1 : len(f)], abs=1e-4)
        assert o.forced_logprobs[0] == pytest.approx(p.token_logprobs[0], abs=2e-3)
        assert o.alignment_qk.shape[1] == len(f) + len(o.tokens) + 1


class _StepCounting:
    """The tiny engine, counting decode steps and setting `cancel` after the `after`-th."""

    def __init__(self, engine: TorchEngine, cancel: threading.Event, after: int) -> None:
        self.engine, self.cancel, self.after = engine, cancel, after
        self.steps = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        self.steps += 1
        if self.steps == self.after:
            self.cancel.set()  # as the driver's thread would, while the decoder runs
        return self.engine.decode_step(tokens, positions)


def test_a_cancelled_decode_stops_at_the_next_decoder_pass(tiny: Model) -> None:
    plain, _ = _plain(tiny, without_timestamps=True)
    assert all(len(r.tokens) > 5 for r in plain)  # without a draft, one step per token
    cancel = threading.Event()
    engine = TorchEngine(tiny.loaded.model, tiny.loaded.alignment_heads, max_batch=4)
    counting = _StepCounting(engine, cancel, after=3)
    decoder = GreedyDecoder(
        counting,  # type: ignore[arg-type]  # the engine's members, through __getattr__
        tiny.loaded.tokenizer,
        tiny.loaded.is_multilingual,
    )
    request = DecodeRequest(language="en", without_timestamps=True)
    with pytest.raises(DecodeCancelled):
        decoder.decode(tiny.features, [request] * len(EN_CLIPS), cancel)
    assert counting.steps == 3  # no pass after the one during which it was cancelled
    # and a decode that is not cancelled is unchanged by the check
    results = decoder.decode(tiny.features, [request] * len(EN_CLIPS), threading.Event())
    assert [r.tokens for r in results] == [r.tokens for r in plain]
