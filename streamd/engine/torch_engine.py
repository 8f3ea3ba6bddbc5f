"""`TorchEngine`: openai-whisper's weights run through our own static-shape decoder.

The encoder is openai-whisper's module as is. The decoder reuses the module's weights but not its
forward: openai-whisper grows its KV cache with `torch.cat` every step, we write into a cache
preallocated once per engine (self-attention [layers, max_batch, heads, n_text_ctx, d/heads],
cross-attention [layers, max_batch, heads, n_audio_ctx, d/heads]) at per-row positions, so rows
of one batch may belong to different streams at different lengths, and nothing in the decode
loop grows with the sequence.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.model import MultiHeadAttention, ResidualAttentionBlock, Whisper

from streamd.engine.cancel import raise_if_cancelled
from streamd.engine.protocol import PrefillOutput, StepOutput
from streamd.errors import EngineError

DEFAULT_MAX_BATCH = 8


class TorchEngine:
    """Whisper on torch (CPU, or CUDA where present), implementing `streamd.engine.Engine`."""

    def __init__(
        self,
        model: Whisper,
        alignment_heads: tuple[tuple[int, int], ...],
        max_batch: int = DEFAULT_MAX_BATCH,
        encoder_precision: str = "fp32",
    ) -> None:
        if encoder_precision not in ("fp32", "bf16"):
            raise EngineError(f"encoder_precision must be fp32 or bf16, got {encoder_precision!r}")
        dims = model.dims
        # bf16: the encoder's matmuls run in bfloat16 (torch autocast), its output is float32
        # again; see streamd/engine/precision.py for when that pays
        self.encoder_precision = encoder_precision
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_mels = dims.n_mels
        self.n_audio_ctx = dims.n_audio_ctx
        self.n_text_ctx = dims.n_text_ctx
        self.n_vocab = dims.n_vocab
        self.max_batch = max_batch
        self.n_head = dims.n_text_head
        self.head_dim = dims.n_text_state // dims.n_text_head
        self.alignment_heads = alignment_heads
        self.n_alignment_heads = len(alignment_heads)
        # per layer: which of its heads are alignment heads, in `alignment_heads` order
        self._align_by_layer: dict[int, list[int]] = {}
        for layer, head in alignment_heads:
            self._align_by_layer.setdefault(layer, []).append(head)

        # Stored split by head: attention reads them as [B, H, T, d/H] without a copy per step.
        n_layer, h, hd = dims.n_text_layer, self.n_head, self.head_dim
        kw = {"device": self.device, "dtype": self.dtype}
        self.self_k = torch.zeros(n_layer, max_batch, h, self.n_text_ctx, hd, **kw)
        self.self_v = torch.zeros_like(self.self_k)
        self.cross_k = torch.zeros(n_layer, max_batch, h, self.n_audio_ctx, hd, **kw)
        self.cross_v = torch.zeros_like(self.cross_k)
        self._cache_index = torch.arange(self.n_text_ctx, device=self.device)
        self._rows = 0  # rows filled by the last prefill
        self._audio_ctx = self.n_audio_ctx  # encoder frames of the last prefill's features

    @property
    def blocks(self) -> list[ResidualAttentionBlock]:
        return list(self.model.decoder.blocks)

    @torch.inference_mode()
    def encode(self, mel: Tensor, cancel: threading.Event | None = None) -> Tensor:
        frames = mel.shape[2] if mel.ndim == 3 else 0
        if mel.ndim != 3 or mel.shape[1] != self.n_mels or frames % 2:
            raise EngineError(f"mel must be [B, {self.n_mels}, frames], got {tuple(mel.shape)}")
        if not 0 < frames <= 2 * self.n_audio_ctx:
            raise EngineError(f"mel frames must be even, 2..{2 * self.n_audio_ctx}, got {frames}")
        mel = mel.to(self.device, self.dtype)
        if self.encoder_precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self._encode(mel, cancel).to(self.dtype)
        return self._encode(mel, cancel)

    def _encode(self, mel: Tensor, cancel: threading.Event | None) -> Tensor:
        """openai-whisper's `AudioEncoder.forward`, step by step: `cancel` is looked at before
        each layer (base: six of ~70 ms on 2 cores), and the positional embedding is sliced to
        the frames given. Fewer than 3000 frames is an encoder context bucket (DESIGN.md §3):
        cheaper, and not what Whisper was trained on; callers choose it knowingly (the
        streaming window decoder, measured on real audio)."""
        enc = self.model.encoder
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).permute(0, 2, 1)
        if x.shape[1] == self.n_audio_ctx:
            x = (x + enc.positional_embedding).to(x.dtype)  # exactly openai's
        else:
            # no cast back to the convolutions' dtype here, as before: with a bf16 encoder
            # it puts a bucket's features 10x further from fp32's (tests/test_precision.py)
            x = x + enc.positional_embedding[: x.shape[1]]
        for block in enc.blocks:
            raise_if_cancelled(cancel)
            x = block(x)
        return enc.ln_post(x)

    def _split_heads(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, H, T, d/H]"""
        return x.view(x.shape[0], x.shape[1], self.n_head, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).flatten(start_dim=2)

    def _cross_attention(
        self, layer: int, attn: MultiHeadAttention, x: Tensor, rows: int
    ) -> tuple[Tensor, Tensor | None]:
        """Attend to the cached audio K/V; return the alignment heads' raw scores if any."""
        q = self._split_heads(attn.query(x))
        k = self.cross_k[layer, :rows, :, : self._audio_ctx]
        v = self.cross_v[layer, :rows, :, : self._audio_ctx]
        heads = self._align_by_layer.get(layer)
        if heads is None:
            out = F.scaled_dot_product_attention(q, k, v)
            return attn.out(self._merge_heads(out)), None
        qk = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        out = qk.float().softmax(dim=-1).to(q.dtype) @ v
        return attn.out(self._merge_heads(out)), qk[:, heads].float()

    def _finish(self, x: Tensor) -> Tensor:
        """Final norm and the vocabulary projection: [..., d] -> [..., n_vocab] float32."""
        x = self.model.decoder.ln(x)
        rows = x.reshape(-1, x.shape[-1])
        # W @ x.T rather than x @ W.T: the same product, but with the 51,864-row weight on
        # the left MKL picks a GEMM kernel that is 4-10x faster for a handful of rows (tiny.en
        # on 2 cores: 2-3 ms instead of 8-30 ms per step, the largest cost of a decode step);
        # a single row is doubled because one column falls back to a slow GEMV, and doubled
        # in memory: an `expand`ed (stride-0) copy sends MKL down a path 4x slower again
        # (base on 2 cores: 15.4 ms against 3.7 ms per step)
        padded = rows if rows.shape[0] > 1 else rows.repeat(2, 1)
        weight = self.model.decoder.token_embedding.weight
        logits = torch.mm(weight, padded.t()).t()[: rows.shape[0]]
        return logits.reshape(*x.shape[:-1], -1).float()

    def _stack_alignment(self, scores: dict[int, Tensor]) -> Tensor:
        """Per-layer head scores -> [B, A, ...] in `alignment_heads` order."""
        parts = []
        for layer, head in self.alignment_heads:
            col = self._align_by_layer[layer].index(head)
            parts.append(scores[layer][:, col])
        return torch.stack(parts, dim=1)

    @torch.inference_mode()
    def prefill(
        self, tokens: Tensor, lengths: Tensor, features: Tensor, first_logit: int = 0
    ) -> PrefillOutput:
        if tokens.ndim != 2:
            raise EngineError(f"tokens must be [B, T], got {tuple(tokens.shape)}")
        rows, t = tokens.shape
        if not 0 < rows <= self.max_batch:
            raise EngineError(f"prefill batch must be 1..{self.max_batch} rows, got {rows}")
        if not 0 < t <= self.n_text_ctx:
            raise EngineError(f"prefill length must be 1..{self.n_text_ctx}, got {t}")
        ctx = features.shape[1] if features.ndim == 3 else 0
        expected = (rows, ctx, self.n_head * self.head_dim)
        if tuple(features.shape) != expected or not 0 < ctx <= self.n_audio_ctx:
            raise EngineError(
                f"features must be [{rows}, 1..{self.n_audio_ctx}, {expected[2]}], "
                f"got {tuple(features.shape)}"
            )
        self._audio_ctx = ctx
        if not 0 <= first_logit < t:
            raise EngineError(f"first_logit must be in 0..{t - 1}, got {first_logit}")
        if lengths.shape != (rows,) or int(lengths.min()) < 1 or int(lengths.max()) > t:
            raise EngineError(f"lengths must be [B] in 1..{t}, got {lengths.tolist()}")
        tokens = tokens.to(self.device)
        features = features.to(self.device, self.dtype)
        dec = self.model.decoder
        x = dec.token_embedding(tokens) + dec.positional_embedding[:t]
        scores: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            attn, cross = block.attn, block.cross_attn
            assert cross is not None and block.cross_attn_ln is not None
            self.cross_k[i, :rows, :, :ctx] = self._split_heads(cross.key(features))
            self.cross_v[i, :rows, :, :ctx] = self._split_heads(cross.value(features))
            h = block.attn_ln(x)
            k, v = self._split_heads(attn.key(h)), self._split_heads(attn.value(h))
            self.self_k[i, :rows, :, :t] = k
            self.self_v[i, :rows, :, :t] = v
            # Right padding sits after each row's real tokens, so the causal mask alone keeps
            # real positions from seeing it; padded positions' outputs are never read.
            out = F.scaled_dot_product_attention(
                self._split_heads(attn.query(h)), k, v, is_causal=True
            )
            x = x + attn.out(self._merge_heads(out))
            cross_out, qk = self._cross_attention(i, cross, block.cross_attn_ln(x), rows)
            x = x + cross_out
            if qk is not None:
                scores[i] = qk
            x = x + block.mlp(block.mlp_ln(x))
        self._rows = rows
        return PrefillOutput(
            logits=self._finish(x[:, first_logit:]), alignment_qk=self._stack_alignment(scores)
        )

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, positions: Tensor) -> StepOutput:
        rows = tokens.shape[0]
        if rows != self._rows or tokens.shape != (rows, 1) or positions.shape != (rows,):
            raise EngineError(
                f"decode_step needs tokens [{self._rows}, 1] and positions [{self._rows}] after "
                f"prefill, got {tuple(tokens.shape)} and {tuple(positions.shape)}"
            )
        tokens = tokens.to(self.device)
        positions = positions.to(self.device)
        if int(positions.max()) >= self.n_text_ctx or int(positions.min()) < 0:
            raise EngineError(f"positions must be < {self.n_text_ctx}, got {positions.tolist()}")
        dec = self.model.decoder
        x = dec.token_embedding(tokens) + dec.positional_embedding[positions][:, None]
        row_index = torch.arange(rows, device=self.device)
        # [B, 1, 1, n_text_ctx]: each row sees its own past and the token written now
        visible = (self._cache_index[None, :] <= positions[:, None])[:, None, None, :]
        scores: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            attn, cross = block.attn, block.cross_attn
            assert cross is not None and block.cross_attn_ln is not None
            h = block.attn_ln(x)
            # [B, H, d/H] written at each row's own position
            self.self_k[i, row_index, :, positions] = self._split_heads(attn.key(h))[:, :, 0]
            self.self_v[i, row_index, :, positions] = self._split_heads(attn.value(h))[:, :, 0]
            out = F.scaled_dot_product_attention(
                self._split_heads(attn.query(h)),
                self.self_k[i, :rows],
                self.self_v[i, :rows],
                attn_mask=visible,
            )
            x = x + attn.out(self._merge_heads(out))
            cross_out, qk = self._cross_attention(i, cross, block.cross_attn_ln(x), rows)
            x = x + cross_out
            if qk is not None:
                scores[i] = qk[:, :, 0]
            x = x + block.mlp(block.mlp_ln(x))
        return StepOutput(logits=self._finish(x[:, 0]), alignment_qk=self._stack_alignment(scores))
