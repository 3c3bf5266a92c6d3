"""Sets of (image, label) pairs, shared by fine-tuning and evaluation: :class:`SegmentationDataset` and the pair
manifest (a Parquet or CSV file with ``image_uri`` and ``label_uri`` columns, relative URIs resolved against its
folder, an optional ``split`` column holding ``train`` / ``val``) with its class-names file, one name per line.
Label PNG values are class ids, 255 = ignore.

Every URI may be a local path or any fsspec URI (s3://, gs://, ...).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.csv
import pyarrow.dataset

from pipelines import storage
from pipelines.vocabulary import check_names, read_class_list

IGNORE_INDEX = 255
# How a set's label PNGs encode class ids (the keys of pipelines.images.LABEL_ENCODINGS it may use): "class_ids"
# (255 = ignore), "coco_stuff_raw" (COCO-Stuff stuffthingmaps), "ade20k_raw" (ADE20K annotations, 0 = unlabelled).
LabelEncodingName = Literal["class_ids", "coco_stuff_raw", "ade20k_raw"]
MANIFEST_COLUMNS = ("image_uri", "label_uri")


TRAIN_SPLIT_NAMES = ("train", "training")


VAL_SPLIT_NAMES = ("val", "validation")


@dataclass(frozen=True)
class SegmentationDataset:
    """(image_uri, label_uri) pairs, class names (label id i = class_names[i]) and the label encoding."""

    layout: str
    pairs: list[tuple[str, str]]
    class_names: list[str]
    label_encoding: LabelEncodingName = "class_ids"

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, indices: Sequence[int]) -> SegmentationDataset:
        return SegmentationDataset(self.layout, [self.pairs[i] for i in indices], self.class_names, self.label_encoding)

    def to_ray_dataset(self):
        """A Ray Dataset with one row per pair: ``image_uri``, ``label_uri`` (strings, nothing read yet)."""
        import ray.data

        return ray.data.from_items([{"image_uri": image, "label_uri": label} for image, label in self.pairs])


def read_class_names(uri: str) -> list[str]:
    """A training class-names file (:func:`pipelines.vocabulary.read_class_list`: line i = label id i-1) of at most
    255 names (:func:`check_label_classes`)."""
    return check_label_classes(read_class_list(uri), uri)


def check_label_classes(names: Sequence[str], source: str) -> list[str]:
    """``names`` as a vocabulary (:func:`pipelines.vocabulary.check_names`) that 8-bit label PNGs can hold: at most
    255 names, since they reserve 255 for 'ignore'."""
    names = list(check_names(list(names), source))
    if len(names) > IGNORE_INDEX:
        raise ValueError(
            f"{source} lists {len(names)} classes, but label PNGs reserve {IGNORE_INDEX} for 'ignore': at most "
            f"{IGNORE_INDEX} classes (ids 0..{IGNORE_INDEX - 1}) are supported"
        )
    return names


def stable_fraction(text: str) -> float:
    """A number in [0, 1] from a hash of ``text``: the same on every run and machine (hold-outs, sampling)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def manifest_dataset(manifest_uri: str, classes_uri: str, split: str | None = None) -> SegmentationDataset:
    """Rows of a Parquet/CSV manifest (``image_uri``, ``label_uri`` [, ``split``]) with a class-names file.

    ``split`` ("train" or "val") keeps the rows of that split; it needs a ``split`` column.
    """
    table = read_pair_table(manifest_uri)
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


def read_pair_table(uri: str) -> pa.Table:
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
