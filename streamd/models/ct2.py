"""Read a CTranslate2 Whisper `model.bin` and convert it to openai-whisper's module layout.

Format (binary version 6, spec `WhisperSpec`), little-endian:
    u32 version, str spec_name, u32 revision, u32 n_variables,
    n_variables x (str name, u8 ndim, u32 dims[ndim], u8 dtype, u32 nbytes, bytes),
    u32 n_aliases, n_aliases x (str alias, str target)
where `str` is a u16 length that counts a trailing NUL, then the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.errors import ModelError

SUPPORTED_BINARY_VERSIONS = (5, 6)
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    # bf16 has no numpy dtype: read as u16 and widen in `_as_float32`.
    5: np.dtype("<u2"),
}
_BF16 = 5


@dataclass(frozen=True)
class Ct2Checkpoint:
    """The variables of one CTranslate2 model, aliases resolved, all float arrays as float32."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]


def read_model_bin(parts: list[Path]) -> Ct2Checkpoint:
    """Parse `model.bin`, given as one path or as parts to be joined byte for byte, in order."""
    try:
        blob = b"".join(p.read_bytes() for p in parts)
    except OSError as exc:
        raise ModelError(f"cannot read CTranslate2 weights {parts}: {exc}") from exc
    try:
        return _parse(blob)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{parts[0]}: not a valid CTranslate2 model.bin ({exc})") from exc


class _Reader:
    def __init__(self, blob: bytes) -> None:
        self.blob = memoryview(blob)
        self.pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str:
        n = self.take("<H")
        text = bytes(self.blob[self.pos : self.pos + n - 1]).decode("utf-8")
        self.pos += n
        return text

    def raw(self, n: int) -> memoryview:
        if self.pos + n > len(self.blob):
            raise ValueError("truncated file")
        out = self.blob[self.pos : self.pos + n]
        self.pos += n
        return out


def _parse(blob: bytes) -> Ct2Checkpoint:
    r = _Reader(blob)
    version = r.take("<I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(f"binary version {version}, expected one of {SUPPORTED_BINARY_VERSIONS}")
    spec = r.string()
    revision = r.take("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.take("<I")):
        name = r.string()
        dims = tuple(r.take("<I") for _ in range(r.take("<B")))
        dtype_id = r.take("<B")
        nbytes = r.take("<I")
        if dtype_id not in _DTYPES:
            raise ValueError(f"{name}: unknown dtype id {dtype_id}")
        array = np.frombuffer(r.raw(nbytes), dtype=_DTYPES[dtype_id]).reshape(dims)
        variables[name] = _as_float32(array) if dtype_id in (0, 4, _BF16) else array.copy()
    for _ in range(r.take("<I")):
        alias, target = r.string(), r.string()
        variables[alias] = variables[target]
    if r.pos != len(blob):
        raise ValueError(f"{len(blob) - r.pos} trailing bytes")
    return Ct2Checkpoint(spec=spec, revision=revision, variables=variables)


def _as_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.dtype("<u2"):  # bf16: the high half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def whisper_dims(ckpt: Ct2Checkpoint) -> dict[str, int]:
    """openai-whisper `ModelDimensions` fields for this checkpoint."""
    v = ckpt.variables
    if ckpt.spec != "WhisperSpec":
        raise ModelError(f"CTranslate2 spec {ckpt.spec!r} is not a Whisper model")
    d_audio, n_mels, _ = v["encoder/conv1/weight"].shape
    n_text_ctx, d_text = v["decoder/position_encodings/encodings"].shape
    return {
        "n_mels": int(n_mels),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(d_audio),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": _count_layers(v, "encoder"),
        "n_vocab": int(v["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(n_text_ctx),
        "n_text_state": int(d_text),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": _count_layers(v, "decoder"),
    }


def _linear(out: dict[str, np.ndarray], dst: str, v: dict[str, np.ndarray], src: str) -> None:
    out[f"{dst}.weight"] = v[f"{src}/weight"]
    if f"{src}/bias" in v:
        out[f"{dst}.bias"] = v[f"{src}/bias"]


def _norm(out: dict[str, np.ndarray], dst: str, v: dict[str, np.ndarray], src: str) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def _split_qkv(out: dict[str, np.ndarray], dst: str, v: dict[str, np.ndarray], src: str) -> None:
    """CTranslate2 fuses q;k;v into one projection; whisper's key projection has no bias."""
    w = v[f"{src}/weight"]
    b = v[f"{src}/bias"]
    q_w, k_w, v_w = np.split(w, 3, axis=0)
    q_b, _, v_b = np.split(b, 3, axis=0)
    out[f"{dst}.query.weight"], out[f"{dst}.query.bias"] = q_w, q_b
    out[f"{dst}.key.weight"] = k_w
    out[f"{dst}.value.weight"], out[f"{dst}.value.bias"] = v_w, v_b


def _split_kv(out: dict[str, np.ndarray], dst: str, v: dict[str, np.ndarray], src: str) -> None:
    k_w, v_w = np.split(v[f"{src}/weight"], 2, axis=0)
    _, v_b = np.split(v[f"{src}/bias"], 2, axis=0)
    out[f"{dst}.key.weight"] = k_w
    out[f"{dst}.value.weight"], out[f"{dst}.value.bias"] = v_w, v_b


def _ffn(out: dict[str, np.ndarray], dst: str, v: dict[str, np.ndarray], src: str) -> None:
    _linear(out, f"{dst}.mlp.0", v, f"{src}/ffn/linear_0")
    _linear(out, f"{dst}.mlp.2", v, f"{src}/ffn/linear_1")
    _norm(out, f"{dst}.mlp_ln", v, f"{src}/ffn/layer_norm")


def to_whisper_state_dict(ckpt: Ct2Checkpoint) -> dict[str, np.ndarray]:
    """Map CTranslate2 variable names to openai-whisper `Whisper.state_dict()` names."""
    v = ckpt.variables
    dims = whisper_dims(ckpt)
    out: dict[str, np.ndarray] = {}
    _linear(out, "encoder.conv1", v, "encoder/conv1")
    _linear(out, "encoder.conv2", v, "encoder/conv2")
    out["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in range(dims["n_audio_layer"]):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        _split_qkv(out, f"{dst}.attn", v, f"{src}/self_attention/linear_0")
        _linear(out, f"{dst}.attn.out", v, f"{src}/self_attention/linear_1")
        _norm(out, f"{dst}.attn_ln", v, f"{src}/self_attention/layer_norm")
        _ffn(out, dst, v, src)
    _norm(out, "encoder.ln_post", v, "encoder/layer_norm")

    out["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    out["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(dims["n_text_layer"]):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _split_qkv(out, f"{dst}.attn", v, f"{src}/self_attention/linear_0")
        _linear(out, f"{dst}.attn.out", v, f"{src}/self_attention/linear_1")
        _norm(out, f"{dst}.attn_ln", v, f"{src}/self_attention/layer_norm")
        _linear(out, f"{dst}.cross_attn.query", v, f"{src}/attention/linear_0")
        _split_kv(out, f"{dst}.cross_attn", v, f"{src}/attention/linear_1")
        _linear(out, f"{dst}.cross_attn.out", v, f"{src}/attention/linear_2")
        _norm(out, f"{dst}.cross_attn_ln", v, f"{src}/attention/layer_norm")
        _ffn(out, dst, v, src)
    _norm(out, "decoder.ln", v, "decoder/layer_norm")
    return out


def read_alignment_heads(config_json: Path) -> list[tuple[int, int]]:
    """`(layer, head)` pairs of the cross-attention heads that track time, from config.json."""
    try:
        config = json.loads(config_json.read_text())
        return [(int(layer), int(head)) for layer, head in config["alignment_heads"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{config_json}: cannot read alignment_heads ({exc})") from exc
