"""Checkpoints: our safetensors format (local and S3), official CAT-Seg files, CLIP weight files, bad files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import open_clip
import pytest
import torch

import catseg
from catseg.clip_backbone import create_clip
from catseg.convert import catseg_to_official_key, official_to_catseg_key

CLASSES = ["person", "tree", "grass"]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    return torch.rand(1, 3, 200, 300) * 255


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images, CLASSES)


def test_save_load_round_trip_gives_identical_logits(tiny_model, tmp_path, images):
    catseg.save_model(tiny_model, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    loaded = catseg.load_model(str(tmp_path / "ckpt"))
    assert loaded.config == tiny_model.config
    assert torch.equal(_logits(loaded, images), _logits(tiny_model, images))


def test_save_load_round_trip_through_s3(tiny_model, s3_bucket, images):
    uri = f"s3://{s3_bucket}/models/tiny"
    catseg.save_model(tiny_model, uri)
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"{s3_bucket}/models/tiny/model.safetensors")
    loaded = catseg.load_model(uri)
    assert torch.equal(_logits(loaded, images), _logits(tiny_model, images))
    # the weights file itself is accepted too
    assert torch.equal(_logits(catseg.load_model(uri + "/model.safetensors"), images), _logits(tiny_model, images))


def _official_checkpoint(model) -> dict:
    """What the reference's detectron2 checkpointer writes: our tensors under the official names."""
    state = {catseg_to_official_key(k): v.clone() for k, v in model.state_dict().items()}
    # derived tensors the reference also stores; the converter must skip them
    state["sem_seg_head.predictor.transformer.layers.0.swin_block.block_2.attn_mask"] = torch.zeros(4, 144, 144)
    return {"model": state, "iteration": 80000}


def test_key_mapping_is_invertible(tiny_model):
    for key in tiny_model.state_dict():
        official = catseg_to_official_key(key)
        assert official_to_catseg_key(official) == key
    assert catseg_to_official_key("aggregator.layers.1.class_attention.mlp.2.weight") == (
        "sem_seg_head.predictor.transformer.layers.1.attention.MLP.2.weight"
    )
    assert catseg_to_official_key("decoder.up1.conv.3.weight") == (
        "sem_seg_head.predictor.transformer.decoder1.conv.double_conv.3.weight"
    )
    assert catseg_to_official_key("backbone.clip.visual.transformer.resblocks.0.attn.q_proj_weight") == (
        "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.attn.q_proj_weight"
    )


def test_official_checkpoint_loads_and_gives_identical_logits(tiny_model, tmp_path, images):
    path = tmp_path / "model_tiny.pth"
    torch.save(_official_checkpoint(tiny_model), path)
    loaded = catseg.load_model(str(path))
    assert loaded.config.name == "tiny"  # detected from tensor shapes
    assert torch.equal(_logits(loaded, images), _logits(tiny_model, images))


def test_convert_command_writes_our_format(tiny_model, tmp_path, images):
    source, target = tmp_path / "model.pth", tmp_path / "converted"
    torch.save(_official_checkpoint(tiny_model), source)
    result = subprocess.run(
        [sys.executable, "-m", "catseg.convert", str(source), str(target)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert torch.equal(_logits(catseg.load_model(str(target)), images), _logits(tiny_model, images))


def test_official_checkpoint_with_arbitrary_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "callback": os.getcwd, "obj": object()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        catseg.load_model(str(path))


def test_official_checkpoint_of_unknown_architecture_is_refused(tiny_model, tmp_path):
    checkpoint = _official_checkpoint(tiny_model)
    key = "sem_seg_head.predictor.clip_model.visual.conv1.weight"
    checkpoint["model"][key] = torch.zeros(96, 3, 8, 8)
    torch.save(checkpoint, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="matches none of"):
        catseg.load_model(str(tmp_path / "odd.pth"))


def test_missing_checkpoint_says_what_a_checkpoint_is(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json and model\.safetensors"):
        catseg.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not found"):
        catseg.load_model(str(tmp_path / "nowhere.pth"))


def test_corrupt_weights_are_refused_with_the_file_named(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(Path(tiny_checkpoint, "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt"):
        catseg.load_model(str(broken))


def test_truncated_weights_are_refused(tiny_checkpoint, tmp_path):
    broken = tmp_path / "truncated"
    broken.mkdir()
    (broken / "config.json").write_text(Path(tiny_checkpoint, "config.json").read_text())
    data = Path(tiny_checkpoint, "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        catseg.load_model(str(broken))


def test_corrupt_official_file_is_refused(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="could not be read"):
        catseg.load_model(str(tmp_path / "bad.pth"))


def test_config_with_unknown_keys_is_refused(tiny_checkpoint, tmp_path):
    broken = tmp_path / "odd-config"
    broken.mkdir()
    (broken / "config.json").write_text('{"name": "tiny", "colour": "blue"}')
    with pytest.raises(ValueError, match="unknown model config keys"):
        catseg.load_model(str(broken))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_clip_weights_file_loads_into_both_encoders(where, tmp_path, request):
    """A CLIP weights file in open_clip/OpenAI layout (packed in_proj_weight), as `clip_pretrained`."""
    torch.manual_seed(5)
    source = open_clip.create_model("catseg-tiny-clip")
    state = source.state_dict()
    if where == "local":
        uri = str(tmp_path / "clip.pt")
        torch.save(state, uri)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/weights/clip.pt"
        with fsspec.open(uri, "wb") as f:
            torch.save(state, f)
    model = catseg.build_model("tiny", clip_pretrained=uri)
    block = model.backbone.clip.transformer.resblocks[1].attn
    q, k, v = state["transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(block.q_proj_weight, q) and torch.equal(block.k_proj_weight, k)
    assert torch.equal(block.v_proj_weight, v)
    assert torch.equal(model.backbone.clip.visual.conv1.weight, state["visual.conv1.weight"])


def test_split_attention_matches_open_clip_attention():
    torch.manual_seed(2)
    reference = open_clip.create_model("catseg-tiny-clip").eval()
    split = create_clip(catseg.get_config("tiny")).eval()
    split.load_state_dict({k: v for k, v in _split_state(reference.state_dict()).items()}, strict=True)
    tokens = open_clip.get_tokenizer("catseg-tiny-clip")(["a photo of a dog", "a photo of a house"])
    with torch.no_grad():
        torch.testing.assert_close(split.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=1e-5)
        image = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(split.encode_image(image), reference.encode_image(image), atol=1e-5, rtol=1e-5)


def _split_state(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.endswith("attn.in_proj_weight"):
            for name, part in zip(("q", "k", "v"), value.chunk(3), strict=True):
                out[key.replace("in_proj_weight", f"{name}_proj_weight")] = part
        else:
            out[key] = value
    return out


def test_missing_clip_weights_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP weights"):
        catseg.build_model("tiny", clip_pretrained=str(tmp_path / "missing.pt"))
