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

import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines import storage
from pipelines.images import decode_label
from pipelines.pairs import (
    LabelEncodingName,
    SegmentationDataset,
    manifest_dataset,
    read_class_names,
    read_pair_table,
    stable_fraction,
)
from pipelines.training.config import LAYOUTS, FinetuneConfig
from pipelines.training.datasets import check_training_ids
from pipelines.training.feedback import (
    FEEDBACK_LAYOUTS,
    FeedbackOptions,
    TrainingSource,
    concatenate,
    load_feedback_source,
    source_class_names,
    weighted,
)
from pipelines.vocabulary import load_vocabulary

LAYOUT_SPLITS = {
    "cocostuff": ("train2017", "val2017"),
    "ade20k": ("training", "validation"),
    "manifest": ("train", "val"),
}
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
    buckets = [stable_fraction(image) for image, _ in dataset.pairs]
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
            if uri.startswith(("data:", "http://", "https://")):  # inline labels; web images have no listing
                continue
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


def prepare_datasets(config: FinetuneConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(train, validation) for the run, checked: files present, label ids covered by the class names.

    Validation is the first source's validation split (val2017, validation, manifest rows with split=val) when
    present, else a stable hash-based hold-out of ``val_fraction`` of its pairs. None when eval_every is 0. Further
    sources (``add_source``) and weights: :mod:`pipelines.training.feedback`.
    """
    sources = [TrainingSource(config.layout, config.data, config.weight)]
    sources += [TrainingSource.parse(text) for text in config.add_source or ()]
    vocabulary = _vocabulary(config, sources)
    options = FeedbackOptions(
        where=config.where, min_confidence=config.min_confidence, label_studio_url=config.label_studio_url,
        local_files_root=config.local_files_root, work_uri=storage.join(config.storage, config.run_name, "sources"),
    )  # fmt: skip
    trains, val = [], None
    for index, source in enumerate(sources):
        if source.layout in FEEDBACK_LAYOUTS:
            train, source_val = load_feedback_source(source, vocabulary, options, index), None
        else:
            train, source_val = _layout_splits(source.layout, source.data, config.classes)
        if index == 0:  # validation comes from the first source: normally the reviewed corrections
            train, val = _validation(config, train, source_val)
        trains.append(weighted(train, source.weight) if source.weight != 1 else train)
    train = concatenate(trains)
    if len(train) == 0:
        raise ValueError(f"{config.data} holds no training pairs")
    for dataset in (train, val) if val is not None else (train,):
        check_files_exist(dataset)
        check_dataset_label_ids(dataset)
    global_batch = config.num_workers * config.batch_size_per_worker
    if len(train) < global_batch:
        raise ValueError(
            f"{len(train)} training pairs cannot fill one global batch of {global_batch} "
            f"({config.num_workers} workers x {config.batch_size_per_worker}); use fewer workers or a smaller batch"
        )
    return train, val


def _layout_splits(
    layout: str, data: str, classes: str | None
) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(train, validation or None) of a paper layout or a pair manifest."""
    train_split, val_split = LAYOUT_SPLITS[layout]
    if layout == "manifest":
        has_splits = "split" in read_pair_table(data).column_names
        train = load_dataset("manifest", data, train_split if has_splits else None, classes)
        return train, load_dataset("manifest", data, val_split, classes) if has_splits else None
    train = load_dataset(layout, data, train_split)
    try:
        return train, load_dataset(layout, data, val_split)
    except SplitNotFoundError:  # no validation folder: hold some training pairs out instead
        return train, None


def _validation(
    config: FinetuneConfig, train: SegmentationDataset, val: SegmentationDataset | None
) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    if config.eval_every == 0:
        return train, None
    if val is None or len(val) == 0:
        train, val = holdout_split(train, config.val_fraction)
    if len(val) > config.max_val_images > 0:
        keep = np.linspace(0, len(val) - 1, config.max_val_images).round().astype(int)
        val = val.subset(sorted(set(keep.tolist())))
    return train, val


def _vocabulary(config: FinetuneConfig, sources: list[TrainingSource]) -> list[str]:
    """``--classes``, else the union of the loop sources' class lists in order (a layout's own list first)."""
    if config.classes:
        return read_class_names(config.classes)
    names: dict[str, None] = {}
    for source in sources:
        if source.layout in FEEDBACK_LAYOUTS:
            names.update(dict.fromkeys(source_class_names(source, FeedbackOptions(where=config.where))))
        elif source.layout in ("cocostuff", "ade20k"):
            names.update(dict.fromkeys(COCO_STUFF_CLASSES if source.layout == "cocostuff" else ADE20K_CLASSES))
    return list(names)
