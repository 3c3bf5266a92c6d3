"""Exports opened by the real tools: Hugging Face datasets, Label Studio (label-studio-sdk), COCO (pycocotools),
and the review queue. One real labelling run on S3 (3 classes, tiny model) and a 300-class output written by our
own encode stage (16-bit masks with ids above 255) go through every export."""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from labelling_samples import encode_image, label_on_s3, noise_array
from PIL import Image

from jobs import preview as preview_cli
from jobs import query as query_cli
from pipelines.labelling import LabelOutput, open_labels
from pipelines.labelling.stages import encode_predictions
from pipelines.masks import decode_mask_png
from pipelines.model_stage import PREDICTED_SCHEMA

CLASSES = ["cat", "dog", "sky"]
WIDE = [f"thing {i}" for i in range(300)]


def _rows(output: str) -> list[dict]:
    return [r for r in open_labels(output).to_table().to_pylist() if r["error"] is None]


@pytest.fixture(scope="module")
def labelled(ray_cluster, s3_endpoint, tiny_checkpoint):
    """(output URI, {image_id: row}, {source_uri: pixels}) of a real run on S3."""
    bucket = f"exports-{os.getpid() % 10000}"
    pixels = {f"e{i}.png": noise_array(30 + 6 * i, 44, 3, 70 + i) for i in range(5)}
    files = {name: encode_image(Image.fromarray(array), "PNG") for name, array in pixels.items()}
    files["broken.jpg"] = b"not a jpeg"
    output = label_on_s3(s3_endpoint, bucket, files, CLASSES, tiny_checkpoint)
    rows = {r["image_id"]: r for r in _rows(output)}
    sources = {f"s3://{bucket}/in/{name}": array for name, array in pixels.items()}
    return output, rows, sources


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 300-class output: label maps with ids on both sides of 255, through encode_predictions (16-bit PNGs)."""
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(3)
    image_ids, sources, labels, confidence = [], [], [], []
    for i in range(3):
        height, width = 20 + 3 * i, 26
        source = root / "images" / f"w{i}.png"
        source.parent.mkdir(exist_ok=True)
        Image.fromarray(noise_array(height, width, 3, i)).save(source)
        label_map = rng.choice([0, 7, 254, 255, 256, 299], size=(height, width)).astype(np.uint16)
        image_ids.append(f"wide{i:02d}")
        sources.append(str(source))
        labels.append(label_map.tobytes())
        confidence.append(rng.uniform(0.2, 1.0, (height, width)).astype(np.float32).tobytes())
    predicted = pa.table(
        {
            "image_id": image_ids,
            "source_uri": sources,
            "width": pa.array([26] * 3, pa.int32()),
            "height": pa.array([20, 23, 26], pa.int32()),
            "labels": pa.array(labels, pa.large_binary()),
            "confidence": pa.array(confidence, pa.large_binary()),
            "mean_confidence": [0.6, 0.5, 0.7],
            "low_confidence_fraction": [0.2, 0.3, 0.1],
            "mean_margin": [0.3, 0.1, 0.2],
            "error": pa.array([None] * 3, pa.string()),
            "error_kind": pa.array([None] * 3, pa.string()),
        },
        schema=PREDICTED_SCHEMA,
    )
    rows = encode_predictions(predicted, class_names=WIDE, run_id="wide-run", model_id="tiny-model", vocab_id="v")
    output = root / "out"
    (output / "data").mkdir(parents=True)
    pq.write_table(rows, output / "data" / "part-0.parquet")
    LabelOutput(str(output)).write_manifest(
        {"run_id": "wide-run", "vocabulary": {"names": WIDE}, "model": {"id": "tiny-model"},
         "config": {"unlabelled_value": 65535, "mask_bits": 16}},
    )  # fmt: skip
    return str(output), {r["image_id"]: r for r in _rows(str(output))}, dict.fromkeys(sources)


@pytest.fixture(params=["labelled", "wide"])
def run(request):
    return request.getfixturevalue(request.param)


def _names(output: str) -> list[str]:
    return WIDE if output.endswith("out") and "wide" in output else CLASSES


def test_hf_export_opens_with_datasets_and_its_labels_are_our_masks(run, tmp_path):
    import datasets

    output, rows, sources = run
    embed = all(array is not None for array in sources.values())  # the S3 run embeds its images
    args = ["--output", output, "--export", "hf", "--to", str(tmp_path / "hf"), *(["--embed-images"] * embed)]
    assert query_cli.main(args) == 0
    shards = sorted(glob.glob(str(tmp_path / "hf" / "data" / "train-*.parquet")))
    from_files = datasets.load_dataset("parquet", data_files=shards, split="train", cache_dir=str(tmp_path / "c1"))
    from_folder = datasets.load_dataset(str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "c2"))
    for dataset in (from_files, from_folder):
        assert isinstance(dataset.features["image"], datasets.Image)
        assert isinstance(dataset.features["label"], datasets.Image)
        assert sorted(dataset["image_id"]) == sorted(rows)
        for example in dataset:
            ours = decode_mask_png(rows[example["image_id"]]["mask_png"])
            label = np.asarray(example["label"])
            assert label.shape == ours.shape and np.array_equal(label.astype(np.int64), ours.astype(np.int64))
            assert example["mean_margin"] == rows[example["image_id"]]["mean_margin"]
            assert [s["class_id"] for s in example["class_stats"]] == [
                s["class_id"] for s in rows[example["image_id"]]["class_stats"]
            ]
            if embed:
                expected = sources[rows[example["image_id"]]["source_uri"]]
                assert np.array_equal(np.asarray(example["image"].convert("RGB")), expected)
    if _names(output) is WIDE:
        assert any((np.asarray(e["label"]) > 255).any() for e in from_folder)  # 16 bits survived
    id2label = json.loads((tmp_path / "hf" / "id2label.json").read_text())
    assert id2label == {str(i): name for i, name in enumerate(_names(output))}
    assert "run" in (tmp_path / "hf" / "README.md").read_text()


def test_label_studio_results_decode_to_our_masks_with_the_sdk(run, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface

    output, rows, _ = run
    assert query_cli.main(["--output", output, "--export", "label-studio", "--to", str(tmp_path)]) == 0
    interface = LabelInterface((tmp_path / "label_config.xml").read_text())
    tasks = [task for path in sorted(tmp_path.glob("tasks-*.json")) for task in json.loads(path.read_text())]
    assert sorted(t["data"]["image_id"] for t in tasks) == sorted(rows)
    names = _names(output)
    for task in tasks:
        row = rows[task["data"]["image_id"]]
        ours = decode_mask_png(row["mask_png"])
        [prediction] = task["predictions"]
        assert prediction["score"] == row["mean_margin"] and prediction["model_version"]
        assert interface.validate_prediction(prediction), prediction["result"][0]["value"]["brushlabels"]
        seen = set()
        for result in prediction["result"]:
            [name] = result["value"]["brushlabels"]
            class_id = names.index(name)
            decoded = decode_rle(result["value"]["rle"]).reshape(row["height"], row["width"], 4)[:, :, 3]
            assert np.array_equal(decoded > 0, ours == class_id), name
            seen.add(class_id)
        assert seen == {s["class_id"] for s in row["class_stats"]}


def test_coco_export_loads_in_pycocotools_and_every_annotation_is_our_mask(run, tmp_path):
    from pycocotools.coco import COCO

    output, rows, _ = run
    assert query_cli.main(["--output", output, "--export", "coco", "--to", str(tmp_path)]) == 0
    coco = COCO(str(tmp_path / "annotations.json"))
    names = _names(output)
    assert [coco.cats[i + 1]["name"] for i in range(len(names))] == names  # 1-based, every class
    assert len(coco.imgs) == len(rows)
    covered = {}
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        ours = decode_mask_png(rows[image["catseg_image_id"]]["mask_png"])
        binary = coco.annToMask(annotation).astype(bool)
        assert np.array_equal(binary, ours == annotation["category_id"] - 1)
        assert annotation["area"] == binary.sum()
        covered.setdefault(image["catseg_image_id"], np.zeros(ours.shape, bool))[binary] = True
    for image_id, row in rows.items():  # every labelled pixel is in exactly one annotation
        unlabelled = 65535 if len(_names(output)) > 255 else 255
        assert np.array_equal(covered[image_id], decode_mask_png(row["mask_png"]) != unlabelled)


def test_review_lists_the_least_certain_and_limits_the_exports(labelled, tmp_path, capsys):
    output, rows, _ = labelled
    by_margin = sorted(rows.values(), key=lambda r: (r["mean_margin"], r["mean_confidence"]))
    assert all(0 <= r["mean_margin"] <= r["mean_confidence"] <= 1 for r in by_margin)
    assert query_cli.main(["--output", output, "--review", "3", "--format", "json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image_id"] for r in listed] == [r["image_id"] for r in by_margin[:3]]
    args = ["--output", output, "--review", "2", "--export", "label-studio", "--to", str(tmp_path / "ls")]
    assert query_cli.main(args) == 0
    tasks = json.loads((tmp_path / "ls" / "tasks-00000.json").read_text())
    assert [t["data"]["image_id"] for t in tasks] == [r["image_id"] for r in by_margin[:2]]
    assert preview_cli.main(["--output", output, "--to", str(tmp_path / "p"), "--n", "2", "--order", "uncertain"]) == 0
    page = (tmp_path / "p" / "index.html").read_text()
    first, second = (page.find(r["source_uri"]) for r in by_margin[:2])
    assert 0 <= first < second and by_margin[2]["source_uri"] not in page


def test_a_missing_extra_is_named_in_one_line(wide, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)  # as if pycocotools were not installed
    output, _, _ = wide
    assert query_cli.main(["--output", output, "--export", "coco", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'catseg-ray[export]'" in err and "pycocotools" in err
    assert not Path(tmp_path / "annotations.json").exists()
