"""Evaluation end to end: a real local Ray, data in a moto S3 bucket, an oracle model stage and the tiny model."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle as cloudpickle
from PIL import Image

from jobs import evaluate as evaluate_cli
from pipelines import storage
from pipelines.evaluation import EvaluationConfig, evaluate, load_benchmark, write_report

# The oracle classes below travel to Ray workers by value: workers cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLASSES = ["cat", "dog", "sky", "grass"]  # "grass" never occurs in the labels
PALETTE = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=np.uint8)
IGNORE = 255
CONFIG = EvaluationConfig(batch_size=2)


def scene(seed: int, height: int = 40, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(image, label): sky on top, a cat and a dog box below, an ignored band; image colour = PALETTE[class]."""
    rng = np.random.default_rng(seed)
    label = np.full((height, width), 2, np.uint8)
    split = int(rng.integers(8, 16))
    label[split:, : width // 2] = 0
    label[split:, width // 2 :] = 1
    label[split - 2 : split, :] = IGNORE
    image = PALETTE[np.where(label == IGNORE, 0, label)]
    return image, label


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class ColourOracle:
    """Predictor factory: reads the class back from the pixel colour (perfect on ``scene`` images);
    ``remap`` then corrupts it in a known way (class id -> other vocabulary id)."""

    def __init__(self, remap: dict[int, int] | None = None, palette: np.ndarray = PALETTE) -> None:
        self.remap = remap or {}
        self.palette = palette

    def __call__(self):
        def predict(images: list[np.ndarray], class_names: list[str]) -> list[np.ndarray]:
            out = []
            for image in images:
                matches = (image[:, :, None, :] == self.palette[None, None]).all(axis=-1)
                labels = matches.argmax(axis=-1)
                for source, target in self.remap.items():
                    labels = np.where(labels == source, target, labels)
                out.append(labels)
            return out

        return predict


@pytest.fixture(scope="module")
def bucket(s3_endpoint, ray_cluster):
    """3 good scenes, a corrupt image and a corrupt label, listed in a Parquet manifest, in a fresh bucket."""
    name = f"eval-e2e-{os.getpid() % 10000}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    root = f"s3://{name}/data"
    rows, labels = [], []
    for i in range(3):
        image, label = scene(i)
        storage.write_bytes(f"{root}/images/{i}.png", png(image))
        storage.write_bytes(f"{root}/labels/{i}.png", png(label))
        rows.append((f"images/{i}.png", f"labels/{i}.png"))
        labels.append(label)
    storage.write_bytes(f"{root}/images/bad.png", b"not an image")
    storage.write_bytes(f"{root}/labels/bad.png", png(scene(7)[1]))
    storage.write_bytes(f"{root}/images/cut.png", png(scene(8)[0]))
    storage.write_bytes(f"{root}/labels/cut.png", png(scene(8)[1])[:40])  # truncated label file
    rows += [("images/bad.png", "labels/bad.png"), ("images/cut.png", "labels/cut.png")]
    table = pa.table({"image_uri": [r[0] for r in rows], "label_uri": [r[1] for r in rows]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(f"{root}/val.parquet", buffer.getvalue())
    storage.write_text(f"{root}/classes.txt", "\n".join(CLASSES) + "\n")
    return {"root": root, "labels": labels}


def manifest_set(bucket):
    return load_benchmark("manifest", f"{bucket['root']}/val.parquet", classes=f"{bucket['root']}/classes.txt")


def pixels_of(labels: list[np.ndarray], class_id: int) -> int:
    return int(sum((label == class_id).sum() for label in labels))


def test_oracle_gives_miou_one_and_bad_files_are_counted(bucket):
    result = evaluate(manifest_set(bucket), ColourOracle(), CONFIG, model_id="oracle")
    assert result.metrics.miou == 1.0 and result.metrics.pixel_accuracy == 1.0
    assert result.images_total == 5 and result.images_evaluated == 3 and result.images_failed == 2
    assert {e["image_uri"].rsplit("/", 1)[1] for e in result.errors} == {"bad.png", "cut.png"}
    assert all(e["error"].startswith("read: ") for e in result.errors)
    labelled = sum(int((label != IGNORE).sum()) for label in bucket["labels"])
    assert result.labelled_pixels == labelled == int(result.confusion.sum())
    assert result.metrics.classes_in_mean == 3  # grass has no ground truth

    uri = write_report(result, f"s3://{bucket['root'].split('/')[2]}/reports/oracle")
    report = json.loads(storage.read_text(uri))
    assert uri.endswith("/evaluation_manifest.json")
    assert report["miou"] == 1.0 and report["image_count"] == 3 and report["images"]["failed"] == 2
    assert report["predictor"] == {}  # the oracle has no settings to record
    assert [row["name"] for row in report["per_class"]] == CLASSES
    assert report["per_class"][3]["iou"] is None and report["per_class"][1]["iou"] == 1.0
    assert storage.exists(uri.removesuffix(".json") + "_confusion.npy")


def test_known_corruption_gives_the_exact_expected_miou(bucket):
    # every dog pixel predicted as grass: cat and sky stay perfect, dog gets IoU 0, grass (no ground truth)
    # stays out of the mean -> mIoU = (1 + 0 + 1) / 3
    result = evaluate(manifest_set(bucket), ColourOracle(remap={1: 3}), CONFIG)
    labels = bucket["labels"]
    iou = result.metrics.iou
    assert (iou[0], iou[1], iou[2]) == (1.0, 0.0, 1.0) and np.isnan(iou[3])
    assert result.metrics.miou == pytest.approx(2 / 3, abs=1e-12)
    cat, dog, sky = (pixels_of(labels, k) for k in range(3))
    assert result.metrics.pixel_accuracy == pytest.approx((cat + sky) / (cat + dog + sky), abs=1e-12)
    assert result.metrics.predicted_pixels[3] == dog


def test_cli_with_the_tiny_model_on_a_finetuning_run_directory(bucket, tiny_checkpoint, tmp_path, capsys):
    # a fine-tuning run layout: the evaluator must pick the latest step's model/
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_checkpoint, run / f"step_{step:08d}" / "model")
        (run / f"step_{step:08d}" / "progress.json").write_text(json.dumps({"step": step}))
    output = f"s3://{bucket['root'].split('/')[2]}/reports/tiny"
    code = evaluate_cli.main(
        [
            "--data",
            f"{bucket['root']}/val.parquet",
            "--benchmark",
            "manifest",
            "--classes",
            f"{bucket['root']}/classes.txt",
            "--checkpoint",
            str(run),
            "--output",
            output,
            "--batch-size",
            "2",
            "--limit",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(storage.read_text(f"{output}/evaluation_manifest.json"))
    assert report["model"] == f"tiny@{run}/step_00000002/model"
    assert report["predictor"]["precision"] == "float32"
    assert report["images"] == {"total": 4, "evaluated": 3, "failed": 1}  # --limit 4 keeps bad.png, not cut.png
    assert 0.0 <= report["miou"] <= 1.0 and 0.0 <= report["pixel_accuracy"] <= 1.0
    labelled = sum(int((label != IGNORE).sum()) for label in bucket["labels"])
    assert report["labelled_pixels"] == labelled
    assert sum(row["gt_pixels"] for row in report["per_class"]) == labelled
    assert sum(row["predicted_pixels"] for row in report["per_class"]) == labelled
    assert {"benchmark", "model", "miou", "pixel_accuracy", "per_class", "image_count"} <= report.keys()
    assert "grass" in out and "mIoU" in out and out.strip().splitlines()[-1].startswith("done in")


def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, tiny_checkpoint):
    code = evaluate_cli.main(["--data", str(tmp_path), "--benchmark", "pc59", "--checkpoint", tiny_checkpoint])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "prepare_pascal_context_59.py" in err and err.count("\n") == 1


def test_reviewed_images_of_a_label_studio_export_are_a_benchmark(bucket, tmp_path):
    from feedback_samples import reviewed_export

    root = bucket["root"]
    reviews = {f"{root}/images/{i}.png": label for i, label in enumerate(bucket["labels"])}
    export_uri = reviewed_export(tmp_path / "export.json", reviews, CLASSES)  # the ignored band stays unpainted
    evaluation_set = load_benchmark("label-studio", export_uri)
    assert evaluation_set.class_names == CLASSES[:3]  # the classes the export uses, in order
    result = evaluate(evaluation_set, ColourOracle(), CONFIG, model_id="oracle")
    assert result.metrics.miou == 1.0 and result.images_evaluated == 3 and result.images_failed == 0
    assert result.labelled_pixels == sum(int((label != IGNORE).sum()) for label in bucket["labels"])
    # the same reviews, one class called wrong by the model: its IoU drops to 0 (dog -> sky)
    wrong = evaluate(evaluation_set, ColourOracle(remap={1: 2}), CONFIG)
    assert wrong.metrics.iou[1] == 0.0 and wrong.metrics.iou[0] == 1.0
