"""Hugging Face Whisper directories load into openai-whisper's module with identical outputs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamd.errors import ModelError
from streamd.models.hf import read_hf_directory
from streamd.models.loader import load_model

transformers = pytest.importorskip("transformers")

ALIGNMENT_HEADS = [[1, 0], [1, 2]]


@pytest.fixture(scope="module")
def hf_model() -> Any:
    """A random-weight WhisperForConditionalGeneration, small but with real Whisper vocab/ctx."""
    config = transformers.WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,  # openai's module fixes the MLP at 4 x d_model
        decoder_ffn_dim=256,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
        vocab_size=51865,  # multilingual size, so openai's tokenizer logic applies
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    # Default init leaves biases and layer norms at 0/1; randomise every tensor so that a
    # swapped or dropped weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.generation_config.alignment_heads = ALIGNMENT_HEADS
    return model


def _save(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def hf_dir(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(hf_model, tmp_path_factory.mktemp("hf") / "tiny-hf")


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STREAMD_CACHE_DIR", str(tmp_path / "cache"))


def _assert_same_outputs(hf_model: Any, path: Path) -> None:
    loaded = load_model(str(path))
    torch.manual_seed(1)
    mel = torch.randn(1, 80, 3000)
    # <|startoftranscript|><|en|><|transcribe|><|notimestamps|> and some text; hard-coded
    # because openai-whisper's tokenizer leaks a file handle (a ResourceWarning under -W error)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440, 1002, 257, 50, 7]])
    with torch.no_grad():
        ours_features = loaded.model.embed_audio(mel)
        ours_logits = loaded.model.logits(tokens, ours_features)
        theirs_features = hf_model.model.encoder(mel).last_hidden_state
        theirs_logits = hf_model(input_features=mel, decoder_input_ids=tokens).logits
    assert ours_features.shape == theirs_features.shape == (1, 1500, 64)
    assert ours_logits.shape == theirs_logits.shape == (1, tokens.shape[1], 51865)
    assert (ours_features - theirs_features).abs().max().item() < 1e-4
    assert (ours_logits - theirs_logits).abs().max().item() < 1e-4


def test_hf_directory_matches_transformers(hf_model: Any, hf_dir: Path) -> None:
    assert (hf_dir / "model.safetensors").is_file()
    _assert_same_outputs(hf_model, hf_dir)


def test_sharded_hf_directory_matches_transformers(hf_model: Any, tmp_path: Path) -> None:
    path = _save(hf_model, tmp_path / "sharded", max_shard_size="2MB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    _assert_same_outputs(hf_model, path)


def test_alignment_heads_come_through(hf_dir: Path) -> None:
    loaded = load_model(str(hf_dir))
    assert loaded.alignment_heads == ((1, 0), (1, 2))
    mask = loaded.model.alignment_heads.to_dense()
    assert mask.nonzero().tolist() == ALIGNMENT_HEADS


def test_without_alignment_heads_uses_default(hf_dir: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(hf_dir, tmp_path / "no-heads"))
    (path / "generation_config.json").unlink()
    ckpt = read_hf_directory(path)
    assert ckpt.alignment_heads == tuple((1, h) for h in range(4))  # second half of 2 layers


def test_weights_become_float32(hf_model: Any, tmp_path: Path) -> None:
    path = _save(copy.deepcopy(hf_model).to(torch.bfloat16), tmp_path / "bf16")
    ckpt = read_hf_directory(path)
    assert ckpt.dims["n_vocab"] == 51865
    assert ckpt.dims["n_audio_ctx"] == 1500
    assert all(torch.as_tensor(v).dtype == torch.float32 for v in ckpt.state_dict.values())


def _rewrite_weights(hf_dir: Path, dst: Path, edit: Any) -> Path:
    path = Path(shutil.copytree(hf_dir, dst))
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")
    return path


def test_missing_tensor_raises(hf_dir: Path, tmp_path: Path) -> None:
    name = "model.decoder.layers.1.fc2.weight"
    path = _rewrite_weights(hf_dir, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ModelError, match=r"missing: \['decoder\.blocks\.1\.mlp\.2\.weight'\]"):
        read_hf_directory(path)
    with pytest.raises(ModelError, match="missing"):
        load_model(str(path))


def test_unknown_tensor_raises(hf_dir: Path, tmp_path: Path) -> None:
    path = _rewrite_weights(
        hf_dir, tmp_path / "unknown", lambda t: t.update({"model.extra.weight": torch.ones(3)})
    )
    with pytest.raises(ModelError, match=r"unknown: \['model\.extra\.weight'\]"):
        read_hf_directory(path)


def test_untied_output_projection_raises(hf_dir: Path, tmp_path: Path) -> None:
    path = _rewrite_weights(
        hf_dir,
        tmp_path / "untied",
        lambda t: t.update({"proj_out.weight": torch.zeros(51865, 64)}),
    )
    with pytest.raises(ModelError, match="not tied"):
        read_hf_directory(path)


def test_malformed_directories_raise(hf_dir: Path, tmp_path: Path) -> None:
    garbage = Path(shutil.copytree(hf_dir, tmp_path / "garbage"))
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ModelError, match="unreadable safetensors"):
        read_hf_directory(garbage)

    not_whisper = Path(shutil.copytree(hf_dir, tmp_path / "not-whisper"))
    config = json.loads((not_whisper / "config.json").read_text())
    del config["decoder_layers"]
    (not_whisper / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not a Whisper config"):
        read_hf_directory(not_whisper)

    odd_name = Path(shutil.copytree(hf_dir, tmp_path / "odd-name"))
    (odd_name / "model.safetensors").rename(odd_name / "weights.safetensors")
    with pytest.raises(ModelError, match=r"neither model\.safetensors"):
        load_model(str(odd_name))
