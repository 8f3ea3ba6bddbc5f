"""The model registry: built-in packages, errors that say what is available, the cache, imports."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from whisper.model import ModelDimensions, Whisper

from streamd.errors import ModelError
from streamd.models import ct2, registry
from streamd.models.loader import load_model

SMALL_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 32,
    "n_audio_head": 2,
    "n_audio_layer": 1,
    "n_vocab": 51864,
    "n_text_ctx": 448,
    "n_text_state": 32,
    "n_text_head": 2,
    "n_text_layer": 2,
}


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test gets an empty cache of its own; nothing touches ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def openai_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weight checkpoint in openai-whisper's `.pt` format."""
    torch.manual_seed(0)
    model = Whisper(ModelDimensions(**SMALL_DIMS))
    with torch.no_grad():  # some of openai's parameters start as torch.empty (maybe NaN)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("openai") / "small.pt"
    torch.save({"dims": SMALL_DIMS, "model_state_dict": model.state_dict()}, path)
    return path


@pytest.fixture
def convert_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Labels of the sources `registry._convert` was asked to convert."""
    calls: list[str] = []
    real = registry._convert

    def counting(source: registry.ModelSource) -> registry.WhisperCheckpoint:
        calls.append(source.label)
        return real(source)

    monkeypatch.setattr(registry, "_convert", counting)
    return calls


def test_resolve_finds_builtin_packages() -> None:
    tiny = registry.resolve("tiny.en")
    assert tiny.kind == "builtin"
    *bins, config = tiny.paths
    assert [p.name for p in bins] == ["model.bin"]
    assert config.name == "config.json"
    assert all(p.is_file() for p in tiny.paths)

    base = registry.resolve("base")
    assert base.kind == "builtin"
    *parts, config = base.paths
    assert [p.name for p in parts] == ["model.bin.part1", "model.bin.part2"]
    assert config.name == "config.json"
    assert all(p.is_file() for p in base.paths)


def test_unknown_model_fails_fast_and_says_what_exists() -> None:
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        registry.resolve("large-v3")
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert "'large-v3'" in message
    assert "tiny.en, base" in message
    assert "streamd models import" in message
    assert "\n" not in message


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model directory"):
        registry.resolve(str(tmp_path / "empty"))


def test_builtin_dims() -> None:
    tiny = ct2.whisper_dims(ct2.read_model_bin(list(registry.resolve("tiny.en").paths[:-1])))
    assert tiny == {
        "n_mels": 80,
        "n_audio_ctx": 1500,
        "n_audio_state": 384,
        "n_audio_head": 6,
        "n_audio_layer": 4,
        "n_vocab": 51864,
        "n_text_ctx": 448,
        "n_text_state": 384,
        "n_text_head": 6,
        "n_text_layer": 4,
    }
    base = ct2.whisper_dims(ct2.read_model_bin(list(registry.resolve("base").paths[:-1])))
    assert (base["n_vocab"], base["n_text_layer"], base["n_text_head"], base["n_text_state"]) == (
        51865,
        6,
        8,
        512,
    )
    assert (base["n_audio_layer"], base["n_audio_head"], base["n_audio_state"]) == (6, 8, 512)


def test_builtin_converts_once_then_reuses_cache(cache: Path, convert_calls: list[str]) -> None:
    first = registry.cached_checkpoint_path("tiny.en")
    assert convert_calls == ["tiny.en"]
    assert first.is_file()
    assert first.parent == cache / "models"
    assert first.name.startswith("tiny.en-")
    assert first.suffix == ".pt"
    mtime = first.stat().st_mtime_ns

    second = registry.cached_checkpoint_path("tiny.en")
    assert second == first
    assert convert_calls == ["tiny.en"]  # not converted again
    assert first.stat().st_mtime_ns == mtime
    assert not list(first.parent.glob("*.tmp"))

    ckpt = registry.load_checkpoint("tiny.en")
    assert convert_calls == ["tiny.en"]
    assert ckpt.dims["n_vocab"] == 51864
    assert ckpt.alignment_heads[0] == (1, 0)


def test_import_registers_a_name_usable_by_load_model(
    openai_pt: Path, cache: Path, convert_calls: list[str]
) -> None:
    path = registry.import_model(str(openai_pt), "mini")
    assert path.is_file()
    assert path.parent == cache / "models"
    assert registry.imported_models() == {"mini": str(path)}
    assert registry.resolve("mini") == registry.ModelSource("mini", "cached", (path,))

    loaded = load_model("mini")
    assert convert_calls == ["small"]  # the import converted; loading by name did not
    assert loaded.dims == ModelDimensions(**SMALL_DIMS)
    source = torch.load(openai_pt, weights_only=True)["model_state_dict"]
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, source[name]), name
    # no alignment heads in the .pt: openai's default, the second half of the decoder layers
    assert loaded.alignment_heads == ((1, 0), (1, 1))

    with pytest.raises(ModelError, match=r"Available: tiny\.en, base, mini\."):
        registry.resolve("nope")


def test_import_under_a_builtin_name_is_refused(
    openai_pt: Path, cache: Path, convert_calls: list[str]
) -> None:
    for name in registry.BUILTIN_MODELS:
        with pytest.raises(ModelError, match="built-in model name"):
            registry.import_model(str(openai_pt), name)
    assert convert_calls == []
    assert not cache.exists()


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda real: b"", id="empty"),
        pytest.param(lambda real: b"garbage! " * 100, id="garbage"),
        pytest.param(lambda real: real[: len(real) * 2 // 3], id="truncated"),
        pytest.param(lambda real: real + b"\0\0\0", id="trailing-bytes"),
    ],
)
def test_read_model_bin_rejects_bad_files(
    corrupt: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(corrupt(registry.resolve("tiny.en").paths[0].read_bytes()))
    with pytest.raises(ModelError, match=r"not a valid CTranslate2 model\.bin"):
        ct2.read_model_bin([path])


def test_read_model_bin_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        ct2.read_model_bin([tmp_path / "absent.bin"])


def test_read_model_bin_joins_parts_in_order(tmp_path: Path) -> None:
    real = registry.resolve("tiny.en").paths[0].read_bytes()
    half = len(real) // 2
    (tmp_path / "a").write_bytes(real[:half])
    (tmp_path / "b").write_bytes(real[half:])
    joined = ct2.read_model_bin([tmp_path / "a", tmp_path / "b"])
    whole = ct2.read_model_bin([registry.resolve("tiny.en").paths[0]])
    assert joined.variables.keys() == whole.variables.keys()
    name = "decoder/embeddings/weight"
    assert np.array_equal(joined.variables[name], whole.variables[name])
    with pytest.raises(ModelError):
        ct2.read_model_bin([tmp_path / "b", tmp_path / "a"])


@pytest.mark.parametrize("content", [b"", b"not a pickle" * 10], ids=["empty", "garbage"])
def test_bad_openai_checkpoint_raises_model_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not an openai-whisper checkpoint"):
        registry.import_model(str(path), "bad")
