"""Official CAT-Seg checkpoints: the key map to our names, architecture detection, conversion on load, and the CLI
``python -m catseg.convert IN.pth OUT``.

Official files are detectron2 ``.pth`` checkpoints read with ``torch.load(weights_only=True)``, which refuses
arbitrary pickled objects. Their key layout is pinned in ``tests/data/official_checkpoint_layout``.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import PurePosixPath

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from .checkpoint import check_shapes, load_state, reference_shapes, save_model
from .config import ModelConfig, get_config, list_models
from .model import CATSeg

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


def is_official_checkpoint(uri: str) -> bool:
    """Official CAT-Seg checkpoints are detectron2 ``.pth`` / ``.pt`` files; ours are directories."""
    return PurePosixPath(uri.split("?")[0]).suffix in OFFICIAL_SUFFIXES


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
        shapes = reference_shapes(config)
        if all(tuple(state[p].shape) == shapes[p] for p in probes):
            return config
    conv = tuple(state[probes[0]].shape)
    raise ValueError(f"official checkpoint with visual conv1 {conv} matches none of {list_models()}")


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
    load_state(model, state, uri)
    return model.eval()


def check_official_checkpoint(uri: str) -> ModelConfig:
    """The architecture of an official file, checked without building the model: it unpickles with
    ``weights_only=True`` (memory-mapped when local) and every key converts with the right shape."""
    config, state = _convert_official_keys(_read_official_state(uri, mmap=True), uri)
    check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, uri)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catseg.convert", description=__doc__)
    parser.add_argument("source", help="official .pth file (local path or fsspec URI)")
    parser.add_argument("output", help="output checkpoint directory (local path or fsspec URI)")
    args = parser.parse_args(argv)
    try:
        model = load_official_checkpoint(args.source)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_model(model, args.output)
    print(f"converted {args.source} ({model.config.name}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
