"""CAT-Seg: open-vocabulary semantic segmentation by cost aggregation (Cho et al., CVPR 2024).

Pure PyTorch + open_clip. Knows nothing of Ray.

The public names load on first use (PEP 562): ``import catseg`` imports no torch, so processes that only need
names, configs or the released-weights registry (Ray read and decode workers, a job's argument parsing) stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "CATSeg": "model",
    "ModelConfig": "config",
    "PRECISIONS": "config",
    "get_config": "config",
    "list_models": "config",
    "build_model": "checkpoint",
    "check_checkpoint": "load",
    "convert_official_state_dict": "convert",
    "is_official_checkpoint": "convert",
    "load_model": "load",
    "save_model": "checkpoint",
    "BASE_LR": "finetune",
    "CLIP_LR_MULTIPLIER": "finetune",
    "GRAD_CLIP_NORM": "finetune",
    "IGNORE_INDEX": "finetune",
    "WEIGHT_DECAY": "finetune",
    "configure_finetuning": "finetune",
    "optimizer_param_groups": "finetune",
    "segmentation_loss": "finetune",
    "Predictor": "predictor",
    "default_device": "predictor",
    "PretrainedUnavailableError": "pretrained",
    "PretrainedWeights": "pretrained",
    "fetch_pretrained": "pretrained",
    "is_pretrained": "pretrained",
    "list_pretrained": "pretrained",
    "validate_vocabulary": "vocabulary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # a submodule (catseg.predictor, ...), as a plain package would have after importing it
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists; something it imports is missing
            raise AttributeError(f"module 'catseg' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
