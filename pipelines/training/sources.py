"""Where fine-tuning pairs come from: the paper's dataset layouts and pair manifests (:mod:`pipelines.pairs`),
each turned into a :class:`~pipelines.pairs.SegmentationDataset`, and the checks run before a long job starts.

- ``cocostuff``: ``ROOT/images/{train2017,val2017}/*.jpg`` with labels in ``ROOT/annotations_detectron2/{split}``
  (written by CAT-Seg's ``datasets/prepare_coco_stuff.py``: 171 contiguous ids, 255 = ignore) or, when that folder
  is absent, the original stuffthingmaps in ``ROOT/annotations/{split}`` (COCO ids 0..181 with 11 unused, mapped
  here the way the prepare script maps them).
- ``ade20k``: ``ROOT/images/{training,validation}/*.jpg`` and ``ROOT/annotations/{split}/*.png`` (150 classes,
  0 = unlabelled: id - 1, 0 -> 255), or already shifted labels in ``ROOT/annotations_detectron2/{split}``.
  ROOT is ``ADEChallengeData2016`` or its parent.
- ``manifest``: a pair manifest plus a class-names file (:func:`pipelines.pairs.manifest_dataset`).
"""

from __future__ import annotations

import hashlib
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines import storage
from pipelines.images import decode_label
from pipelines.pairs import LabelEncodingName, SegmentationDataset, manifest_dataset
from pipelines.training.datasets import check_training_ids
from pipelines.vocabulary import load_vocabulary

LAYOUTS = ("cocostuff", "ade20k", "manifest")
LABEL_SUFFIXES = (".png",)
# Class lists in CAT-Seg's order (its datasets/coco.json, ade150.json); train id = position. One copy: the presets.
COCO_STUFF_CLASSES = list(load_vocabulary(preset="cocostuff171").names)


ADE20K_CLASSES = list(load_vocabulary(preset="ade150").names)


class SplitNotFoundError(FileNotFoundError):
    """The layout has no image folder for the requested split (as opposed to a split with broken files)."""


def cocostuff_dataset(root: str, split: str = "train2017") -> SegmentationDataset:
    """COCO-Stuff under ``root`` (the folder holding ``images/`` and ``annotations[_detectron2]/``)."""
    converted = storage.join(root, "annotations_detectron2", split)
    if storage.exists(converted):
        return _folder_pairs("cocostuff", root, split, converted, COCO_STUFF_CLASSES, "class_ids")
    raw = storage.join(root, "annotations", split)
    return _folder_pairs("cocostuff", root, split, raw, COCO_STUFF_CLASSES, "coco_stuff_raw")


def ade20k_dataset(root: str, split: str = "training") -> SegmentationDataset:
    """ADE20K-150 under ``root`` (``ADEChallengeData2016`` itself or its parent)."""
    nested = storage.join(root, "ADEChallengeData2016")
    if storage.exists(storage.join(nested, "images")):
        root = nested
    converted = storage.join(root, "annotations_detectron2", split)
    if storage.exists(converted):
        return _folder_pairs("ade20k", root, split, converted, ADE20K_CLASSES, "class_ids")
    raw = storage.join(root, "annotations", split)
    return _folder_pairs("ade20k", root, split, raw, ADE20K_CLASSES, "ade20k_raw")


def _folder_pairs(
    layout: str, root: str, split: str, label_dir: str, class_names: list[str], encoding: LabelEncodingName
) -> SegmentationDataset:
    image_dir = storage.join(root, "images", split)
    try:
        images = storage.list_files(image_dir, storage.IMAGE_SUFFIXES)
    except FileNotFoundError as err:
        raise SplitNotFoundError(
            f"{layout}: no images for split {split!r} at {image_dir}; expected {_layout_hint(layout)}"
        ) from err
    if not images:
        raise FileNotFoundError(f"{layout}: {image_dir} holds no image files")
    try:
        labels = storage.list_files(label_dir, LABEL_SUFFIXES)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{layout}: no label PNGs for split {split!r} at {label_dir}; expected {_layout_hint(layout)}"
        ) from err
    label_by_stem, missing = storage.match_by_stem(images, labels)
    if missing:
        raise FileNotFoundError(
            f"{layout}: {len(missing)} of {len(images)} images in {image_dir} have no label PNG in {label_dir} "
            f"(e.g. {[posixpath.basename(u) for u in missing[:3]]})"
        )
    pairs = [(uri, label_by_stem[storage.stem(uri)]) for uri in images]
    return SegmentationDataset(layout, pairs, list(class_names), encoding)


def _layout_hint(layout: str) -> str:
    if layout == "cocostuff":
        return "ROOT/images/{train2017,val2017}/*.jpg and ROOT/annotations[_detectron2]/{split}/*.png"
    return "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{split}/*.png"


def load_dataset(layout: str, data: str, split: str | None, classes: str | None = None) -> SegmentationDataset:
    """One entry point for every layout. ``split``: the layout's folder name (train2017, training, ...), or
    train/val (or None: every row) for manifests."""
    if layout in ("cocostuff", "ade20k") and not split:
        raise ValueError(f"layout {layout!r} needs a split folder name")
    if layout == "cocostuff":
        return cocostuff_dataset(data, split)
    if layout == "ade20k":
        return ade20k_dataset(data, split)
    if layout == "manifest":
        if not classes:
            raise ValueError("layout 'manifest' needs a class-names file (--classes FILE, one name per line)")
        return manifest_dataset(data, classes, split)
    raise ValueError(f"unknown dataset layout {layout!r}; choose one of {list(LAYOUTS)}")


def holdout_split(dataset: SegmentationDataset, fraction: float) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) by a stable hash of each image URI: the same pairs land in val on every run and machine."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    buckets = [int(hashlib.sha1(image.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for image, _ in dataset.pairs]
    val = [i for i, b in enumerate(buckets) if b < fraction]
    if not val:  # tiny datasets: still hold out one pair
        val = [int(np.argmin(buckets))]
    held = set(val)
    return dataset.subset([i for i in range(len(dataset)) if i not in held]), dataset.subset(val)


def check_files_exist(dataset: SegmentationDataset, max_listed: int = 3) -> None:
    """Raise FileNotFoundError naming missing images/labels. One listing per folder, not one request per file."""
    by_folder: dict[str, set[str]] = {}
    for image, label in dataset.pairs:
        for uri in (image, label):
            by_folder.setdefault(posixpath.dirname(uri), set()).add(uri)
    missing: list[str] = []
    for folder, wanted in sorted(by_folder.items()):
        try:
            present = set(storage.list_files(folder))
        except FileNotFoundError:
            present = set()
        missing.extend(sorted(wanted - present))
    if missing:
        raise FileNotFoundError(
            f"{dataset.layout}: {len(missing)} image/label file(s) listed in the dataset do not exist, "
            f"e.g. {missing[:max_listed]}"
        )


def check_dataset_label_ids(dataset: SegmentationDataset, sample_size: int = 32, threads: int = 8) -> None:
    """Decode up to ``sample_size`` evenly spaced label files; refuse ids the class list does not cover."""
    if not dataset.pairs:
        raise ValueError(f"{dataset.layout}: the dataset is empty")
    count = min(sample_size, len(dataset.pairs))
    indices = np.linspace(0, len(dataset.pairs) - 1, count).round().astype(int)
    uris = [dataset.pairs[i][1] for i in sorted(set(indices.tolist()))]
    with ThreadPoolExecutor(threads) as pool:
        labels = list(pool.map(lambda uri: decode_label(storage.read_bytes(uri), dataset.label_encoding), uris))
    for uri, label in zip(uris, labels, strict=True):
        check_training_ids(label, len(dataset.class_names), uri)
