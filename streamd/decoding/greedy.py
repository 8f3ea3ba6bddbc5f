"""Batched greedy decoding with Whisper's rules on any `Engine`, with draft verification.

Draft verification (DESIGN.md §3): a streaming session decodes its window again every step and
most of the last hypothesis comes out again. The previous tokens are fed as a *draft* in the one
prefill pass; every draft position then has its logits at once, the longest prefix on which the
greedy choice equals the draft is accepted (its K/V are already cached), and ordinary decode steps
continue from the first disagreement. The output is token-for-token what plain greedy decoding
gives; only the number of forward passes changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from whisper.tokenizer import Tokenizer
from whisper.utils import compression_ratio

from streamd.decoding.rules import RowRules
from streamd.engine.cancel import raise_if_cancelled
from streamd.engine.protocol import Engine
from streamd.errors import EngineError

# (language or None, task) -> tokenizer with that SOT sequence
TokenizerFactory = Callable[[str | None, str], Tokenizer]


@dataclass(frozen=True)
class DecodeRequest:
    """One window to decode; `features` row i of the batch goes with request i.

    prompt: earlier text tokens, sent after `<|startofprev|>` (the last n_text_ctx/2 - 1 kept).
    forced: tokens the output must start with (after the SOT sequence): text already committed
        for this window; they are prefilled, never re-decoded, and cannot change.
    draft: the previous hypothesis for this window (sampled tokens, no EOT); greedy only.
    language: ISO code, or None to detect it (multilingual models; English-only models use en).
    temperature: 0 is greedy; > 0 samples (seeded by `seed`), ignoring the draft.
    max_tokens: stop after this many sampled tokens (bounds the cost of a runaway loop).
    """

    prompt: tuple[int, ...] = ()
    forced: tuple[int, ...] = ()
    draft: tuple[int, ...] = ()
    language: str | None = None
    task: str = "transcribe"
    without_timestamps: bool = False
    temperature: float = 0.0
    seed: int = 0
    max_tokens: int | None = None


@dataclass(frozen=True)
class DecodeStats:
    """forward_passes: prefill + decode steps this row took part in (language detection apart).
    draft_tokens / accepted_tokens: how much of the draft was offered and how much was kept.
    """

    forward_passes: int
    draft_tokens: int
    accepted_tokens: int


@dataclass(frozen=True)
class DecodeResult:
    """tokens: sampled tokens without EOT (text and timestamp tokens).
    token_logprobs: log-probability of each sampled token (EOT's, if any, last and extra).
    forced / forced_logprobs: the request's forced tokens and their log-probabilities.
    alignment_qk: float32 [A, len(forced) + len(tokens) + 1, n_audio_ctx], the alignment heads'
    raw scores at the position that predicted each forced and sampled token (the last row
    predicted the token after them).
    """

    tokens: tuple[int, ...]
    text: str
    language: str
    sum_logprob: float
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    token_logprobs: tuple[float, ...]
    forced: tuple[int, ...]
    forced_logprobs: tuple[float, ...]
    alignment_qk: np.ndarray
    sample_begin: int
    stats: DecodeStats


@dataclass
class _Row:
    """Mutable per-row state while a batch decodes."""

    tokenizer: Tokenizer
    request: DecodeRequest
    prefix: list[int]
    rules: RowRules
    sot_index: int
    sample_len: int
    seq: list[int] = field(default_factory=list)
    # the same tokens as a preallocated tensor, so the rules get a view, not a new tensor per step
    seq_buffer: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    logprobs: list[float] = field(default_factory=list)
    align: list[torch.Tensor] = field(default_factory=list)
    forced_logprobs: list[float] = field(default_factory=list)
    done: bool = False
    pending: bool = False  # last token of `seq` still has to be fed through decode_step
    passes: int = 1
    accepted: int = 0
    generator: torch.Generator | None = None

    @property
    def sample_begin(self) -> int:
        return len(self.prefix)


class GreedyDecoder:
    """Decodes batches of windows on one engine; `tokenizer_for(lang, task)` gives tokenizers."""

    def __init__(self, engine: Engine, tokenizer_for: TokenizerFactory, multilingual: bool) -> None:
        self.engine = engine
        self.tokenizer_for = tokenizer_for
        self.multilingual = multilingual
        self.sample_len = engine.n_text_ctx // 2

    def detect_language(self, features: torch.Tensor) -> list[tuple[str, dict[str, float]]]:
        """Most likely language per row, and the probability of each language."""
        tokenizer = self.tokenizer_for(None, "transcribe")
        if not self.multilingual:
            return [("en", {"en": 1.0}) for _ in range(features.shape[0])]
        out: list[tuple[str, dict[str, float]]] = []
        for start in range(0, features.shape[0], self.engine.max_batch):
            chunk = features[start : start + self.engine.max_batch]
            rows = chunk.shape[0]
            tokens = torch.full((rows, 1), tokenizer.sot, dtype=torch.long)
            logits = self.engine.prefill(tokens, torch.ones(rows, dtype=torch.long), chunk).logits
            lang_ids = list(tokenizer.all_language_tokens)
            probs = logits[:, 0, lang_ids].softmax(dim=-1)
            codes = list(tokenizer.all_language_codes)
            for row in probs:
                scores = {c: float(p) for c, p in zip(codes, row.tolist(), strict=True)}
                out.append((codes[int(row.argmax())], scores))
        return out

    def decode(
        self,
        features: torch.Tensor,
        requests: list[DecodeRequest],
        cancel: threading.Event | None = None,
    ) -> list[DecodeResult]:
        """Decode each request against its row of `features` [B, n_audio_ctx, d].

        cancel: looked at before every engine call; when set, `DecodeCancelled`."""
        if features.shape[0] != len(requests):
            raise EngineError(f"{features.shape[0]} feature rows for {len(requests)} requests")
        languages = [r.language for r in requests]
        unknown = [i for i, lang in enumerate(languages) if lang is None]
        if unknown:
            detected = self.detect_language(features[unknown])
            for i, (lang, _) in zip(unknown, detected, strict=True):
                languages[i] = lang
        results: list[DecodeResult] = []
        step = self.engine.max_batch
        for start in range(0, len(requests), step):
            rows = [
                self._new_row(req, lang or "en")
                for req, lang in zip(
                    requests[start : start + step], languages[start : start + step], strict=True
                )
            ]
            results.extend(self._decode_batch(features[start : start + step], rows, cancel))
        return results

    def _new_row(self, request: DecodeRequest, language: str) -> _Row:
        tokenizer = self.tokenizer_for(language if self.multilingual else None, request.task)
        n_ctx = self.engine.n_text_ctx
        prefix: list[int] = []
        if request.prompt:
            prefix = [tokenizer.sot_prev, *request.prompt[-(n_ctx // 2 - 1) :]]
        sot_index = len(prefix)
        prefix.extend(tokenizer.sot_sequence)
        if request.without_timestamps:
            prefix.append(tokenizer.no_timestamps)
        prefix.extend(request.forced)
        # openai-whisper samples until the sequence is n_ctx + 1 long (the last token is never fed)
        sample_len = min(self.sample_len, n_ctx + 1 - len(prefix))
        if request.max_tokens is not None:
            sample_len = max(min(sample_len, request.max_tokens), 1)
        rules = RowRules.build(tokenizer, len(prefix), timestamps=not request.without_timestamps)
        row = _Row(tokenizer, request, prefix, rules, sot_index, sample_len, seq=list(prefix))
        row.seq_buffer = torch.zeros(n_ctx + 1, dtype=torch.long)
        row.seq_buffer[: len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        if request.temperature > 0:
            row.generator = torch.Generator().manual_seed(request.seed)
        return row

    def _choose(self, row: _Row, logits: torch.Tensor, align: torch.Tensor) -> int:
        """Apply the rules to one position's logits [V], pick and record the next token."""
        logits = row.rules.apply(logits.float().clone(), row.seq_buffer[: len(row.seq)])
        if row.generator is not None:
            probs = F.softmax(logits / row.request.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=row.generator))
        else:
            token = int(logits.argmax())
        row.logprobs.append(float(F.log_softmax(logits, dim=-1)[token]))
        row.align.append(align)
        eot = row.tokenizer.eot
        sampled = len(row.seq) - row.sample_begin
        if token == eot:
            row.done = True
        else:
            row.seq_buffer[len(row.seq)] = token
            row.seq.append(token)
            if sampled + 1 >= row.sample_len or len(row.seq) > self.engine.n_text_ctx:
                row.done = True  # out of room: keep what we have, as openai-whisper does
        return token

    def _decode_batch(
        self, features: torch.Tensor, rows: list[_Row], cancel: threading.Event | None
    ) -> list[DecodeResult]:
        drafts = [
            list(r.request.draft[: r.sample_len - 1]) if r.generator is None else [] for r in rows
        ]
        inputs = [r.prefix + d for r, d in zip(rows, drafts, strict=True)]
        lengths = torch.tensor([len(x) for x in inputs], dtype=torch.long)
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, x in enumerate(inputs):
            tokens[i, : len(x)] = torch.tensor(x)
        first = min(r.sot_index for r in rows)
        raise_if_cancelled(cancel)
        out = self.engine.prefill(tokens, lengths, features, first_logit=first)
        no_speech = []
        for i, (row, draft) in enumerate(zip(rows, drafts, strict=True)):
            probs = out.logits[i, row.sot_index - first].float().softmax(dim=-1)
            ns = row.tokenizer.no_speech
            no_speech.append(float(probs[ns]) if ns is not None else 0.0)
            # forced tokens: their alignment rows and log-probs come from the prefill
            for pos in range(row.sample_begin - len(row.request.forced) - 1, row.sample_begin - 1):
                row.align.append(out.alignment_qk[i, :, pos])
                # scored under the same rules as sampled tokens, so probabilities compare
                logits = row.rules.apply(
                    out.logits[i, pos - first].float().clone(), row.seq_buffer[: pos + 1]
                )
                logprobs = logits.log_softmax(dim=-1)
                row.forced_logprobs.append(float(logprobs[row.seq[pos + 1]]))
            # verify the draft: take the greedy choice at each position while it agrees
            for j in range(len(draft) + 1):
                pos = len(row.seq) - 1
                token = self._choose(row, out.logits[i, pos - first], out.alignment_qk[i, :, pos])
                if row.done:
                    break
                if j < len(draft) and token == draft[j]:
                    row.accepted += 1
                    continue
                row.pending = True
                break
        while any(r.pending for r in rows):
            raise_if_cancelled(cancel)
            step_tokens = torch.tensor([[r.seq[-1]] for r in rows], dtype=torch.long)
            positions = torch.tensor([len(r.seq) - 1 for r in rows], dtype=torch.long)
            step = self.engine.decode_step(step_tokens, positions)
            for i, row in enumerate(rows):
                if not row.pending:
                    continue  # finished rows ride along: static batch shape, output ignored
                row.passes += 1
                self._choose(row, step.logits[i], step.alignment_qk[i])
                row.pending = not row.done
        return [
            self._result(r, ns, len(d)) for r, ns, d in zip(rows, no_speech, drafts, strict=True)
        ]

    def _result(self, row: _Row, no_speech_prob: float, draft_len: int) -> DecodeResult:
        sampled = tuple(row.seq[row.sample_begin :])
        text = row.tokenizer.decode([t for t in sampled if t < row.tokenizer.eot]).strip()
        total = sum(row.logprobs)
        align = torch.stack(row.align, dim=1) if row.align else torch.zeros(0)
        if len(row.align) == len(row.request.forced) + len(sampled):
            # stopped for length: no row predicted what follows; repeat the last one
            align = torch.cat([align, align[:, -1:]], dim=1)
        return DecodeResult(
            tokens=sampled,
            text=text,
            language=row.tokenizer.language or "en",
            sum_logprob=total,
            avg_logprob=total / (len(sampled) + 1),
            no_speech_prob=no_speech_prob,
            compression_ratio=compression_ratio(text) if text else 0.0,
            token_logprobs=tuple(row.logprobs),
            forced=row.request.forced,
            forced_logprobs=tuple(row.forced_logprobs),
            alignment_qk=align.float().cpu().numpy(),
            sample_begin=row.sample_begin,
            stats=DecodeStats(row.passes, draft_len, row.accepted),
        )
