"""Loading a model from any URI: released weights by name (:mod:`catseg.pretrained`), an official CAT-Seg ``.pth``
(:mod:`catseg.convert`) or our checkpoint directory (:mod:`catseg.checkpoint`)."""

from __future__ import annotations

import torch

from .checkpoint import check_catseg_checkpoint, load_catseg_checkpoint
from .config import ModelConfig, get_config
from .convert import check_official_checkpoint, is_official_checkpoint, load_official_checkpoint
from .model import CATSeg
from .pretrained import check_pretrained, fetch_pretrained, get_pretrained, is_pretrained


def load_model(uri: str, *, device: str | torch.device | None = None) -> CATSeg:
    """Load released weights by name (:func:`catseg.list_pretrained`, e.g. ``"vit_b16"``), a checkpoint directory
    written by :func:`catseg.save_model`, or an official CAT-Seg ``.pth`` file.

    A registered name always means the released weights; write ``./vit_b16`` for a local directory of that name.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError("checkpoint URI must be a non-empty string")
    if is_pretrained(uri):
        model = _load_pretrained(uri)
    elif is_official_checkpoint(uri):
        model = load_official_checkpoint(uri)
    else:
        model = load_catseg_checkpoint(uri)
    return model.to(device) if device is not None else model


def _load_pretrained(name: str) -> CATSeg:
    weights = get_pretrained(name)
    model = load_official_checkpoint(fetch_pretrained(name))
    if model.config.name != weights.architecture:
        raise ValueError(
            f"released weights {name!r} ({weights.uri}) hold a {model.config.name!r} model, "
            f"not {weights.architecture!r}: the cached file is not the released one; delete it from the "
            "Hugging Face cache (huggingface-cli delete-cache) and retry"
        )
    return model


def check_checkpoint(uri: str) -> ModelConfig:
    """The architecture of a checkpoint, checked without building the model: cheap enough for a job's driver.

    Released names: cached or reachable (a HEAD request). Our format: ``config.json`` parses and the safetensors
    header (read alone, not the weights) lists exactly the architecture's tensors with their shapes and fits the
    file. Official ``.pth``: it unpickles with ``weights_only=True`` (memory-mapped when local) and every key
    converts with the right shape. Raises ValueError / FileNotFoundError / PretrainedUnavailableError with one line.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError("checkpoint URI must be a non-empty string")
    if is_pretrained(uri):
        check_pretrained(uri)
        return get_config(get_pretrained(uri).architecture)
    if is_official_checkpoint(uri):
        return check_official_checkpoint(uri)
    return check_catseg_checkpoint(uri)
