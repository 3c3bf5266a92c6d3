"""The evaluation stages called in-process on real files (no Ray): read, predict + confusion, driver-side sum."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.evaluation.run import (
    ConfusionStage,
    EvaluationConfig,
    accumulate,
    evaluate,
)
from pipelines.evaluation.sets import load_benchmark, read_pairs
from pipelines.images import LabelIdError
from pipelines.metrics import compute_metrics
from pipelines.models import resolve_checkpoint

IGNORE = 255


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def palette_of(size: int) -> np.ndarray:
    colours = np.zeros((size, 3), np.uint8)
    colours[:, 0] = np.arange(size) * 4
    return colours


def colour_oracle(palette: np.ndarray, remap: dict[int, int] | None = None):
    """A predictor factory reading the class back from the pixel colour, then remapping ids."""

    def factory():
        def predict(images: list[np.ndarray], class_names: list[str]) -> list[np.ndarray]:
            out = []
            for image in images:
                labels = (image[:, :, None, :] == palette[None, None]).all(axis=-1).argmax(axis=-1)
                for source, target in (remap or {}).items():
                    labels = np.where(labels == source, target, labels)
                out.append(labels)
            return out

        return predict

    return factory


def pairs_table(evaluation_set) -> pa.Table:
    return pa.table(
        {"image_uri": [p[0] for p in evaluation_set.pairs], "label_uri": [p[1] for p in evaluation_set.pairs]}
    )


def run_stages(evaluation_set, factory) -> tuple:
    read = read_pairs(pairs_table(evaluation_set), evaluation_set.label_encoding, evaluation_set.num_classes)
    stage = ConfusionStage(
        factory, evaluation_set.vocabulary, evaluation_set.num_classes, evaluation_set.background_from
    )
    return read, stage(read)


def write_manifest(tmp_path, labels: dict[str, np.ndarray], palette: np.ndarray, classes: list[str]):
    for stem, label in labels.items():
        (tmp_path / f"{stem}.png").write_bytes(png(palette[np.where(label == IGNORE, 0, label)]))
        (tmp_path / f"{stem}_label.png").write_bytes(png(label))
    (tmp_path / "val.csv").write_text("image_uri,label_uri\n" + "".join(f"{s}.png,{s}_label.png\n" for s in labels))
    (tmp_path / "classes.txt").write_text("\n".join(classes))
    return load_benchmark("manifest", str(tmp_path / "val.csv"), classes=str(tmp_path / "classes.txt"))


def test_voc20b_background_prompts_are_folded_into_the_background_class(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "annotations_detectron2_bg" / "val").mkdir(parents=True)
    palette = palette_of(59)
    labels = []
    for i in range(2):
        label = np.full((24, 32), 20, np.uint8)  # background
        label[6:18, 8 + i : 24] = 14  # person
        label[0:2] = IGNORE
        # PNG bytes under a .jpg name: lossless colours for the oracle (the decoder reads by content)
        (voc / "JPEGImages" / f"2007_00000{i}.jpg").write_bytes(png(palette[np.where(label == IGNORE, 0, label)]))
        (voc / "annotations_detectron2_bg" / "val" / f"2007_00000{i}.png").write_bytes(png(label))
        labels.append(label)
    evaluation_set = load_benchmark("voc20b", str(tmp_path))
    # the oracle answers background pixels with background prompt 45 ("sky" in voc20b's list)
    _, result = run_stages(evaluation_set, colour_oracle(palette, {20: 45}))
    confusion, evaluated, failed, pixels, _ = accumulate([result], evaluation_set.num_classes)
    metrics = compute_metrics(confusion)
    assert confusion.shape == (21, 21) and evaluated == 2 and failed == 0
    assert metrics.miou == 1.0 and metrics.classes_in_mean == 2
    assert metrics.gt_pixels[20] == sum(int((label == 20).sum()) for label in labels)
    assert pixels == sum(int((label != IGNORE).sum()) for label in labels)


def test_bad_files_become_error_rows_and_the_rest_is_counted(tmp_path):
    palette = palette_of(3)
    label = np.array([[0, 1], [2, IGNORE]], np.uint8).repeat(8, 0).repeat(8, 1)
    evaluation_set = write_manifest(tmp_path, {"good": label, "broken": label, "cut": label}, palette, ["a", "b", "c"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "cut_label.png").write_bytes(png(label)[:30])
    read, result = run_stages(evaluation_set, colour_oracle(palette))
    errors = read["error"].to_pylist()
    assert errors[0] is None and errors[1].startswith("read: ") and errors[2].startswith("read: ")
    confusion, evaluated, failed, pixels, listed = accumulate([result], 3)
    assert (evaluated, failed, pixels) == (1, 2, 192) and compute_metrics(confusion).miou == 1.0
    assert [e["image_uri"].rsplit("/", 1)[1] for e in listed] == ["broken.png", "cut.png"]


def test_label_ids_beyond_the_class_list_are_fatal(tmp_path):
    palette = palette_of(10)
    good = np.zeros((8, 8), np.uint8)
    wrong = np.full((8, 8), 9, np.uint8)
    evaluation_set = write_manifest(tmp_path, {"ok": good, "wrong": wrong}, palette, ["a", "b", "c"])
    _, result = run_stages(evaluation_set, colour_oracle(palette))
    assert result["fatal"].to_pylist() == [False, True]
    with pytest.raises(LabelIdError, match=r"wrong_label.png holds class id\(s\) \[9\]"):
        accumulate([result], 3)
    # when the first label is already wrong, evaluate() refuses before starting any work
    first_wrong = write_manifest(tmp_path, {"wrong": wrong, "ok": good}, palette, ["a", "b", "c"])
    with pytest.raises(LabelIdError, match=r"wrong_label\.png"):
        evaluate(first_wrong, colour_oracle(palette), EvaluationConfig())


def test_a_failing_image_fails_alone(tmp_path):
    palette = palette_of(2)
    labels = {"a": np.zeros((8, 8), np.uint8), "b": np.ones((8, 8), np.uint8), "c": np.zeros((8, 9), np.uint8)}
    evaluation_set = write_manifest(tmp_path, labels, palette, ["x", "y"])

    def factory():
        def predict(images, class_names):
            if any(image.shape[1] == 9 for image in images):
                raise RuntimeError("out of memory")
            return [np.zeros(image.shape[:2], int) for image in images]

        return predict

    _, result = run_stages(evaluation_set, factory)
    errors = result["error"].to_pylist()
    assert errors[:2] == [None, None] and errors[2] == "model: RuntimeError: out of memory"


def test_prediction_of_the_wrong_size_or_ids_is_an_error_row(tmp_path):
    palette = palette_of(2)
    evaluation_set = write_manifest(
        tmp_path, {"a": np.zeros((8, 8), np.uint8), "b": np.zeros((8, 8), np.uint8)}, palette, ["x", "y"]
    )

    def factory():
        return lambda images, names: [np.zeros((4, 4), int), np.full((8, 8), 5)]

    _, result = run_stages(evaluation_set, factory)
    errors = result["error"].to_pylist()
    assert "prediction is (4, 4) but the label is (8, 8)" in errors[0]
    assert "outside the 2-name vocabulary" in errors[1]


def test_checkpoint_resolution_follows_finetuning_runs(tmp_path):
    model_dir = tmp_path / "plain"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({}))
    assert resolve_checkpoint(str(model_dir)) == str(model_dir)
    assert resolve_checkpoint("s3://bucket/model_base.pth") == "s3://bucket/model_base.pth"
    run = tmp_path / "run"
    for step in (900, 1000):
        (run / f"step_{step:08d}" / "model").mkdir(parents=True)
        (run / f"step_{step:08d}" / "model" / "config.json").write_text("{}")
    (run / "step_00002000").mkdir()  # incomplete: no model/config.json
    assert resolve_checkpoint(str(run)) == f"{run}/step_00001000/model"
    assert resolve_checkpoint(f"{run}/step_00000900") == f"{run}/step_00000900/model"
