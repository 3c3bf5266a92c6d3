"""Segmentation datasets on object storage: layouts, label decoding and the training data pipeline.

A dataset is a list of (image_uri, label_uri) pairs, the class names and how its label PNGs encode class ids.
Three layouts:

- ``cocostuff``: ``ROOT/images/{train2017,val2017}/*.jpg`` with labels in ``ROOT/annotations_detectron2/{split}``
  (written by CAT-Seg's ``datasets/prepare_coco_stuff.py``: 171 contiguous ids, 255 = ignore) or, when that folder
  is absent, the original stuffthingmaps in ``ROOT/annotations/{split}`` (COCO ids 0..181 with 11 unused, mapped
  here the way the prepare script maps them).
- ``ade20k``: ``ROOT/images/{training,validation}/*.jpg`` and ``ROOT/annotations/{split}/*.png`` (150 classes,
  0 = unlabelled: id - 1, 0 -> 255), or already shifted labels in ``ROOT/annotations_detectron2/{split}``.
  ROOT is ``ADEChallengeData2016`` or its parent.
- ``manifest``: a Parquet or CSV file with ``image_uri`` and ``label_uri`` columns (relative URIs are resolved
  against the manifest's folder; an optional ``split`` column holds ``train`` / ``val``) plus a class-names file,
  one name per line; label PNG values are class ids, 255 = ignore.

Every URI may be a local path or any fsspec URI (s3://, gs://, ...).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.dataset

from pipelines import storage
from pipelines.augment import augment
from pipelines.images import IGNORE_ID, ImageDecodeError, check_label_ids, decode_image, decode_label
from pipelines.vocabulary import load_vocabulary, read_class_list

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
LAYOUTS = ("cocostuff", "ade20k", "manifest")
LOAD_TASK_CPUS = 1.0  # per read/decode/augment task of the training pipeline (pipelines.workers plans around it)
Layout = Literal["cocostuff", "ade20k", "manifest"]
# Training datasets name their label encoding (pipelines.images.LABEL_ENCODINGS): "class_ids" (255 = ignore),
# "coco_stuff_raw" (COCO-Stuff stuffthingmaps), "ade20k_raw" (ADE20K annotations, 0 = unlabelled).
LabelEncoding = Literal["class_ids", "coco_stuff_raw", "ade20k_raw"]
LABEL_SUFFIXES = (".png",)
MANIFEST_COLUMNS = ("image_uri", "label_uri")
TRAIN_SPLIT_NAMES = ("train", "training")
VAL_SPLIT_NAMES = ("val", "validation")

# Class lists in CAT-Seg's order (its datasets/coco.json, ade150.json); train id = position. One copy: the presets.
COCO_STUFF_CLASSES = list(load_vocabulary(preset="cocostuff171").names)
ADE20K_CLASSES = list(load_vocabulary(preset="ade150").names)


class SplitNotFoundError(FileNotFoundError):
    """The layout has no image folder for the requested split (as opposed to a split with broken files)."""


@dataclass(frozen=True)
class SegmentationDataset:
    """(image_uri, label_uri) pairs, class names (label id i = class_names[i]) and the label encoding."""

    layout: str
    pairs: list[tuple[str, str]]
    class_names: list[str]
    label_encoding: LabelEncoding = "class_ids"

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, indices: Sequence[int]) -> SegmentationDataset:
        return SegmentationDataset(self.layout, [self.pairs[i] for i in indices], self.class_names, self.label_encoding)

    def to_ray_dataset(self):
        """A Ray Dataset with one row per pair: ``image_uri``, ``label_uri`` (strings, nothing read yet)."""
        import ray.data

        return ray.data.from_items([{"image_uri": image, "label_uri": label} for image, label in self.pairs])


# ---------------------------------------------------------------------------------------------------------------
# Layouts


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
    layout: str, root: str, split: str, label_dir: str, class_names: list[str], encoding: LabelEncoding
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


def read_class_names(uri: str) -> list[str]:
    """A training class-names file (:func:`pipelines.vocabulary.read_class_list`: line i = label id i-1) of at most
    255 names, since label PNGs reserve 255 for 'ignore'."""
    names = read_class_list(uri)
    if len(names) > IGNORE_INDEX:
        raise ValueError(
            f"{uri} lists {len(names)} classes, but label PNGs reserve {IGNORE_INDEX} for 'ignore': at most "
            f"{IGNORE_INDEX} classes (ids 0..{IGNORE_INDEX - 1}) are supported"
        )
    return names


def manifest_dataset(manifest_uri: str, classes_uri: str, split: str | None = None) -> SegmentationDataset:
    """Rows of a Parquet/CSV manifest (``image_uri``, ``label_uri`` [, ``split``]) with a class-names file.

    ``split`` ("train" or "val") keeps the rows of that split; it needs a ``split`` column.
    """
    table = read_manifest(manifest_uri)
    missing_columns = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing_columns:
        raise ValueError(
            f"manifest {manifest_uri} lacks column(s) {missing_columns}; it has {table.column_names}. "
            "A training manifest needs image_uri and label_uri (and optionally split)."
        )
    images = [str(u) if u is not None else "" for u in table.column("image_uri").to_pylist()]
    labels = [str(u) if u is not None else "" for u in table.column("label_uri").to_pylist()]
    empty = [i for i, (a, b) in enumerate(zip(images, labels, strict=True)) if not a or not b]
    if empty:
        raise ValueError(f"manifest {manifest_uri}: row {empty[0]} has an empty image_uri or label_uri")
    if split is not None:
        if "split" not in table.column_names:
            raise ValueError(f"manifest {manifest_uri} has no 'split' column to select split {split!r} from")
        accepted = _split_aliases(split)
        keep = [i for i, value in enumerate(table.column("split").to_pylist()) if str(value).lower() in accepted]
        images, labels = [images[i] for i in keep], [labels[i] for i in keep]
    base = posixpath.dirname(manifest_uri.rstrip("/"))
    pairs = [(_resolve(base, image), _resolve(base, label)) for image, label in zip(images, labels, strict=True)]
    return SegmentationDataset("manifest", pairs, read_class_names(classes_uri), "class_ids")


def _split_aliases(split: str) -> tuple[str, ...]:
    for aliases in (TRAIN_SPLIT_NAMES, VAL_SPLIT_NAMES):
        if split.lower() in aliases:
            return aliases
    return (split.lower(),)


def read_manifest(uri: str) -> pa.Table:
    """A Parquet file/folder or a CSV file as an Arrow table."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {uri}")
    if path.lower().endswith(".csv"):
        with fs.open(path, "rb") as f:
            return pyarrow.csv.read_csv(f)
    try:
        return pyarrow.dataset.dataset(path, filesystem=fs, format="parquet").to_table()
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"manifest {uri} is neither a .csv file nor readable Parquet: {err}") from err


def _resolve(base: str, uri: str) -> str:
    """Manifest entries may be relative to the manifest's folder."""
    if "://" in uri or uri.startswith("/") or not base:
        return uri
    return storage.join(base, uri)


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


# ---------------------------------------------------------------------------------------------------------------
# Checks before a long job starts


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
        _check_training_ids(label, len(dataset.class_names), uri)


def _check_training_ids(label: np.ndarray, num_classes: int, uri: str) -> None:
    check_label_ids(label, num_classes, uri, fix="the class-names file does not match the labels")


def training_label(label: np.ndarray) -> np.ndarray:
    """A decoded label (uint16, IGNORE_ID) as training batches carry it: uint8 class ids, 255 = ignore (the
    loss's ignore index). Class lists for training have at most 255 names (:func:`read_class_names`)."""
    return np.where(label == IGNORE_ID, IGNORE_INDEX, label).astype(np.uint8)


def decode_training_label(data: bytes, encoding: LabelEncoding = "class_ids") -> np.ndarray:
    """Label file bytes -> H x W uint8 class ids, 255 = ignore (:func:`pipelines.images.decode_label`, then
    :func:`training_label`)."""
    return training_label(decode_label(data, encoding))


class MismatchedPairError(ValueError):
    """An image and its label differ in size, so no pixel of one can be trusted to describe the other."""


def read_example(
    image_uri: str, label_uri: str, encoding: LabelEncoding, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode one pair; label ids outside the class list are a configuration error and raise.

    Images decode as everywhere else (``pipelines.images``: EXIF orientation applied, as detectron2's reader does
    for the reference); label PNGs are taken as stored, so a label must match the displayed image."""
    image = decode_image(storage.read_bytes(image_uri))
    label = decode_label(storage.read_bytes(label_uri), encoding)
    if image.shape[:2] != label.shape:
        raise MismatchedPairError(
            f"{image_uri} is {image.shape[1]}x{image.shape[0]} (after EXIF orientation) but its label {label_uri} "
            f"is {label.shape[1]}x{label.shape[0]}; a label must cover the image as displayed"
        )
    _check_training_ids(label, num_classes, label_uri)
    return image, training_label(label)


def load_training_batch(
    batch: dict[str, np.ndarray],
    crop_size: int,
    label_encoding: LabelEncoding,
    num_classes: int,
    io_threads: int = 8,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows of URIs -> augmented ``image`` (B x S x S x 3 uint8) and ``label`` (B x S x S uint8).

    Files are fetched on a few threads (object-store latency, not CPU, dominates reads). A corrupt or vanished
    file drops its row with a warning, so one bad JPEG cannot end a long run; a label id the class list does
    not cover stops the job (the class names are wrong, not the file).
    """
    rng = np.random.default_rng()

    def load(pair: tuple[str, str]) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            return read_example(pair[0], pair[1], label_encoding, num_classes)
        except (ImageDecodeError, MismatchedPairError, OSError, SyntaxError) as err:  # a bad file, not a bad config
            logger.warning("skipping %s: %s", pair[0], err)
            return None

    pairs = list(zip(batch["image_uri"].tolist(), batch["label_uri"].tolist(), strict=True))
    with ThreadPoolExecutor(min(io_threads, max(1, len(pairs)))) as pool:
        decoded = [example for example in pool.map(load, pairs) if example is not None]
    examples = [augment(image, label, crop_size, rng) for image, label in decoded]
    images = np.stack([e[0] for e in examples]) if examples else np.zeros((0, crop_size, crop_size, 3), np.uint8)
    labels = np.stack([e[1] for e in examples]) if examples else np.zeros((0, crop_size, crop_size), np.uint8)
    return {"image": images, "label": labels}


def training_pipeline(dataset: SegmentationDataset, crop_size: int, batch_size: int = 8):
    """Ray Data chain: pairs -> shuffle (new order each epoch) -> read, decode, augment in CPU tasks."""
    return (
        dataset.to_ray_dataset()
        .random_shuffle()
        .map_batches(
            load_training_batch,
            fn_kwargs={
                "crop_size": crop_size,
                "label_encoding": dataset.label_encoding,
                "num_classes": len(dataset.class_names),
            },
            batch_size=batch_size,
            num_cpus=LOAD_TASK_CPUS,
        )
    )
