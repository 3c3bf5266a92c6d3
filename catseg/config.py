"""Model configurations as data: one JSON file per named model in ``catseg/model_configs``.

A config names the open_clip architecture and the CAT-Seg head sizes. It is written beside every checkpoint
(``config.json``) so a checkpoint rebuilds its own architecture without guessing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "model_configs"
# Arithmetic of the model forward: float32, or autocast to bfloat16 / float16 (catseg.Predictor(precision=...)).
PRECISIONS = ("float32", "bfloat16", "float16")
OPEN_CLIP_CONFIG_DIR = CONFIG_DIR / "open_clip"

# CLIP's own pixel statistics on the 0..255 scale (the reference's CLIP_PIXEL_MEAN / CLIP_PIXEL_STD).
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.3231630)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a CAT-Seg model's architecture (not its weights)."""

    name: str
    clip_model: str  # open_clip architecture name (a built-in one, or one in model_configs/open_clip)
    input_size: int  # CLIP input side: 384 for ViT-B/16, 336 for ViT-L/14@336
    feature_layers: tuple[int, int]  # visual blocks whose outputs guide the decoder (res4, res5)
    prompt_template: str = "A photo of a {} in the scene"
    hidden_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    window_size: int = 12
    cost_embed_kernel: int = 7
    guidance_proj_dim: int = 128  # both appearance and text guidance projections
    decoder_dims: tuple[int, int] = (64, 32)
    decoder_guidance_dims: tuple[int, int] = (256, 128)  # outputs of upsample1 / upsample2
    decoder_guidance_proj_dims: tuple[int, int] = (32, 16)
    train_pooling: int = 2  # class-attention average pooling in training; 1 (none) at eval
    pad_len: int = 256  # class-attention sequence length (padding / top-k truncation); 0 disables
    pixel_mean: tuple[float, float, float] = CLIP_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = CLIP_PIXEL_STD
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _is_required(f)]
        if missing:
            raise ValueError(f"model config is missing required keys {missing}")
        values = dict(data)
        for key in ("feature_layers", "decoder_dims", "decoder_guidance_dims", "decoder_guidance_proj_dims"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        for key in ("pixel_mean", "pixel_std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def list_models() -> list[str]:
    """Names accepted by :func:`catseg.build_model`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_config(name: str) -> ModelConfig:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model name {name!r}; choose one of {list_models()}")
    return ModelConfig.from_json(path.read_text())
