"""Synthetic segmentation data for the dataset and training tests: big solid-colour shapes, one class each.

Written to any URI (moto S3 in the tests) in the three layouts pipelines.training.datasets reads.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
from PIL import Image

from pipelines import storage

CLASS_NAMES = ["red square", "green disc", "blue sky"]
# RGB per class; far apart in hue so colour jitter cannot turn one into another.
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]], dtype=np.float32)
IGNORE = 255


def make_scene(rng: np.random.Generator, height: int = 120, width: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """(image H x W x 3 uint8, label H x W uint8): class 2 background, a class-0 rectangle and a class-1 disc,
    a thin ignored border between the rectangle and the background."""
    label = np.full((height, width), 2, dtype=np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    rect_h, rect_w = rng.integers(height // 3, height // 2), rng.integers(width // 3, width // 2)
    label[max(top - 2, 0) : top + rect_h + 2, max(left - 2, 0) : left + rect_w + 2] = IGNORE
    label[top : top + rect_h, left : left + rect_w] = 0
    yy, xx = np.mgrid[:height, :width]
    cy, cx, radius = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4), height // 4
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 1
    colours = COLOURS[np.where(label == IGNORE, 2, label)]
    image = colours + rng.normal(0, 12, colours.shape)
    return image.clip(0, 255).astype(np.uint8), label


# The learning test's task: two classes, each a solid half of the image (the seam moves). A randomly initialized
# tiny model learns it in a few dozen steps; the three-shape scenes above need hundreds.
HALVES_CLASS_NAMES = ["red paint", "blue sky"]


def make_halves_scene(rng: np.random.Generator, height: int = 120, width: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """(image, label): class 0 (red) on one side of a random vertical seam, class 1 (blue) on the other."""
    label = np.ones((height, width), dtype=np.uint8)
    seam = int(rng.integers(width // 3, 2 * width // 3))
    if rng.random() < 0.5:
        label[:, :seam] = 0
    else:
        label[:, seam:] = 0
    colours = COLOURS[[0, 2]][label]
    image = colours + rng.normal(0, 12, colours.shape)
    return image.clip(0, 255).astype(np.uint8), label


def encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def encode_png(label: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label).save(buffer, format="PNG")
    return buffer.getvalue()


def _scenes(count: int, seed: int, task: str = "shapes"):
    rng = np.random.default_rng(seed)
    make = make_halves_scene if task == "halves" else make_scene
    for index in range(count):
        yield index, *make(rng, int(rng.integers(100, 140)), int(rng.integers(120, 170)))


# COCO-Stuff stuffthingmaps use COCO category ids; our three classes stand in for person (0), cat (16) and
# banner (91), whose train ids are 0, 15 and 80.
COCO_RAW_IDS = {0: 0, 1: 16, 2: 91}
COCO_TRAIN_IDS = {0: 0, 1: 15, 2: 80}


def write_cocostuff(root: str, splits: dict[str, int], seed: int = 0) -> None:
    """root/images/{split}/*.jpg + root/annotations/{split}/*.png (raw COCO ids, 255 = unlabelled)."""
    lookup = np.full(256, IGNORE, dtype=np.uint8)
    for ours, raw in COCO_RAW_IDS.items():
        lookup[ours] = raw
    for split_index, (split, count) in enumerate(splits.items()):
        for index, image, label in _scenes(count, seed + split_index):
            name = f"{index + 1:012d}"
            storage.write_bytes(storage.join(root, "images", split, name + ".jpg"), encode_jpeg(image))
            storage.write_bytes(storage.join(root, "annotations", split, name + ".png"), encode_png(lookup[label]))


# ADE20K stores class k as k + 1 (0 = unlabelled): our three classes stand in for wall, building, sky.
def write_ade20k(root: str, splits: dict[str, int], seed: int = 0) -> None:
    """root/ADEChallengeData2016/images/{split}/*.jpg + annotations/{split}/*.png."""
    base = storage.join(root, "ADEChallengeData2016")
    for split_index, (split, count) in enumerate(splits.items()):
        prefix = "ADE_train_" if split == "training" else "ADE_val_"
        for index, image, label in _scenes(count, seed + split_index):
            name = f"{prefix}{index + 1:08d}"
            shifted = np.where(label == IGNORE, 0, label + 1).astype(np.uint8)
            storage.write_bytes(storage.join(base, "images", split, name + ".jpg"), encode_jpeg(image))
            storage.write_bytes(storage.join(base, "annotations", split, name + ".png"), encode_png(shifted))


def write_manifest(
    root: str,
    splits: dict[str, int],
    fmt: str = "parquet",
    seed: int = 0,
    relative: bool = False,
    task: str = "shapes",
) -> tuple[str, str]:
    """Images and labels under root/files/, a manifest with a split column and a classes file.
    ``task``: "shapes" (3 classes, CLASS_NAMES) or "halves" (2 classes, HALVES_CLASS_NAMES).

    Returns (manifest URI, classes URI)."""
    rows: dict[str, list[str]] = {"image_uri": [], "label_uri": [], "split": []}
    for split_index, (split, count) in enumerate(splits.items()):
        for index, image, label in _scenes(count, seed + split_index, task):
            image_key, label_key = f"files/{split}_{index}.jpg", f"files/{split}_{index}_label.png"
            storage.write_bytes(storage.join(root, image_key), encode_jpeg(image))
            storage.write_bytes(storage.join(root, label_key), encode_png(label))
            rows["image_uri"].append(image_key if relative else storage.join(root, image_key))
            rows["label_uri"].append(label_key if relative else storage.join(root, label_key))
            rows["split"].append(split)
    table = pa.table(rows)
    buffer = io.BytesIO()
    if fmt == "csv":
        pyarrow.csv.write_csv(table, buffer)
    else:
        pyarrow.parquet.write_table(table, buffer)
    manifest = storage.join(root, f"manifest.{fmt}")
    storage.write_bytes(manifest, buffer.getvalue())
    classes = storage.join(root, "classes.txt")
    names = HALVES_CLASS_NAMES if task == "halves" else CLASS_NAMES
    storage.write_text(classes, "\n".join(names) + "\n")
    return manifest, classes
