"""The converter against the official checkpoints' real key layout (committed as data, see tests/data/...).

The lists were enumerated from the official module definitions, not from our own inverse key map, so they check
the converter against what the released ``model_base.pth`` / ``model_large.pth`` hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import catseg
from catseg.convert import convert_official_state_dict, official_to_catseg_key

LAYOUT_DIR = Path(__file__).parent / "data" / "official_checkpoint_layout"
DERIVED = ".swin_block.block_2.attn_mask"  # the shifted-window mask: stored by the reference, rebuilt by us


def read_layout(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (LAYOUT_DIR / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(d) for d in shape.split(",")) if shape else ()
    return shapes


@pytest.mark.parametrize(("file", "architecture"), [("model_base.txt", "vit_b16"), ("model_large.txt", "vit_l14")])
def test_converter_consumes_every_official_key_with_the_right_shape(file, architecture):
    layout = read_layout(file)
    official = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    config, state = convert_official_state_dict(official)
    assert config.name == architecture  # B vs L told apart from shapes alone
    dropped = sorted(key for key in layout if official_to_catseg_key(key) is None)
    assert dropped and all(key.endswith(DERIVED) for key in dropped)
    assert len(state) == len(layout) - len(dropped)  # no two official keys land on one of ours
    with torch.device("meta"):  # shapes only
        expected = {k: tuple(v.shape) for k, v in catseg.CATSeg(config).state_dict().items()}
    assert set(state) == set(expected)  # nothing of ours left without a source, nothing extra
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_released_registry_names_the_official_files_and_sizes():
    released = {weights.name: weights for weights in catseg.list_pretrained()}
    assert {name: (w.repo_id, w.repo_type, w.filename) for name, w in released.items()} == {
        "vit_b16": ("hamacojr/CAT-Seg-weights", "space", "model_base.pth"),
        "vit_l14": ("hamacojr/CAT-Seg-weights", "space", "model_large.pth"),
    }
    for weights in released.values():
        layout = read_layout({"vit_b16": "model_base.txt", "vit_l14": "model_large.txt"}[weights.name])
        converted = sum(torch.Size(shape).numel() for key, shape in layout.items() if not key.endswith(DERIVED))
        assert weights.parameters_millions == pytest.approx(converted / 1e6, abs=0.05)
