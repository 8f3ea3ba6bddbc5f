"""Turn a model name into a ready openai-whisper `Whisper` module plus what decoding needs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer

from streamd.errors import ModelError
from streamd.models.registry import load_checkpoint


@dataclass(frozen=True)
class LoadedModel:
    """A float32 `Whisper` module in eval mode, with its alignment heads installed."""

    name: str
    model: Whisper
    alignment_heads: tuple[tuple[int, int], ...]

    @property
    def is_multilingual(self) -> bool:
        return bool(self.model.is_multilingual)

    @property
    def dims(self) -> ModelDimensions:
        return self.model.dims

    def tokenizer(self, language: str | None = None, task: str = "transcribe") -> Tokenizer:
        """The tiktoken tokenizer whose SOT sequence names `language` and `task`."""
        return _tokenizer(self.is_multilingual, int(self.model.num_languages), language, task)


@lru_cache(maxsize=16)
def _tokenizer(
    multilingual: bool, num_languages: int, language: str | None, task: str
) -> Tokenizer:
    if not multilingual:
        language, task = "en", "transcribe"
    with warnings.catch_warnings():
        # openai-whisper reads its .tiktoken vocabulary without closing the file
        warnings.simplefilter("ignore", ResourceWarning)
        return get_tokenizer(
            multilingual, num_languages=num_languages, language=language, task=task
        )


def load_model(name: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load `name` (see `streamd.models.registry.resolve`) onto `device` in float32."""
    ckpt = load_checkpoint(name)
    model = Whisper(ModelDimensions(**ckpt.dims))
    state = {k: torch.as_tensor(v) for k, v in ckpt.state_dict.items()}
    try:
        # strict: a missing or misnamed weight must fail here, not decode garbage later
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{name}: weights do not fit the Whisper module ({exc})") from exc
    mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
    for layer, head in ckpt.alignment_heads:
        if not (0 <= layer < mask.shape[0] and 0 <= head < mask.shape[1]):
            raise ModelError(f"{name}: alignment head {(layer, head)} outside {tuple(mask.shape)}")
        mask[layer, head] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    model = model.to(device).eval()
    return LoadedModel(name=name, model=model, alignment_heads=ckpt.alignment_heads)
