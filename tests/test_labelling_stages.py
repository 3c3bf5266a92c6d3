"""The pipeline's stages and mask helpers as plain functions (no Ray): decoding, encoding, thresholds, RLE."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from labelling_samples import bad_images, encode_image, good_images
from PIL import Image

from pipelines.images import ImageDecodeError, decode_image
from pipelines.labelling.stages import DECODED_SCHEMA, decode_images, encode_predictions
from pipelines.masks import (
    class_statistics,
    decode_confidence_png,
    decode_mask_png,
    encode_mask_png,
    mask_dtype,
    unlabelled_value,
)
from pipelines.model_stage import PREDICTED_SCHEMA
from pipelines.workers import actor_resources


@pytest.mark.parametrize("name", sorted(good_images()))
def test_good_images_decode_to_rgb_of_their_displayed_size(name):
    data, (height, width) = good_images()[name]
    rgb = decode_image(data)
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8


def test_16_bit_grayscale_scales_over_the_full_range():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    rgb = decode_image(encode_image(Image.fromarray(values), "PNG"))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_exif_orientation_is_applied():
    stored = np.zeros((10, 30, 3), np.uint8)
    stored[:, :5] = 255  # white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display: the band ends up on top
    rgb = decode_image(encode_image(Image.fromarray(stored), "JPEG", exif=exif, quality=100))
    assert rgb.shape == (30, 10, 3)
    assert rgb[:5].mean() > 200 and rgb[10:].mean() < 50


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_bytes_raise_a_readable_decode_error(name):
    with pytest.raises(ImageDecodeError):
        decode_image(bad_images()[name])


def test_decode_stage_keeps_failed_rows_and_their_neighbours():
    good, (height, width) = good_images()["gray.png"]
    batch = pa.table(
        {
            "image_id": ["a", "b", "c"],
            "source_uri": ["u/a", "u/b", "u/c"],
            "data": pa.array([good, b"junk", None], pa.large_binary()),
            "error": [None, None, "read: FileNotFoundError: u/c"],
        }
    )
    rows = decode_images(batch).to_pylist()
    assert (rows[0]["height"], rows[0]["width"], rows[0]["error"]) == (height, width, None)
    assert len(rows[0]["pixels"]) == height * width * 3
    assert rows[1]["error"] == "decode: not a recognized image format" and rows[1]["pixels"] is None
    assert rows[2]["error"] == "read: FileNotFoundError: u/c"


def _predicted(labels: np.ndarray, confidence: np.ndarray, error: str | None = None) -> pa.Table:
    height, width = labels.shape
    return pa.table(
        {
            "image_id": ["x", "y"],
            "source_uri": ["u/x", "u/y"],
            "width": pa.array([width, None], pa.int32()),
            "height": pa.array([height, None], pa.int32()),
            "labels": pa.array([labels.tobytes(), None], pa.large_binary()),
            "confidence": pa.array([confidence.astype(np.float32).tobytes(), None], pa.large_binary()),
            "mean_confidence": [0.5, None],
            "low_confidence_fraction": [0.25, None],
            "mean_margin": [0.125, None],
            "error": [None, "decode: empty file (0 bytes)"],
            "error_kind": [None, "permanent"],
        },
        schema=PREDICTED_SCHEMA,
    )


def test_confidence_threshold_writes_the_unlabelled_value_8_bit():
    labels = np.array([[0, 1, 2], [2, 2, 1]], np.uint8)
    confidence = np.array([[0.9, 0.2, 0.8], [0.7, 0.1, 0.6]], np.float32)
    out = encode_predictions(
        _predicted(labels, confidence), class_names=["a", "b", "c"], run_id="r", model_id="m", vocab_id="v",
        with_confidence=True, confidence_threshold=0.5,
    ).to_pylist()  # fmt: skip
    mask = decode_mask_png(out[0]["mask_png"])
    assert mask.tolist() == [[0, 255, 2], [2, 255, 1]]
    stats = {s["class_name"]: s for s in out[0]["class_stats"]}
    assert stats["c"]["pixel_count"] == 2 and stats["c"]["fraction"] == pytest.approx(2 / 6)
    assert stats["c"]["mean_score"] == pytest.approx(0.75)
    assert stats["b"]["pixel_count"] == 1 and stats["b"]["mean_score"] == pytest.approx(0.6)
    assert np.allclose(decode_confidence_png(out[0]["confidence_png"]), confidence, atol=1 / 255)
    assert out[1]["mask_png"] is None and out[1]["error"] == "decode: empty file (0 bytes)"
    assert {out[0]["run_id"], out[0]["model_id"], out[0]["vocab_id"]} == {"r", "m", "v"}


def test_large_vocabularies_get_16_bit_masks_with_65535_unlabelled():
    names = [f"class {i}" for i in range(300)]
    labels = np.array([[0, 299], [256, 17]], np.uint16)
    confidence = np.array([[0.9, 0.9], [0.1, 0.9]], np.float32)
    out = encode_predictions(
        _predicted(labels, confidence), class_names=names, run_id="r", model_id="m", vocab_id="v",
        confidence_threshold=0.5,
    ).to_pylist()  # fmt: skip
    raw = out[0]["mask_png"]
    assert Image.open(io.BytesIO(raw)).mode in ("I;16", "I")
    mask = decode_mask_png(raw)
    assert mask.dtype == np.uint16 and mask.tolist() == [[0, 299], [65535, 17]]
    assert [s["class_id"] for s in out[0]["class_stats"]] == [0, 17, 299]
    assert out[0]["confidence_png"] is None


def test_mask_types_follow_the_vocabulary_size():
    assert (mask_dtype(255), unlabelled_value(255)) == (np.uint8, 255)
    assert (mask_dtype(256), unlabelled_value(256)) == (np.uint16, 65535)
    with pytest.raises(ValueError):
        mask_dtype(65536)


def test_mask_png_round_trips_both_depths():
    rng = np.random.default_rng(0)
    for dtype, high in ((np.uint8, 256), (np.uint16, 65536)):
        mask = rng.integers(0, high, (17, 23)).astype(dtype)
        decoded = decode_mask_png(encode_mask_png(mask))
        assert decoded.dtype == dtype and np.array_equal(decoded, mask)


def test_class_statistics_skip_unlabelled_and_absent_classes():
    mask = np.array([[0, 0, 255], [3, 3, 3]], np.uint8)
    confidence = np.full(mask.shape, 0.5, np.float32)
    stats = class_statistics(mask, confidence, ["a", "b", "c", "d"], 255)
    assert [(s["class_name"], s["pixel_count"]) for s in stats] == [("a", 2), ("d", 3)]


def test_actor_resources_follow_the_cluster_gpus_and_warn_when_there_are_none(caplog):
    assert actor_resources(None, None, cluster_gpus=4) == (1.0, 4)
    assert actor_resources(0.5, None, cluster_gpus=4) == (0.5, 8)
    assert actor_resources(None, 2, cluster_gpus=4) == (1.0, 2)
    assert actor_resources(0, None, cluster_gpus=4) == (0, 1)
    assert "no GPU" not in caplog.text
    # GPU workers scaled to zero look like a CPU cluster: the default runs on CPU, and says how to ask for GPUs
    assert actor_resources(None, None, cluster_gpus=0) == (0.0, 1)
    assert "--num-gpus-per-actor 1" in caplog.text
    caplog.clear()
    assert actor_resources(1, 3, cluster_gpus=0) == (1, 3)  # asked for explicitly: Ray's autoscaler starts them
    assert "no GPU" not in caplog.text


def _decode_batch(images: list[bytes], **kwargs) -> list[dict]:
    batch = pa.table(
        {
            "image_id": [str(i) for i in range(len(images))],
            "source_uri": [f"x{i}.png" for i in range(len(images))],
            "data": pa.array(images, pa.large_binary()),
            "error": pa.array([None] * len(images), pa.string()),
        }
    )
    return decode_images(batch, **kwargs).to_pylist()


def test_images_over_the_pixel_cap_become_error_rows_and_neighbours_decode():
    small = encode_image(Image.new("RGB", (20, 20)), "PNG")
    large = encode_image(Image.new("RGB", (40, 30)), "PNG")
    rows = _decode_batch([large, small], max_pixels=1000)
    assert "40x30" in rows[0]["error"] and "raise --max-pixels" in rows[0]["error"] and rows[0]["pixels"] is None
    assert rows[1]["error"] is None and (rows[1]["width"], rows[1]["height"]) == (20, 20)


def test_oversize_images_and_decompression_bombs_are_refused_from_their_headers():
    # bitmap mode: a few kB as PNG, and little memory for this test itself
    oversize = encode_image(Image.new("1", (12_000, 9_000)), "PNG")  # 108 MP: over the default 100 MP cap
    bomb = encode_image(Image.new("1", (14_000, 13_000)), "PNG")  # 182 MP: over Pillow's own bomb limit too
    assert len(oversize) < 1_000_000 and len(bomb) < 1_000_000
    capped, bombed = _decode_batch([oversize, bomb])
    assert "12000x9000 = 108.0 MP, over the limit of 100 MP; raise --max-pixels" in capped["error"]
    assert bombed["error"].startswith("decode: image too large") and "182000000 pixels" in bombed["error"]
    [uncapped] = _decode_batch([bomb], max_pixels=None)  # Pillow's limit holds whatever the cap
    assert uncapped["error"].startswith("decode: image too large")


def test_review_signals_come_from_the_predictors_top_two_probabilities(tiny_checkpoint):
    from pipelines.model_stage import SegmentationModel

    top1 = np.array([[0.9, 0.4, 0.8, 0.6], [0.3, 0.7, 0.55, 0.95]], np.float32)
    top2 = np.array([[0.05, 0.35, 0.1, 0.3], [0.3, 0.2, 0.4, 0.01]], np.float32)
    labels = np.array([[0, 1, 2, 0], [1, 1, 2, 0]], np.uint8)

    class KnownPredictor:  # what catseg.Predictor returns with runner_up=True
        def predict_labels_batch(self, images, classes, *, runner_up=False):
            assert runner_up
            return [(labels, top1, top2) for _ in images]

    stage = SegmentationModel(tiny_checkpoint, ["cat", "dog", "sky"], low_confidence_below=0.5)
    stage.predictor = KnownPredictor()
    decoded = pa.table(
        {
            "image_id": ["a", "b"],
            "source_uri": ["u/a", "u/b"],
            "width": pa.array([4, None], pa.int32()),
            "height": pa.array([2, None], pa.int32()),
            "pixels": pa.array([np.zeros((2, 4, 3), np.uint8).tobytes(), None], pa.large_binary()),
            "error": [None, "decode: empty file (0 bytes)"],
            "error_kind": [None, "permanent"],
        },
        schema=DECODED_SCHEMA,
    )
    predicted = stage(decoded)
    out = encode_predictions(predicted, class_names=["cat", "dog", "sky"], run_id="r", model_id="m", vocab_id="v")
    expected = {
        "mean_confidence": float(top1.astype(np.float64).mean()),
        "low_confidence_fraction": 2 / 8,  # 0.4 and 0.3
        "mean_margin": float((top1.astype(np.float64) - top2.astype(np.float64)).mean()),
    }
    for table in (predicted, out):
        for name, value in expected.items():
            assert table[name][0].as_py() == pytest.approx(value, abs=1e-12), name
            assert table[name][1].as_py() is None  # error rows carry no signals
