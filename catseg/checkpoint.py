"""Our checkpoint format: building a model, saving it, loading and checking it, and the tensor-shape checks every
loader shares (:func:`check_shapes`, :func:`load_state`).

A checkpoint is a directory (local path or any fsspec URI such as s3://bucket/run/model): ``config.json``
(:class:`ModelConfig`) and ``model.safetensors`` (the full state dict, CLIP included). Official CAT-Seg ``.pth``
files are read by :mod:`catseg.convert`; which loader a URI needs is decided in :mod:`catseg.load`.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .config import ModelConfig, get_config
from .model import CATSeg

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def build_model(name: str, *, clip_pretrained: str | None = None) -> CATSeg:
    """A model from the registry (:func:`catseg.list_models`): ``"vit_b16"``, ``"vit_l14"`` or ``"tiny"``.

    ``clip_pretrained`` is an open_clip pretrained tag (e.g. ``"openai"``, needs internet) or a local/fsspec
    path to CLIP weights; without it the CLIP towers are randomly initialized.
    """
    return CATSeg(get_config(name), clip_pretrained=clip_pretrained)


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def save_model(model: CATSeg, uri: str) -> str:
    """Write ``config.json`` and ``model.safetensors`` under ``uri`` (a directory path or fsspec URI)."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = save_safetensors_bytes(state, metadata={"format": "catseg", "config": model.config.to_json()})
    with fs.open(_join(path, WEIGHTS_FILE), "wb") as f:
        f.write(payload)
    # config last: a directory with a config is a complete checkpoint
    with fs.open(_join(path, CONFIG_FILE), "w") as f:
        f.write(model.config.to_json())
    return uri


def check_catseg_checkpoint(uri: str) -> ModelConfig:
    """Our format, checked without building the model: ``config.json`` parses and the safetensors header (read
    alone, not the weights) lists exactly the architecture's tensors with their shapes and fits the file."""
    fs, path, uri = _checkpoint_location(uri)
    config = _read_config(fs, path, uri)
    weights_uri = _join(uri, WEIGHTS_FILE)
    check_shapes(config, _safetensors_shapes(fs, _join(path, WEIGHTS_FILE), weights_uri), weights_uri)
    return config


def _safetensors_shapes(fs, path: str, uri: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, checked against the file size (a cut or garbage file fails)."""
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if not 2 <= header_length <= min(100_000_000, size - 8):
                raise ValueError(f"header length {header_length} does not fit a file of {size} bytes")
            header = json.loads(f.read(header_length))
        shapes, end = {}, 0
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            shapes[key] = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        if 8 + header_length + end != size:
            raise ValueError(f"the header describes {8 + header_length + end} bytes but the file has {size}")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no CAT-Seg checkpoint at {uri.rsplit('/', 1)[0]}: {WEIGHTS_FILE} is missing") from err
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"{uri} is corrupt or not a safetensors file ({err}); re-save or re-download it") from err
    return shapes


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a state whose tensor names or shapes are not exactly the architecture's, in one line."""
    expected = reference_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not match the {config.name!r} architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})"
        )


def _read_bytes(fs, path: str, uri: str, what: str) -> bytes:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"no CAT-Seg checkpoint at {uri}: {what} is missing. A checkpoint is a directory with {CONFIG_FILE} "
            f"and {WEIGHTS_FILE} (written by catseg.save_model), or an official .pth file "
            "(convert with `python -m catseg.convert IN.pth OUT`)."
        ) from err


def _checkpoint_location(uri: str) -> tuple[Any, str, str]:
    """(filesystem, directory path, directory URI) of a checkpoint directory or of its weights file."""
    fs, path = fsspec.core.url_to_fs(uri)
    if path.endswith(WEIGHTS_FILE):  # accept the weights file itself
        path = path[: -len(WEIGHTS_FILE)].rstrip("/")
        uri = uri[: -len(WEIGHTS_FILE)].rstrip("/")
    return fs, path, uri


def _read_config(fs, path: str, uri: str) -> ModelConfig:
    config_text = _read_bytes(fs, _join(path, CONFIG_FILE), uri, CONFIG_FILE)
    try:
        config = ModelConfig.from_json(config_text.decode())
        get_config(config.name)  # a config naming an architecture we do not know is refused here, by file
    except (ValueError, UnicodeDecodeError, TypeError, AttributeError) as err:
        raise ValueError(f"{_join(uri, CONFIG_FILE)} is not a valid CAT-Seg model config: {err}") from err
    return config


def load_catseg_checkpoint(uri: str) -> CATSeg:
    fs, path, uri = _checkpoint_location(uri)
    config = _read_config(fs, path, uri)
    payload = _read_bytes(fs, _join(path, WEIGHTS_FILE), uri, WEIGHTS_FILE)
    try:
        state = load_safetensors_bytes(payload)
    except (SafetensorError, ValueError) as err:
        raise ValueError(
            f"{_join(uri, WEIGHTS_FILE)} is corrupt or not a safetensors file ({err}); re-save or re-download it"
        ) from err
    model = CATSeg(config)
    load_state(model, state, _join(uri, WEIGHTS_FILE))
    return model.eval()


def load_state(model: CATSeg, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after :func:`check_shapes` (in the model's dtypes)."""
    expected = model.state_dict()
    check_shapes(model.config, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


_SHAPE_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def reference_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The architecture's tensor shapes, from a model built on the meta device (no memory), cached."""
    if config.name not in _SHAPE_CACHE:
        with torch.device("meta"):
            model = CATSeg(config)
        _SHAPE_CACHE[config.name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPE_CACHE[config.name]
