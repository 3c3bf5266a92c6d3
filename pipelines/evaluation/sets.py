"""Readers for the validation sets of the paper's evaluation (layouts written by CAT-Seg's datasets/prepare_*.py).

``--data`` may be the datasets root (``$DETECTRON2_DATASETS``, holding ``ADEChallengeData2016/``, ``VOCdevkit/``,
...) or the benchmark's own folder; local paths and any fsspec URI (s3://, gs://, ...) work.

========  ===========================================================  ============================================
benchmark  images                                                      labels (class ids; ignored value)
========  ===========================================================  ============================================
ade150    ADEChallengeData2016/images/validation/*.jpg                 annotations_detectron2/validation/*.png
                                                                       (0..149; 255), or the raw
                                                                       annotations/validation/*.png (1..150; 0)
ade847    ADE20K_2021_17_01/images_detectron2/validation/*.jpg         annotations_detectron2/validation/*.tif,
                                                                       16-bit (0..846; 65535)
pc59      VOCdevkit/VOC2010/JPEGImages/*.jpg                           annotations_detectron2/pc59_val/*.png
                                                                       (0..58; 255)
pc459     VOCdevkit/VOC2010/JPEGImages/*.jpg                           annotations_detectron2/pc459_val/*.tif
                                                                       (0..458; 459, as CAT-Seg registers it)
voc20     VOCdevkit/VOC2012/JPEGImages/*.jpg                           annotations_detectron2/val/*.png
                                                                       (0..19; 255, background included)
voc20b    VOCdevkit/VOC2012/JPEGImages/*.jpg                           annotations_detectron2_bg/val/*.png
                                                                       (0..19, 20 = background; 255)
manifest  Parquet/CSV of image_uri, label_uri + --classes FILE          label PNGs of class ids (255)
========  ===========================================================  ============================================

As in detectron2's ``load_sem_seg``, the label files decide which images are evaluated: VOC and PASCAL Context
keep every photo of the challenge in one JPEGImages folder, and only those with a validation label count.

VOC-20b: the model sees the 20 VOC names plus 39 PASCAL-Context names as background prompts (CAT-Seg's
datasets/voc20b.json); every prediction of a background prompt (id >= 20) becomes class 20, "background", and
the metric has 21 classes (CAT-Seg's ``VOCbEvaluator``).

Decoded labels (:func:`pipelines.images.decode_label`) are uint16 class ids with IGNORE_ID (65535) for ignored
pixels, whatever the file stored.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.annotations import ReviewedSet
from pipelines.coco import read_coco
from pipelines.images import LABEL_ENCODINGS, LabelEncoding, LabelIdError, check_label_ids, decode_image, decode_label
from pipelines.label_studio import LabelStudioAccess, read_export
from pipelines.pairs import manifest_dataset
from pipelines.rows import describe_error, stage_table
from pipelines.vocabulary import load_vocabulary, read_class_list

REVIEWED_FORMATS = ("label-studio", "coco")  # reviewed annotations exported from other tools
BENCHMARKS = ("ade150", "ade847", "pc59", "pc459", "voc20", "voc20b", "manifest", *REVIEWED_FORMATS)
VOC_BACKGROUND = "background"


# The encodings the prepare scripts write (and the raw ADE20K one, whose 0 means "unlabelled").
CLASS_IDS_255 = LABEL_ENCODINGS["class_ids"]
ADE20K_RAW = LABEL_ENCODINGS["ade20k_raw"]
ADE20K_FULL = LABEL_ENCODINGS["ade20k_full"]
PASCAL_CONTEXT_459 = LABEL_ENCODINGS["pascal_context_459"]
BENCHMARK_LIMIT = "the benchmark has {n} classes"
BENCHMARK_FIX = "wrong --benchmark, wrong --classes file, or labels not converted by the CAT-Seg prepare script"


@dataclass(frozen=True)
class LabelFolder:
    path: str  # relative to the benchmark root
    suffix: str
    encoding: LabelEncoding


@dataclass(frozen=True)
class BenchmarkLayout:
    """Where one benchmark keeps its files, relative to its root folder."""

    name: str
    title: str
    root_names: tuple[str, ...]  # the root as found under $DETECTRON2_DATASETS, outermost first
    image_dir: str
    label_folders: tuple[LabelFolder, ...]  # in order of preference
    prepare_script: str
    image_suffix: str = ".jpg"
    background_from: int | None = None  # VOC-20b: predictions >= this id become this id


LAYOUTS: dict[str, BenchmarkLayout] = {
    layout.name: layout
    for layout in (
        BenchmarkLayout(
            "ade150",
            "ADE20K-150",
            ("ADEChallengeData2016",),
            "images/validation",
            (
                LabelFolder("annotations_detectron2/validation", ".png", CLASS_IDS_255),
                LabelFolder("annotations/validation", ".png", ADE20K_RAW),
            ),
            "prepare_ade20k_150.py (optional: the raw annotations are read too)",
        ),
        BenchmarkLayout(
            "ade847",
            "ADE20K-847",
            ("ADE20K_2021_17_01",),
            "images_detectron2/validation",
            (LabelFolder("annotations_detectron2/validation", ".tif", ADE20K_FULL),),
            "prepare_ade20k_full.py",
        ),
        BenchmarkLayout(
            "pc59",
            "PASCAL Context 59",
            ("VOCdevkit", "VOC2010"),
            "JPEGImages",
            (LabelFolder("annotations_detectron2/pc59_val", ".png", CLASS_IDS_255),),
            "prepare_pascal_context_59.py",
        ),
        BenchmarkLayout(
            "pc459",
            "PASCAL Context 459",
            ("VOCdevkit", "VOC2010"),
            "JPEGImages",
            (LabelFolder("annotations_detectron2/pc459_val", ".tif", PASCAL_CONTEXT_459),),
            "prepare_pascal_context_459.py",
        ),
        BenchmarkLayout(
            "voc20",
            "PASCAL VOC 20",
            ("VOCdevkit", "VOC2012"),
            "JPEGImages",
            (LabelFolder("annotations_detectron2/val", ".png", CLASS_IDS_255),),
            "prepare_voc.py",
        ),
        BenchmarkLayout(
            "voc20b",
            "PASCAL VOC 20 with background",
            ("VOCdevkit", "VOC2012"),
            "JPEGImages",
            (LabelFolder("annotations_detectron2_bg/val", ".png", CLASS_IDS_255),),
            "prepare_voc.py",
            background_from=20,
        ),
    )
}


@dataclass(frozen=True)
class EvaluationSet:
    """What one evaluation needs: the (image, label) pairs, the prompts and the classes the metric counts."""

    benchmark: str
    root: str
    pairs: list[tuple[str, str]]
    vocabulary: list[str]  # class names given to the model (prediction id i = vocabulary[i])
    class_names: list[str]  # the metric's classes (label id i = class_names[i])
    label_encoding: LabelEncoding = field(default=CLASS_IDS_255)
    background_from: int | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------------------------
# Class names


def builtin_class_names(benchmark: str) -> list[str]:
    """The class names CAT-Seg's evaluation gives the model for a benchmark (its datasets/<name>.json)."""
    if benchmark not in LAYOUTS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(LAYOUTS)}")
    return list(load_vocabulary(preset=benchmark).names)  # the labelling presets are these lists


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def load_benchmark(
    benchmark: str,
    data: str,
    classes: str | None = None,
    limit: int | None = None,
    *,
    access: LabelStudioAccess | None = None,
    copy_uploads_to: str | None = None,
) -> EvaluationSet:
    """The evaluation set of ``benchmark`` under ``data``; ``classes`` (a names file) replaces the built-in
    prompts (required for ``manifest``); ``limit`` keeps the first N pairs in file-name order. ``label-studio``
    and ``coco``: the reviewed images of an export (:func:`read_reviewed`)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if benchmark in REVIEWED_FORMATS:
        reviewed = read_reviewed(benchmark, data, classes, access=access, copy_uploads_to=copy_uploads_to)
        names = reviewed.class_names
        evaluation_set = EvaluationSet(benchmark, data, reviewed.pairs(), names, names, CLASS_IDS_255, None)
    elif benchmark == "manifest":
        if not classes:
            raise ValueError("benchmark 'manifest' needs --classes FILE (one class name per line, line i = id i-1)")
        evaluation_set = _manifest_set(data, classes)
    else:
        evaluation_set = _layout_set(LAYOUTS[benchmark], data, classes)
    if limit is not None:
        evaluation_set = _replace_pairs(evaluation_set, evaluation_set.pairs[:limit])
    return evaluation_set


def read_reviewed(
    kind: str,
    data: str,
    classes: str | None = None,
    *,
    access: LabelStudioAccess | None = None,
    copy_uploads_to: str | None = None,
) -> ReviewedSet:
    """A Label Studio JSON export or a COCO file as reviewed images (on ``classes``, a names file, when given)."""
    names = read_class_list(classes) if classes else None
    if kind == "coco":
        return read_coco(data, classes=names)
    return read_export(data, classes=names, access=access, copy_uploads_to=copy_uploads_to)


def _replace_pairs(evaluation_set: EvaluationSet, pairs: list[tuple[str, str]]) -> EvaluationSet:
    return EvaluationSet(
        evaluation_set.benchmark,
        evaluation_set.root,
        pairs,
        evaluation_set.vocabulary,
        evaluation_set.class_names,
        evaluation_set.label_encoding,
        evaluation_set.background_from,
    )


def _layout_set(layout: BenchmarkLayout, data: str, classes: str | None) -> EvaluationSet:
    root, folder = _find_root(layout, data)
    label_dir = storage.join(root, folder.path)
    image_dir = storage.join(root, layout.image_dir)
    labels = storage.list_files(label_dir, (folder.suffix,))
    if not labels:
        raise FileNotFoundError(f"{layout.name}: {label_dir} holds no {folder.suffix} label files")
    try:
        images = storage.list_files(image_dir, (layout.image_suffix,))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{layout.name}: image folder {image_dir} not found") from err
    image_by_stem, missing = storage.match_by_stem(labels, images)
    if missing:
        raise FileNotFoundError(
            f"{layout.name}: {len(missing)} of {len(labels)} labels in {label_dir} have no {layout.image_suffix} "
            f"image in {image_dir} (e.g. {[storage.stem(u) for u in missing[:3]]})"
        )
    pairs = [(image_by_stem[storage.stem(uri)], uri) for uri in labels]

    builtin = builtin_class_names(layout.name)
    vocabulary = read_class_list(classes) if classes else builtin
    if layout.background_from is not None:
        if len(vocabulary) <= layout.background_from:
            raise ValueError(
                f"{layout.name}: the vocabulary needs the {layout.background_from} object classes followed by "
                f"background prompts; {classes} has {len(vocabulary)} names"
            )
        class_names = [*vocabulary[: layout.background_from], VOC_BACKGROUND]
    else:
        if len(vocabulary) != len(builtin):
            raise ValueError(
                f"{layout.name} has {len(builtin)} classes but {classes} lists {len(vocabulary)} names; "
                "the names must be given in label-id order"
            )
        class_names = vocabulary
    return EvaluationSet(layout.name, root, pairs, vocabulary, class_names, folder.encoding, layout.background_from)


def _find_root(layout: BenchmarkLayout, data: str) -> tuple[str, LabelFolder]:
    """The benchmark's root under ``data`` (``data`` itself or a root_names suffix of it) and its label folder."""
    data = data.rstrip("/")
    candidates = [data] + [storage.join(data, *layout.root_names[i:]) for i in range(len(layout.root_names))]
    looked = []
    for root in dict.fromkeys(candidates):  # unique, in order
        for folder in layout.label_folders:
            label_dir = storage.join(root, folder.path)
            if storage.exists(label_dir):
                return root, folder
            looked.append(label_dir)
    expected = posixpath.join(*layout.root_names, layout.label_folders[0].path)
    raise FileNotFoundError(
        f"{layout.title}: no labels under {data} (expected {expected}/*{layout.label_folders[0].suffix}; looked "
        f"in {', '.join(looked)}). Create them with CAT-Seg's datasets/{layout.prepare_script}"
    )


def _manifest_set(manifest_uri: str, classes_uri: str) -> EvaluationSet:
    dataset = manifest_dataset(manifest_uri, classes_uri)
    if not dataset.pairs:
        raise ValueError(f"manifest {manifest_uri} lists no (image_uri, label_uri) rows")
    names = list(dataset.class_names)
    return EvaluationSet("manifest", manifest_uri, list(dataset.pairs), names, names, CLASS_IDS_255, None)


def map_background(predictions: np.ndarray, background_from: int | None) -> np.ndarray:
    """VOC-20b: every background prompt (id >= background_from) predicts the one background class."""
    if background_from is None:
        return predictions
    return np.minimum(predictions, background_from)


# ---------------------------------------------------------------------------------------------------------------
# Read stage (the evaluation pipeline's first step): pairs -> decoded image and label, per-row errors

READ_THREADS = 8  # concurrent object-store GETs per read task
PAIR_SCHEMA = pa.schema([("image_uri", pa.string()), ("label_uri", pa.string())])
READ_SCHEMA = pa.schema(
    [
        *PAIR_SCHEMA,
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("pixels", pa.large_binary()),  # H x W x 3 uint8, C order
        pa.field("label", pa.large_binary()),  # H x W uint16 class ids, IGNORE_ID = ignored
        pa.field("error", pa.string()),
        pa.field("fatal", pa.bool_()),  # the error is the configuration's, not the file's: stop the run
    ]
)


def read_pair(
    image_uri: str, label_uri: str, encoding: LabelEncoding, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fetch and decode one pair: (H x W x 3 uint8 image, H x W uint16 label). Raises LabelIdError for label ids
    beyond the class list, other exceptions for unreadable files."""
    image = decode_image(storage.read_bytes(image_uri))
    label = decode_label(storage.read_bytes(label_uri), encoding)
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"label is {label.shape[1]}x{label.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}"
        )
    check_label_ids(label, num_classes, label_uri, limit=BENCHMARK_LIMIT, fix=BENCHMARK_FIX)
    return image, label


def read_pairs(
    batch: pa.Table, encoding: LabelEncoding, num_classes: int, read_threads: int = READ_THREADS
) -> pa.Table:
    """Ray Data UDF: rows of URIs -> decoded pixels and labels; a bad file becomes an error row."""

    def load(pair: tuple[str, str]) -> tuple[np.ndarray, np.ndarray] | BaseException:
        try:
            return read_pair(pair[0], pair[1], encoding, num_classes)
        except Exception as err:  # each storage backend and decoder raises its own types; the row says why
            return err

    pairs = list(zip(batch["image_uri"].to_pylist(), batch["label_uri"].to_pylist(), strict=True))
    with ThreadPoolExecutor(max(1, min(read_threads, len(pairs)))) as pool:
        loaded = list(pool.map(load, pairs))
    columns: dict[str, list[Any]] = {k: [] for k in ("width", "height", "pixels", "label", "error", "fatal")}
    for result in loaded:
        ok = not isinstance(result, BaseException)
        columns["width"].append(result[0].shape[1] if ok else None)
        columns["height"].append(result[0].shape[0] if ok else None)
        columns["pixels"].append(result[0].tobytes() if ok else None)
        columns["label"].append(result[1].tobytes() if ok else None)
        fatal = isinstance(result, LabelIdError)
        columns["error"].append(None if ok else str(result) if fatal else describe_error("read", result))
        columns["fatal"].append(fatal)
    return stage_table(READ_SCHEMA, batch, **columns)
