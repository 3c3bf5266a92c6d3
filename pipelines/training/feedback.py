"""Fine-tuning sources that close the labelling loop, and several sources in one run.

- ``label-studio``: a Label Studio JSON export of reviewed tasks (:mod:`pipelines.label_studio`);
- ``coco``: COCO JSON annotations, our own ``coco`` export included (:mod:`pipelines.coco`);
- ``labels``: a labelling run's own rows (pseudo-labels), chosen with ``--where`` (SQL on the table ``labels``),
  pixels below ``--min-confidence`` ignored; unlabelled pixels are ignored.

Every source is read onto one vocabulary by class name: ``--classes`` when given, else the union of the sources'
class lists in order (the first source's first). Regions of classes outside it are ignored. ``weight`` repeats a
source's pairs (2.5: every pair twice, half of them a third time, chosen by a stable hash), so that a few hundred
reviewed corrections are not drowned by a million pseudo-labels.

Reviewed labels travel as PNG ``data:`` URIs (:mod:`pipelines.annotations`); a run's labels, which may be
millions, are written once as PNG files under the fine-tuning run's folder (``sources/<n>-labels/``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.annotations import ReviewedSet
from pipelines.coco import coco_class_names, read_coco
from pipelines.label_output import LabelOutput
from pipelines.label_queries import labelled_rows
from pipelines.label_studio import LabelStudioAccess, export_class_names, read_export
from pipelines.masks import class_id_lookup, decode_confidence_png, decode_mask_png, encode_mask_png
from pipelines.pairs import IGNORE_INDEX, SegmentationDataset, check_label_classes, stable_fraction

FEEDBACK_LAYOUTS = ("label-studio", "coco", "labels")
WRITE_THREADS = 16  # label PNGs written concurrently (object-store PUTs)


@dataclass(frozen=True)
class TrainingSource:
    """One source of a run: ``layout`` and ``data`` as for ``--layout`` / ``--data``, and its weight."""

    layout: str
    data: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> TrainingSource:
        """``LAYOUT=URI[,weight=W]`` (``--add-source``)."""
        layout, sep, rest = text.partition("=")
        data, _, option = rest.rpartition(",weight=") if ",weight=" in rest else (rest, "", "")
        try:
            weight = float(option) if option else 1.0
        except ValueError:
            weight = -1.0
        if not sep or not data or weight < 0:
            raise ValueError(f"--add-source {text!r}: write LAYOUT=URI or LAYOUT=URI,weight=W (W >= 0)")
        return cls(layout.strip(), data.strip(), weight)


@dataclass(frozen=True)
class FeedbackOptions:
    """What the loop's sources need besides their URI."""

    where: str | None = None  # labels: SQL condition on the run's table `labels`
    min_confidence: float | None = None  # labels: pixels below this probability are ignored
    label_studio_url: str | None = None  # label-studio: where /data/upload/... images are fetched from
    local_files_root: str | None = None  # label-studio: LOCAL_FILES_DOCUMENT_ROOT for /data/local-files/?d=
    work_uri: str | None = None  # where a source's files are written (the fine-tuning run's sources/ folder)


def source_class_names(source: TrainingSource, options: FeedbackOptions) -> list[str]:
    """A loop source's own class list (read cheaply: no label is decoded)."""
    if source.layout == "labels":
        return _run(source.data, options)[1]
    if source.layout == "coco":
        return coco_class_names(source.data)
    return export_class_names(source.data)


def load_feedback_source(
    source: TrainingSource, vocabulary: Sequence[str], options: FeedbackOptions, index: int
) -> SegmentationDataset:
    """A loop source's pairs on ``vocabulary``."""
    if source.layout == "labels":
        return _labels_dataset(source, vocabulary, options, index)
    if source.layout == "coco":
        reviewed = read_coco(source.data, classes=vocabulary)
    else:
        reviewed = _label_studio(source, options, vocabulary, index)
    if reviewed.unknown_classes:
        names = ", ".join(f"{name} ({n})" for name, n in reviewed.unknown_classes.most_common(5))
        print(f"{source.data}: regions of classes outside the vocabulary are ignored: {names}", flush=True)
    if not reviewed.images:
        raise ValueError(f"{source.data}: no usable reviewed image ({len(reviewed.skipped)} left out, e.g. "
                         f"{reviewed.skipped[:2]})")  # fmt: skip
    return SegmentationDataset(source.layout, reviewed.pairs(), list(vocabulary), "class_ids")


def weighted(dataset: SegmentationDataset, weight: float) -> SegmentationDataset:
    """Each pair ``floor(weight)`` times, plus once more for a stable-hash ``weight % 1`` share of the pairs."""
    whole, fraction = int(weight), weight - int(weight)
    indices = []
    for i, (image, _) in enumerate(dataset.pairs):
        extra = stable_fraction(f"{i}:{image}") < fraction
        indices.extend([i] * (whole + int(extra)))
    return dataset.subset(indices)


def concatenate(datasets: Sequence[SegmentationDataset]) -> SegmentationDataset:
    """One dataset of several on the same vocabulary and label encoding."""
    first = datasets[0]
    for other in datasets[1:]:
        if other.class_names != first.class_names or other.label_encoding != first.label_encoding:
            raise ValueError(
                f"sources {first.layout!r} and {other.layout!r} label with other class ids: layouts whose label "
                "files fix the ids (cocostuff, ade20k, manifest) combine only with the same classes in the same order"
            )
    pairs = [pair for dataset in datasets for pair in dataset.pairs]
    return SegmentationDataset("+".join(d.layout for d in datasets), pairs, first.class_names, first.label_encoding)


# -- the sources ----------------------------------------------------------------------------------------------
def _label_studio(
    source: TrainingSource, options: FeedbackOptions, vocabulary: Sequence[str], index: int
) -> ReviewedSet:
    access = LabelStudioAccess(options.label_studio_url, os.environ.get("LABEL_STUDIO_API_KEY"),
                               options.local_files_root)  # fmt: skip
    uploads = storage.join(options.work_uri, f"{index}-label-studio", "images") if options.work_uri else None
    return read_export(source.data, classes=vocabulary, access=access, copy_uploads_to=uploads)


def _run(uri: str, options: FeedbackOptions) -> tuple[LabelOutput, list[str]]:
    """The run and its class names, refused up front when ``--min-confidence`` has no confidence PNGs to read."""
    run = LabelOutput.existing(uri)
    manifest, names = run.read_vocabulary()
    if options.min_confidence is not None and not (manifest.get("config") or {}).get("confidence"):
        raise ValueError(
            f"--min-confidence needs the run's confidence PNGs, and {uri} stored none: label with --confidence, "
            "or drop --min-confidence"
        )
    return run, names


def _labels_dataset(
    source: TrainingSource, vocabulary: Sequence[str], options: FeedbackOptions, index: int
) -> SegmentationDataset:
    """The run's rows chosen by ``options.where``, written as label PNGs on ``vocabulary`` under the work folder."""
    if options.work_uri is None:
        raise ValueError("the labels source needs a folder to write its labels to")
    run, run_names = _run(source.data, options)
    # run class id -> vocabulary id; the run's unlabelled value and classes outside the vocabulary -> ignored
    lookup = class_id_lookup(run_names, check_label_classes(vocabulary, "--classes"), IGNORE_INDEX, np.uint8)
    folder = storage.join(options.work_uri, f"{index}-labels")
    columns = ["image_id", "source_uri", "mask_png"]
    if options.min_confidence is not None:
        columns.append("confidence_png")

    def write(row: dict[str, Any]) -> tuple[str, str]:
        label = lookup[decode_mask_png(row["mask_png"])]
        if options.min_confidence is not None and row.get("confidence_png") is not None:
            label[decode_confidence_png(row["confidence_png"]) < options.min_confidence] = IGNORE_INDEX
        uri = storage.join(folder, f"{row['image_id']}.png")
        storage.write_bytes(uri, encode_mask_png(label))
        return row["source_uri"], uri

    pairs: list[tuple[str, str]] = []
    rows = labelled_rows(run, columns, where=options.where)
    with ThreadPoolExecutor(WRITE_THREADS) as pool:  # a few hundred rows at a time: their masks are in memory
        while chunk := list(itertools.islice(rows, 16 * WRITE_THREADS)):
            pairs.extend(pool.map(write, chunk))
    if not pairs:
        raise ValueError(f"{source.data}: no labelled row matches --where {options.where!r}")
    return SegmentationDataset("labels", pairs, list(vocabulary), "class_ids")
