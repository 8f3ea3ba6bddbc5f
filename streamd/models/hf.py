"""Read a Hugging Face transformers Whisper directory into openai-whisper's layout.

Expects `config.json` + `model.safetensors`, or the shards listed in `model.safetensors.index.json`;
`generation_config.json` may add `alignment_heads`. Needs only `safetensors`, not transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from whisper.model import AudioEncoder, TextDecoder

from streamd.errors import ModelError
from streamd.models.checkpoint import WhisperCheckpoint, default_alignment_heads

# fmt: off
# In `ModelDimensions` field order, which is also AudioEncoder's then TextDecoder's arguments.
_DIMS_FROM_CONFIG = {
    "n_mels": "num_mel_bins", "n_audio_ctx": "max_source_positions", "n_audio_state": "d_model",
    "n_audio_head": "encoder_attention_heads", "n_audio_layer": "encoder_layers",
    "n_vocab": "vocab_size", "n_text_ctx": "max_target_positions", "n_text_state": "d_model",
    "n_text_head": "decoder_attention_heads", "n_text_layer": "decoder_layers",
}

# Applied in order to every HF name; the result is checked against the openai module's own
# names and shapes, so a tensor no rule fits is reported as unknown, never silently dropped.
_RENAMES = [
    (r"^model\.", ""),  # WhisperForConditionalGeneration nests WhisperModel under `model.`
    (r"\.layers\.", ".blocks."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."), (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.self_attn\.", ".attn."), (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."), (r"\.k_proj\.", ".key."), (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."), (r"\.fc2\.", ".mlp.2."), (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."), (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"^(encoder|decoder)\.embed_positions\.weight$", r"\1.positional_embedding"),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."),
]
# fmt: on


def read_hf_directory(path: Path) -> WhisperCheckpoint:
    """Load `path` as float32 weights under `Whisper.state_dict()` names, with its dims and
    alignment heads; raise `ModelError` if it is not a complete HF Whisper checkpoint."""
    config = _read_json(path / "config.json")
    try:
        dims = {ours: int(config[theirs]) for ours, theirs in _DIMS_FROM_CONFIG.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}/config.json: not a Whisper config ({exc!r})") from exc
    # openai's module hard-codes exact GELU, unscaled token embeddings and 4x-wide MLPs.
    mlp = 4 * dims["n_audio_state"]
    ffn = {config.get("encoder_ffn_dim", mlp), config.get("decoder_ffn_dim", mlp)}
    if config.get("activation_function", "gelu") != "gelu" or config.get("scale_embedding"):
        raise ModelError(f"{path}: activation or scale_embedding differ from openai Whisper's")
    if ffn != {mlp}:
        raise ModelError(f"{path}: ffn_dim {sorted(ffn)} is not 4 x d_model (openai Whisper's)")

    tensors = _read_tensors(path)
    # The output projection is tied to the token embedding in openai's module; an untied one
    # cannot be represented, so refuse it rather than silently dropping it.
    proj = tensors.pop("proj_out.weight", None)
    embed = tensors.get("model.decoder.embed_tokens.weight")
    if proj is not None and (embed is None or not torch.equal(proj, embed)):
        raise ModelError(f"{path}: proj_out.weight is not tied to the token embedding")

    origin = {_rename(name): name for name in tensors}
    state = {ours: tensors[theirs].float() for ours, theirs in origin.items()}
    expected = _expected_shapes(dims)
    problems = {
        "unknown": [origin[k] for k in state if k not in expected],
        "missing": [k for k in expected if k not in state],
        "wrong shape": [origin[k] for k, t in state.items() if expected.get(k, t.shape) != t.shape],
    }
    if any(problems.values()):
        found = "; ".join(f"{kind}: {sorted(v)[:4]}" for kind, v in problems.items() if v)
        raise ModelError(f"{path}: tensors do not match config.json ({found})")
    return WhisperCheckpoint(dims=dims, state_dict=dict(state), alignment_heads=_heads(path, dims))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{file}: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index}: has no weight_map")
        files = sorted({path / str(f) for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise ModelError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            # torch, not numpy: numpy has no bfloat16, which many HF checkpoints use
            tensors.update(load_file(file))
        except (OSError, SafetensorError) as exc:
            raise ModelError(f"{file}: unreadable safetensors ({exc})") from exc
    return tensors


def _rename(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def _expected_shapes(dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `Whisper(dims).state_dict()`, built on the meta device (no memory).

    Whisper itself cannot be built on meta (it calls `to_sparse`), so its two halves are."""
    with torch.device("meta"):
        args = [dims[k] for k in _DIMS_FROM_CONFIG]
        enc, dec = AudioEncoder(*args[:5]), TextDecoder(*args[5:])
    return {
        f"{prefix}.{k}": tuple(v.shape)
        for prefix, module in (("encoder", enc), ("decoder", dec))
        for k, v in module.state_dict().items()
    }


def _heads(path: Path, dims: dict[str, int]) -> tuple[tuple[int, int], ...]:
    gen = path / "generation_config.json"
    raw = _read_json(gen).get("alignment_heads") if gen.is_file() else None
    if not raw:
        return default_alignment_heads(dims)
    try:
        heads = tuple((int(layer), int(head)) for layer, head in raw)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{gen}: malformed alignment_heads ({exc})") from exc
    n_layer, n_head = dims["n_text_layer"], dims["n_text_head"]
    if any(not (0 <= layer < n_layer and 0 <= head < n_head) for layer, head in heads):
        raise ModelError(f"{gen}: alignment_heads outside the decoder's layers/heads")
    return heads
