"""Building, saving and loading models.

Our checkpoint format is a directory (local path or any fsspec URI such as s3://bucket/run/model):
``config.json`` (:class:`ModelConfig`) and ``model.safetensors`` (the full state dict, CLIP included).
Official CAT-Seg ``.pth`` files are converted on load; they are read with ``torch.load(weights_only=True)``,
which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import PurePosixPath
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .config import ModelConfig, get_config, list_models
from .model import CATSeg
from .pretrained import check_pretrained, fetch_pretrained, get_pretrained, is_pretrained

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OFFICIAL_SUFFIXES = (".pth", ".pt")

# Official key prefix -> ours; the longest matching prefix wins, in either direction.
OFFICIAL_KEY_MAP: list[tuple[str, str]] = [
    ("sem_seg_head.predictor.clip_model.", "backbone.clip."),
    ("sem_seg_head.predictor.transformer.conv1.", "aggregator.cost_embed."),
    ("sem_seg_head.predictor.transformer.guidance_projection.", "aggregator.appearance_guidance_proj."),
    ("sem_seg_head.predictor.transformer.text_guidance_projection.", "aggregator.text_guidance_proj."),
    ("sem_seg_head.predictor.transformer.decoder_guidance_projection.", "decoder.guidance_proj."),
    ("sem_seg_head.predictor.transformer.decoder1.conv.double_conv.", "decoder.up1.conv."),
    ("sem_seg_head.predictor.transformer.decoder2.conv.double_conv.", "decoder.up2.conv."),
    ("sem_seg_head.predictor.transformer.decoder1.", "decoder.up1."),
    ("sem_seg_head.predictor.transformer.decoder2.", "decoder.up2."),
    ("sem_seg_head.predictor.transformer.head.", "decoder.head."),
    ("upsample1.", "upsample1."),
    ("upsample2.", "upsample2."),
]
# Inside aggregator layers: official "layers.{i}.swin_block." / "layers.{i}.attention." and their children.
OFFICIAL_LAYER_PATTERNS: list[tuple[str, str]] = [
    (r"^sem_seg_head\.predictor\.transformer\.layers\.(\d+)\.swin_block\.", r"aggregator.layers.\1.spatial."),
    (
        r"^sem_seg_head\.predictor\.transformer\.layers\.(\d+)\.attention\.attention\.",
        r"aggregator.layers.\1.class_attention.",
    ),
    (
        r"^sem_seg_head\.predictor\.transformer\.layers\.(\d+)\.attention\.MLP\.",
        r"aggregator.layers.\1.class_attention.mlp.",
    ),
    (
        r"^sem_seg_head\.predictor\.transformer\.layers\.(\d+)\.attention\.",
        r"aggregator.layers.\1.class_attention.",
    ),
]
# Official tensors that are derived, not learned (recomputed by our modules).
OFFICIAL_DERIVED = re.compile(r"(\.attn_mask$|^pixel_(mean|std)$|^clip_pixel_(mean|std)$)")


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


def load_model(uri: str, *, device: str | torch.device | None = None) -> CATSeg:
    """Load released weights by name (:func:`catseg.list_pretrained`, e.g. ``"vit_b16"``), a checkpoint directory
    written by :func:`save_model`, or an official CAT-Seg ``.pth`` file.

    A registered name always means the released weights; write ``./vit_b16`` for a local directory of that name.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError("checkpoint URI must be a non-empty string")
    if is_pretrained(uri):
        model = _load_pretrained(uri)
    elif is_official_checkpoint(uri):
        model = load_official_checkpoint(uri)
    else:
        model = _load_catseg_checkpoint(uri)
    return model.to(device) if device is not None else model


def is_official_checkpoint(uri: str) -> bool:
    """Official CAT-Seg checkpoints are detectron2 ``.pth`` / ``.pt`` files; ours are directories."""
    return PurePosixPath(uri.split("?")[0]).suffix in OFFICIAL_SUFFIXES


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
        official = _read_official_state(uri, mmap=True)
        config, state = _convert_official_keys(official, uri)
        _check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, uri)
        return config
    fs, path, uri = _checkpoint_location(uri)
    config = _read_config(fs, path, uri)
    weights_uri = _join(uri, WEIGHTS_FILE)
    _check_shapes(config, _safetensors_shapes(fs, _join(path, WEIGHTS_FILE), weights_uri), weights_uri)
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


def _check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    expected = _reference_shapes(config)
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


def _load_catseg_checkpoint(uri: str) -> CATSeg:
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
    _load_state(model, state, _join(uri, WEIGHTS_FILE))
    return model.eval()


def _load_state(model: CATSeg, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    _check_shapes(model.config, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def official_to_catseg_key(key: str) -> str | None:
    """Our parameter name for an official CAT-Seg key; None for derived tensors we recompute."""
    if OFFICIAL_DERIVED.search(key):
        return None
    for pattern, replacement in OFFICIAL_LAYER_PATTERNS:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    official, ours = _longest_prefix(key, [(o, c) for o, c in OFFICIAL_KEY_MAP], KeyError)
    return ours + key[len(official) :]


def catseg_to_official_key(key: str) -> str:
    """Inverse of :func:`official_to_catseg_key` (used to write official-layout files, e.g. in tests)."""
    match = re.match(r"^aggregator\.layers\.(\d+)\.(spatial|class_attention)\.(.*)$", key)
    if match:
        index, part, rest = match.groups()
        prefix = f"sem_seg_head.predictor.transformer.layers.{index}."
        if part == "spatial":
            return f"{prefix}swin_block.{rest}"
        if rest.startswith(("q.", "k.", "v.")):
            return f"{prefix}attention.attention.{rest}"
        if rest.startswith("mlp."):
            return f"{prefix}attention.MLP.{rest[4:]}"
        return f"{prefix}attention.{rest}"
    ours, official = _longest_prefix(key, [(c, o) for o, c in OFFICIAL_KEY_MAP], KeyError)
    return official + key[len(ours) :]


def _longest_prefix(key: str, pairs: list[tuple[str, str]], error: type[Exception]) -> tuple[str, str]:
    matches = [pair for pair in pairs if key.startswith(pair[0])]
    if not matches:
        raise error(f"unrecognized checkpoint key: {key}")
    return max(matches, key=lambda pair: len(pair[0]))


def detect_official_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Which registered architecture an official state dict (already in our key names) belongs to."""
    probes = ("backbone.clip.visual.conv1.weight", "backbone.clip.text_projection", "upsample1.weight")
    for probe in probes:
        if probe not in state:
            raise ValueError(f"not an official CAT-Seg checkpoint: it has no {catseg_to_official_key(probe)}")
    for name in list_models():
        config = get_config(name)
        shapes = _reference_shapes(config)
        if all(tuple(state[p].shape) == shapes[p] for p in probes):
            return config
    conv = tuple(state[probes[0]].shape)
    raise ValueError(f"official checkpoint with visual conv1 {conv} matches none of {list_models()}")


_SHAPE_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def _reference_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    if config.name not in _SHAPE_CACHE:
        with torch.device("meta"):
            model = CATSeg(config)
        _SHAPE_CACHE[config.name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPE_CACHE[config.name]


def convert_official_state_dict(
    official: dict[str, torch.Tensor],
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    state = {}
    for key, value in official.items():
        ours = official_to_catseg_key(key)
        if ours is not None:
            state[ours] = value.float() if value.is_floating_point() else value
    return detect_official_config(state), state


def _read_official_state(uri: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a detectron2 ``.pth``, unpickled with ``weights_only=True`` only."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"official CAT-Seg checkpoint not found: {uri}")
    checkpoint = None
    if mmap and isinstance(fs, LocalFileSystem):
        # local: memory-mapped, so a driver-side check does not read gigabytes; files in torch's legacy
        # (non-zip) format cannot be mapped and are read in full below
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            checkpoint = None
    try:
        if checkpoint is None:
            with fs.open(path, "rb") as f:
                payload = f.read()
            checkpoint = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types; none of them is recoverable here
        raise ValueError(
            f"{uri} could not be read as a PyTorch checkpoint with weights_only=True ({_torch_load_reason(err)}); "
            "it is corrupt or holds objects other than tensors"
        ) from None
    official = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(official, dict) or not all(isinstance(v, torch.Tensor) for v in official.values()):
        raise ValueError(f"{uri} has no 'model' state dict of tensors; is it an official CAT-Seg checkpoint?")
    return official


def _torch_load_reason(err: BaseException) -> str:
    """The informative part of a torch.load error: its unpickler reason, not the advice to drop weights_only."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _convert_official_keys(official: dict[str, torch.Tensor], uri: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    try:
        return convert_official_state_dict(official)
    except KeyError as err:
        raise ValueError(f"{uri}: {err.args[0]}") from err


def load_official_checkpoint(uri: str) -> CATSeg:
    """Convert an official CAT-Seg checkpoint (detectron2 ``.pth`` with a ``model`` entry)."""
    config, state = _convert_official_keys(_read_official_state(uri), uri)
    model = CATSeg(config)
    _load_state(model, state, uri)
    return model.eval()


def describe_checkpoint(uri: str) -> dict:
    """The config of a checkpoint directory without loading its weights."""
    fs, path = fsspec.core.url_to_fs(uri)
    return json.loads(_read_bytes(fs, _join(path, CONFIG_FILE), uri, CONFIG_FILE))
