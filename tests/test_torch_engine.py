"""`TorchEngine` (static KV cache, per-row positions) against openai-whisper's own forward.

tiny.en on three real clips, one clip per batch row, with ragged prompts (2, 5 and 9 tokens):

1. prefill logits, then several `decode_step`s at per-row positions, equal openai-whisper's full
   teacher-forced forward `model.logits(tokens, features)` (fp32, max abs diff < 1e-4);
2. the batch equals each row run alone; `first_logit` only slices;
3. the alignment heads' scores have the documented shapes, equal openai-whisper's cross-attention
   `qk` for those heads, and a decode step gives the same scores as a prefill at that position
   (what makes word timing from decode-time attention valid);
4. the cache is allocated once: its storage never moves, and what a decode step allocates does
   not depend on the position it writes;
5. bad shapes raise `EngineError`.

Run with `pytest -s` to see the measured differences.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from whisper.audio import log_mel_spectrogram, pad_or_trim
from whisper.model import disable_sdpa

from streamd.audio import load_audio
from streamd.engine.protocol import PrefillOutput, StepOutput
from streamd.engine.torch_engine import TorchEngine
from streamd.errors import DecodeCancelled, EngineError
from streamd.models.loader import LoadedModel, load_model
from tests.audio_fixtures import shared_audio_dir

pytestmark = pytest.mark.slow

CLIPS = ("en/jfk.flac", "en/librispeech_a_man_said.flac", "en/librispeech_mister_quilter.flac")
PROMPT_LENGTHS = (2, 5, 9)  # ragged: each row of the batch has its own prefill length
N_STEPS = 4  # decode steps after the prefill
MAX_BATCH = 4
VS_OPENAI = 1e-4  # fp32, our decoder vs openai-whisper's (different kernels, same math)
# batched vs one row alone, prefill vs decode step: same weights and math, other matmul shapes;
# fp32 rounding only (measured <= 3.6e-5 on logits of magnitude up to ~30, ~1e-6 relative)
VS_OURS = 5e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Setup:
    loaded: LoadedModel
    engine: TorchEngine
    features: torch.Tensor  # [3, 1500, 384], one clip per row
    sequences: list[list[int]]  # per row: PROMPT_LENGTHS[i] + N_STEPS real tokens
    reference: list[torch.Tensor]  # per row: openai's logits over the whole sequence [n, V]


@pytest.fixture(scope="module")
def setup() -> Setup:
    loaded = load_model("tiny.en")
    with warnings.catch_warnings():
        # openai-whisper reads its .tiktoken vocabulary without closing the file
        warnings.simplefilter("ignore", ResourceWarning)
        tokenizer = loaded.tokenizer()
    audio_dir = shared_audio_dir()
    mel = torch.stack(
        [
            log_mel_spectrogram(pad_or_trim(load_audio(audio_dir / clip)), loaded.dims.n_mels)
            for clip in CLIPS
        ]
    )
    engine = TorchEngine(loaded.model, loaded.alignment_heads, max_batch=MAX_BATCH)
    features = engine.encode(mel)
    with torch.inference_mode():
        assert torch.equal(features, loaded.model.encoder(mel))  # the encoder is openai's own

    texts = (
        " And so my fellow Americans, ask not what your country can do for you",
        " A man said to the universe, Sir, I exist.",
        " Nor is Mr. Quilter's manner less interesting than his matter.",
    )
    sot = list(tokenizer.sot_sequence_including_notimestamps)
    sequences = []
    for text, length in zip(texts, PROMPT_LENGTHS, strict=True):
        seq = (sot + tokenizer.encode(text))[: length + N_STEPS]
        assert len(seq) == length + N_STEPS
        sequences.append(seq)
    with torch.inference_mode():
        reference = [
            loaded.model.logits(torch.tensor([seq]), features[i : i + 1])[0]
            for i, seq in enumerate(sequences)
        ]
    return Setup(loaded, engine, features, sequences, reference)


def _padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] (pad 0, a real token: padding must not matter) and lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    tokens = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.tensor(seq)
    return tokens, lengths


def _prefill_then_steps(
    engine: TorchEngine, features: torch.Tensor, sequences: list[list[int]], prompt: list[int]
) -> tuple[PrefillOutput, list[StepOutput]]:
    """Prefill the first prompt[i] tokens of each row, then feed the rest one step at a time."""
    tokens, lengths = _padded([seq[:n] for seq, n in zip(sequences, prompt, strict=True)])
    out = engine.prefill(tokens, lengths, features)
    steps = []
    for k in range(N_STEPS):
        step_tokens = torch.tensor([[seq[n + k]] for seq, n in zip(sequences, prompt, strict=True)])
        steps.append(engine.decode_step(step_tokens, torch.tensor(prompt) + k))
    return out, steps


def _openai_alignment_qk(
    loaded: LoadedModel, seq: list[int], features: torch.Tensor
) -> torch.Tensor:
    """openai-whisper's cross-attention qk of the alignment heads for one row, [A, T, 1500]."""
    qks: dict[int, torch.Tensor] = {}

    def record(layer: int) -> Callable[..., None]:
        def hook(_module: object, _inputs: object, outputs: tuple[torch.Tensor, ...]) -> None:
            qks[layer] = outputs[-1]  # (out, qk); qk [1, H, T, 1500]

        return hook

    hooks = []
    for layer, block in enumerate(loaded.model.decoder.blocks):
        assert block.cross_attn is not None
        hooks.append(block.cross_attn.register_forward_hook(record(layer)))
    try:
        with torch.inference_mode(), disable_sdpa():  # openai returns qk only without SDPA
            loaded.model.logits(torch.tensor([seq]), features)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([qks[layer][0, head] for layer, head in loaded.alignment_heads]).float()


def test_prefill_and_decode_steps_match_openai_forward(setup: Setup) -> None:
    out, steps = _prefill_then_steps(
        setup.engine, setup.features, setup.sequences, list(PROMPT_LENGTHS)
    )
    n_vocab, rows = setup.engine.n_vocab, len(CLIPS)
    assert out.logits.shape == (rows, max(PROMPT_LENGTHS), n_vocab)
    assert out.logits.dtype == torch.float32
    prefill_diff = step_diff = 0.0
    for i, (n, ref) in enumerate(zip(PROMPT_LENGTHS, setup.reference, strict=True)):
        prefill_diff = max(prefill_diff, float((out.logits[i, :n] - ref[:n]).abs().max()))
        for k, step in enumerate(steps):
            assert step.logits.shape == (rows, n_vocab)
            step_diff = max(step_diff, float((step.logits[i] - ref[n + k]).abs().max()))
            # and the model's own prediction comes out: the logits are not merely close
            assert int(step.logits[i].argmax()) == int(ref[n + k].argmax())
    print(
        f"\n[tiny.en] max abs logit diff vs openai-whisper: prefill {prefill_diff:.2e}, "
        f"{N_STEPS} decode steps at per-row positions {step_diff:.2e}"
    )
    assert prefill_diff < VS_OPENAI
    assert step_diff < VS_OPENAI


def test_batch_equals_rows_run_alone(setup: Setup) -> None:
    prompt = list(PROMPT_LENGTHS)
    batched, batched_steps = _prefill_then_steps(
        setup.engine, setup.features, setup.sequences, prompt
    )
    diff = 0.0
    for i, n in enumerate(PROMPT_LENGTHS):
        alone, alone_steps = _prefill_then_steps(
            setup.engine, setup.features[i : i + 1], [setup.sequences[i]], [n]
        )
        diff = max(
            diff,
            float((alone.logits[0] - batched.logits[i, :n]).abs().max()),
            float((alone.alignment_qk[0] - batched.alignment_qk[i, :, :n]).abs().max()),
        )
        for a, b in zip(alone_steps, batched_steps, strict=True):
            diff = max(
                diff,
                float((a.logits[0] - b.logits[i]).abs().max()),
                float((a.alignment_qk[0] - b.alignment_qk[i]).abs().max()),
            )
    print(f"\n[tiny.en] batched vs one row alone, max abs diff (logits, scores): {diff:.2e}")
    assert diff < VS_OURS


def test_first_logit_only_slices(setup: Setup) -> None:
    tokens, lengths = _padded(setup.sequences)
    full = setup.engine.prefill(tokens, lengths, setup.features)
    for first in (1, 5, tokens.shape[1] - 1):
        part = setup.engine.prefill(tokens, lengths, setup.features, first_logit=first)
        assert part.logits.shape == (len(CLIPS), tokens.shape[1] - first, setup.engine.n_vocab)
        torch.testing.assert_close(part.logits, full.logits[:, first:], rtol=0, atol=VS_OURS)
        # the scores still cover every token: word timing needs the accepted draft's rows
        assert torch.equal(part.alignment_qk, full.alignment_qk)


def test_alignment_scores_equal_openai_cross_attention(setup: Setup) -> None:
    """The scores are openai-whisper's pre-softmax cross-attention `qk` of the alignment heads."""
    tokens, lengths = _padded(setup.sequences)
    out = setup.engine.prefill(tokens, lengths, setup.features)
    n_heads = len(setup.loaded.alignment_heads)
    assert setup.engine.n_alignment_heads == n_heads
    assert out.alignment_qk.shape == (len(CLIPS), n_heads, tokens.shape[1], 1500)
    assert out.alignment_qk.dtype == torch.float32

    diff = 0.0
    for i, seq in enumerate(setup.sequences):
        theirs = _openai_alignment_qk(setup.loaded, seq, setup.features[i : i + 1])
        diff = max(diff, float((out.alignment_qk[i, :, : len(seq)] - theirs).abs().max()))
    print(f"\n[tiny.en] alignment scores vs openai cross-attention qk: max abs diff {diff:.2e}")
    assert diff < VS_OPENAI


def test_decode_step_scores_equal_prefill_scores_at_same_position(setup: Setup) -> None:
    """Word timing mixes prefill rows (accepted draft) and decode-step rows: they must agree."""
    prompt = list(PROMPT_LENGTHS)
    tokens, lengths = _padded(setup.sequences)
    whole = setup.engine.prefill(tokens, lengths, setup.features)
    _, steps = _prefill_then_steps(setup.engine, setup.features, setup.sequences, prompt)
    diff = logit_diff = 0.0
    for k, step in enumerate(steps):
        assert step.alignment_qk.shape == (len(CLIPS), setup.engine.n_alignment_heads, 1500)
        for i, n in enumerate(prompt):
            diff = max(
                diff, float((step.alignment_qk[i] - whole.alignment_qk[i, :, n + k]).abs().max())
            )
            logit_diff = max(
                logit_diff, float((step.logits[i] - whole.logits[i, n + k]).abs().max())
            )
    print(
        f"\n[tiny.en] decode step vs prefill at the same position, max abs diff: "
        f"scores {diff:.2e}, logits {logit_diff:.2e}"
    )
    assert diff < VS_OURS
    # the logits differ a little more: a step attends through a mask over all 448 cache slots
    assert logit_diff < VS_OPENAI
    # scores that could not tell positions apart would pass the above trivially
    assert float((whole.alignment_qk[:, :, 1] - whole.alignment_qk[:, :, 0]).abs().max()) > 1.0


def _cache_pointers(engine: TorchEngine) -> list[int]:
    return [t.data_ptr() for t in (engine.self_k, engine.self_v, engine.cross_k, engine.cross_v)]


def _bytes_allocated(engine: TorchEngine, positions: list[int]) -> tuple[int, int]:
    """(total, largest) bytes the CPU allocator hands out during one decode step."""
    tokens = torch.full((len(positions), 1), 50256, dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.decode_step(tokens, torch.tensor(positions))
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return sum(sizes), max(sizes)


def test_kv_cache_is_preallocated(setup: Setup) -> None:
    engine = setup.engine
    n_layer, d = setup.loaded.dims.n_text_layer, setup.loaded.dims.n_text_state
    h = engine.n_head
    assert engine.self_k.shape == engine.self_v.shape == (n_layer, MAX_BATCH, h, 448, d // h)
    assert engine.cross_k.shape == engine.cross_v.shape == (n_layer, MAX_BATCH, h, 1500, d // h)
    before = _cache_pointers(engine)
    _prefill_then_steps(engine, setup.features, setup.sequences, list(PROMPT_LENGTHS))
    assert _cache_pointers(engine) == before
    engine.prefill(torch.full((1, 1), 50257), torch.ones(1, dtype=torch.long), setup.features[:1])
    early = _bytes_allocated(engine, [1])
    late = _bytes_allocated(engine, [447])
    assert _cache_pointers(engine) == before

    tokens, lengths = _padded(setup.sequences)
    engine.prefill(tokens, lengths, setup.features)
    rows_early = _bytes_allocated(engine, [9, 10, 11])
    rows_late = _bytes_allocated(engine, [300, 400, 447])
    print(
        f"\n[tiny.en] bytes allocated per decode step (total, largest): 1 row at position 1 "
        f"{early}, at 447 {late}; 3 rows at 9-11 {rows_early}, at 300-447 {rows_late}"
    )
    # nothing in a step grows with the sequence: same allocations at position 1 and 447
    assert early == late
    assert rows_early == rows_late
    assert early[0] > 0  # the profiler did see the step's allocations
    assert _cache_pointers(engine) == before


def test_encode_stops_between_layers_when_cancelled(setup: Setup) -> None:
    encoder = setup.loaded.model.encoder
    mel = torch.zeros(1, setup.loaded.dims.n_mels, 3000)
    cancel = threading.Event()
    ran: list[int] = []

    def record(layer: int) -> Callable[..., None]:
        def hook(*_: object) -> None:
            ran.append(layer)
            if layer == 1:
                cancel.set()  # as the driver's thread would, during the second layer

        return hook

    hooks = [b.register_forward_hook(record(i)) for i, b in enumerate(encoder.blocks)]
    try:
        with pytest.raises(DecodeCancelled):
            setup.engine.encode(mel, cancel)
        assert ran == [0, 1] < list(range(len(encoder.blocks)))  # no layer after it
        ran.clear()
        setup.engine.encode(mel, threading.Event())  # not set: every layer
        assert ran == list(range(len(encoder.blocks)))
    finally:
        for h in hooks:
            h.remove()


def test_bad_shapes_raise_engine_error(setup: Setup) -> None:
    engine = setup.engine
    features = setup.features
    one = torch.ones(1, dtype=torch.long)

    fresh = TorchEngine(setup.loaded.model, setup.loaded.alignment_heads, max_batch=2)
    with pytest.raises(EngineError, match="after prefill"):
        fresh.decode_step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    too_many = features[:1].expand(3, -1, -1)
    with pytest.raises(EngineError, match="rows"):
        fresh.prefill(
            torch.zeros(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long), too_many
        )

    for mel in (torch.zeros(1, 80, 2999), torch.zeros(80, 3000), torch.zeros(1, 128, 3000)):
        with pytest.raises(EngineError, match="mel must be"):
            engine.encode(mel)
    with pytest.raises(EngineError, match="prefill length"):
        engine.prefill(torch.zeros(1, 449, dtype=torch.long), torch.tensor([449]), features[:1])
    with pytest.raises(EngineError, match="prefill length"):
        engine.prefill(torch.zeros(1, 0, dtype=torch.long), torch.tensor([0]), features[:1])
    with pytest.raises(EngineError, match="features"):
        engine.prefill(
            torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long), features
        )
    with pytest.raises(EngineError, match="lengths"):
        engine.prefill(torch.zeros(1, 3, dtype=torch.long), torch.tensor([4]), features[:1])
    with pytest.raises(EngineError, match="lengths"):
        engine.prefill(torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]), features[:1])

    engine.prefill(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 2]), features[:2])
    step = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(EngineError, match="positions must be"):
        engine.decode_step(step, torch.tensor([3, 448]))
    with pytest.raises(EngineError, match="positions must be"):
        engine.decode_step(step, torch.tensor([-1, 3]))
    with pytest.raises(EngineError, match="after prefill"):  # rows differ from the prefill's
        engine.decode_step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(EngineError, match="after prefill"):  # not one token per row
        engine.decode_step(torch.zeros(2, 2, dtype=torch.long), torch.tensor([3, 3]))
    with pytest.raises(EngineError, match="after prefill"):
        engine.decode_step(step, torch.tensor([[3], [3]]))
    # the last valid position still works
    assert engine.decode_step(step, torch.tensor([447, 2])).logits.shape == (2, engine.n_vocab)
    # a new prefill starts over: decode steps must now match its single row
    engine.prefill(torch.zeros(1, 1, dtype=torch.long), one, features[:1])
    with pytest.raises(EngineError, match="after prefill"):
        engine.decode_step(step, torch.tensor([1, 1]))


@pytest.mark.parametrize(
    "case",
    [
        "features of another model's width",
        "tokens without a batch dimension",
        "negative first_logit",
        "first_logit past the last token",
    ],
)
def test_malformed_prefill_raises_engine_error(setup: Setup, case: str) -> None:
    engine, features = setup.engine, setup.features[:1]
    tokens, lengths = torch.zeros(1, 3, dtype=torch.long), torch.tensor([3])
    first_logit = 0
    match case:
        case "features of another model's width":
            features = torch.zeros(1, 1500, 512)  # base's d_model into a tiny.en engine
        case "tokens without a batch dimension":
            tokens = tokens[0]
        case "negative first_logit":
            first_logit = -1
        case "first_logit past the last token":
            first_logit = 3
    with pytest.raises(EngineError):
        engine.prefill(tokens, lengths, features, first_logit=first_logit)
