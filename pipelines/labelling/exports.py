"""Exports of a labelling output into the formats people train and review with. Every export streams: rows come
64 at a time from DuckDB (:func:`pipelines.label_queries.labelled_rows`) and leave in bounded shards, so memory
does not grow with the run.

    hf            Hugging Face ``datasets``: ``data/train-*.parquet`` with ``image`` and ``label`` as Image features
                  (the features in the Parquet schema's metadata), ``id2label.json`` and a dataset card README.md
    label-studio  Label Studio tasks (``tasks-*.json``, 1,000 per file) whose predictions are BrushLabels results
                  in Label Studio's RLE (label-studio-sdk's converter), plus ``label_config.xml``
    coco          ``annotations.json``: one RLE annotation per (image, class present), encoded, measured and boxed
                  by pycocotools; category ids are class ids + 1 (COCO's ids start at 1)
    png           ``<image_id>.png`` (the stored mask) plus ``index.json``

The first three need the ``export`` extra (``pip install 'catseg-ray[export]'``). ``where`` (a SQL condition on
``labels``) and ``review`` (the N least certain images, :data:`pipelines.label_queries.REVIEW_ORDER`) select
the rows.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.label_output import LabelOutput
from pipelines.label_queries import Output, labelled_rows, opened
from pipelines.labelling.preview import class_color, hex_color
from pipelines.masks import REVIEW_COLUMNS, decode_mask_png, unlabelled_value

EXPORT_EXTRA = "catseg-ray[export]"
HF_ROWS_PER_SHARD = 1000
HF_BYTES_PER_SHARD = 256 * 2**20  # a shard is written once it holds this much image data
LABEL_STUDIO_TASKS_PER_FILE = 1000
EMBED_READ_THREADS = 16


@dataclass(frozen=True)
class ExportResult:
    images: int
    files: list[str]
    notes: list[str] = field(default_factory=list)  # what a user should know (e.g. images left as URIs)


def _require(module: str, export: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"the {export} export needs {module.split('.')[0]}: pip install '{EXPORT_EXTRA}'") from err


class _StreamedFile:
    """A file written in pieces to any fsspec URI (local, or a multipart upload on object stores)."""

    def __init__(self, uri: str) -> None:
        self._file = storage.open_for_writing(uri)

    def write(self, text: str) -> None:
        self._file.write(text.encode("utf-8"))

    def close(self) -> None:
        self._file.close()


# -- PNG ------------------------------------------------------------------------------------------------------
def export_png(
    output: LabelOutput, destination: str, *, where: str | None = None, review: int | None = None
) -> ExportResult:
    """Write each stored mask as ``<destination>/<image_id>.png`` (bytes as stored) plus ``index.json``."""
    manifest = output.read_manifest() or {}
    index = _StreamedFile(storage.join(destination, "index.json"))
    classes = manifest.get("vocabulary", {}).get("names")
    unlabelled = manifest.get("config", {}).get("unlabelled_value")
    index.write(f'{{"classes": {json.dumps(classes)}, "unlabelled_value": {json.dumps(unlabelled)}, "images": [')
    count = 0
    columns = ["image_id", "source_uri", "width", "height", "mask_png"]
    for count, row in enumerate(labelled_rows(output, columns, where=where, review=review), start=1):
        name = f"{row['image_id']}.png"
        storage.write_bytes(storage.join(destination, name), row["mask_png"])
        entry = {k: row[k] for k in ("image_id", "source_uri", "width", "height")} | {"file": name}
        index.write(("," if count > 1 else "") + "\n  " + json.dumps(entry))
    index.write("\n]}\n")
    index.close()
    return ExportResult(count, ["index.json", f"{count} x <image_id>.png"])


# -- COCO -----------------------------------------------------------------------------------------------------
def export_coco(
    output: LabelOutput, destination: str, *, where: str | None = None, review: int | None = None
) -> ExportResult:
    """``<destination>/annotations.json`` in COCO's format, written streaming.

    Images: ``id`` 1-based in export order, ``file_name`` the source URI, our id in ``catseg_image_id``.
    Categories: every class of the vocabulary, ``id`` = class id + 1 (``catseg_class_id`` keeps ours).
    Annotations: one per (image, class present), ``segmentation`` a compressed RLE from
    ``pycocotools.mask.encode`` (``counts`` as text), ``area`` and ``bbox`` from pycocotools, ``score`` the mean
    probability of the class's pixels, ``iscrowd`` 0 (as COCO-Stuff's RLE annotations: detectron2 and mmdet
    ignore crowd regions in training).
    """
    mask_api = _require("pycocotools.mask", "coco")
    manifest, names = output.read_vocabulary()
    categories = [{"id": i + 1, "name": name, "catseg_class_id": i} for i, name in enumerate(names)]
    out = _StreamedFile(storage.join(destination, "annotations.json"))
    info = {"description": "CAT-Seg pseudo-labels", "run_id": manifest.get("run_id"),
            "model_id": manifest.get("model", {}).get("id")}  # fmt: skip
    out.write(f'{{"info": {json.dumps(info)}, "licenses": [], "categories": {json.dumps(categories)}, "images": [')
    # Images and annotations are two arrays: annotations wait in a local file while the images are written.
    with tempfile.TemporaryFile("w+", encoding="utf-8") as pending:
        images = annotations = 0
        columns = ["image_id", "source_uri", "width", "height", "mask_png", "class_stats"]
        for images, row in enumerate(labelled_rows(output, columns, where=where, review=review), start=1):
            image = {"id": images, "file_name": row["source_uri"], "width": row["width"], "height": row["height"],
                     "catseg_image_id": row["image_id"]}  # fmt: skip
            out.write(("," if images > 1 else "") + "\n" + json.dumps(image))
            mask = decode_mask_png(row["mask_png"])
            for stat in row["class_stats"] or []:
                rle = mask_api.encode(np.asfortranarray(mask == stat["class_id"], dtype=np.uint8))
                annotations += 1
                annotation = {
                    "id": annotations,
                    "image_id": images,
                    "category_id": stat["class_id"] + 1,
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_api.area(rle)),
                    "bbox": [float(v) for v in mask_api.toBbox(rle)],
                    "iscrowd": 0,
                    "score": stat["mean_score"],
                }
                pending.write(("," if annotations > 1 else "") + "\n" + json.dumps(annotation))
        out.write('\n], "annotations": [')
        pending.seek(0)
        while chunk := pending.read(1 << 20):
            out.write(chunk)
    out.write("\n]}\n")
    out.close()
    return ExportResult(images, ["annotations.json"], [f"{annotations} annotations"])


# -- Label Studio ---------------------------------------------------------------------------------------------
def label_studio_config(names: list[str], image: str = "image", brush: str = "label") -> str:
    """The labelling config for the vocabulary: an Image and one BrushLabels tag with a Label per class."""
    labels = "\n".join(
        f"    <Label value={quoteattr(name)} background={quoteattr(hex_color(class_color(i)))}/>"
        for i, name in enumerate(names)
    )
    return (
        f'<View>\n  <Image name="{image}" value="${image}" zoom="true"/>\n'
        f'  <BrushLabels name="{brush}" toName="{image}">\n{labels}\n  </BrushLabels>\n</View>\n'
    )


def export_label_studio(
    output: LabelOutput, destination: str, *, where: str | None = None, review: int | None = None
) -> ExportResult:
    """Label Studio tasks with pre-annotations: ``tasks-NNNNN.json`` (a JSON list of at most 1,000 tasks each,
    importable one by one) and ``label_config.xml``.

    A task's ``data.image`` is the source URI (Label Studio's cloud storage resolves s3:// and gs://; local paths
    need its local-files storage), with our ``image_id`` and the review signals beside it. Its one prediction has
    ``model_version`` = the run's model id, ``score`` = the image's ``mean_margin`` (sort by it, ascending, to
    review the least certain first) and one BrushLabels result per class present, RLE-encoded by label-studio-sdk.
    """
    brush = _require("label_studio_sdk.converter.brush", "label-studio")
    manifest, names = output.read_vocabulary()
    storage.write_text(storage.join(destination, "label_config.xml"), label_studio_config(names))
    model_version = manifest.get("model", {}).get("id") or "catseg"
    files: list[str] = ["label_config.xml"]
    out: _StreamedFile | None = None
    count = 0
    columns = ["image_id", "source_uri", "width", "height", "mask_png", "class_stats", *REVIEW_COLUMNS]
    for row in labelled_rows(output, columns, where=where, review=review):
        if count % LABEL_STUDIO_TASKS_PER_FILE == 0:
            if out is not None:
                out.write("\n]\n")
                out.close()
            files.append(f"tasks-{count // LABEL_STUDIO_TASKS_PER_FILE:05d}.json")
            out = _StreamedFile(storage.join(destination, files[-1]))
            out.write("[")
        mask = decode_mask_png(row["mask_png"])
        results = []
        for stat in row["class_stats"] or []:
            layer = np.where(mask == stat["class_id"], 255, 0).astype(np.uint8)
            results.append(
                {
                    "id": f"{row['image_id'][:10]}-{stat['class_id']}",
                    "type": "brushlabels",
                    "from_name": "label",
                    "to_name": "image",
                    "original_width": row["width"],
                    "original_height": row["height"],
                    "image_rotation": 0,
                    "value": {
                        "format": "rle",
                        "rle": [int(v) for v in brush.mask2rle(layer)],
                        "brushlabels": [stat["class_name"]],
                    },
                }
            )
        task = {
            "data": {
                "image": row["source_uri"],
                "image_id": row["image_id"],
                **{name: row[name] for name in REVIEW_COLUMNS},
            },
            "predictions": [{"model_version": model_version, "score": row["mean_margin"], "result": results}],
        }
        out.write(("," if count % LABEL_STUDIO_TASKS_PER_FILE else "") + "\n" + json.dumps(task))
        count += 1
    if out is not None:
        out.write("\n]\n")
        out.close()
    return ExportResult(count, files)


# -- Hugging Face datasets ------------------------------------------------------------------------------------
def hf_features(datasets: Any) -> Any:
    """The exported rows' ``datasets.Features``: ``image`` and ``label`` are Image features."""
    value = datasets.Value
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Image(),
            "image_id": value("string"),
            "source_uri": value("string"),
            "width": value("int32"),
            "height": value("int32"),
            "class_stats": [
                {
                    "class_id": value("int32"),
                    "class_name": value("string"),
                    "pixel_count": value("int64"),
                    "fraction": value("float64"),
                    "mean_score": value("float64"),
                }
            ],
            **{name: value("float64") for name in REVIEW_COLUMNS},
        }
    )


def _read_or_none(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except Exception:  # the image stays a path; the export says how many
        return None


def _dataset_card(manifest: dict[str, Any], names: list[str], count: int, embedded: bool) -> str:
    run_id, model_id = manifest.get("run_id"), manifest.get("model", {}).get("id")
    unlabelled = manifest.get("config", {}).get("unlabelled_value", unlabelled_value(len(names)))
    classes = "\n".join(f"| {i} | {name} |" for i, name in enumerate(names))
    images = "the source image bytes" if embedded else "the source URI only (`image.path`; decoding reads it)"
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
task_categories:
- image-segmentation
tags:
- pseudo-labels
- catseg
---
# CAT-Seg pseudo-labels: run {run_id}

Semantic segmentation pseudo-labels written by catseg-ray (CAT-Seg, open-vocabulary) with model `{model_id}`,
{count} images, {len(names)} classes. `image` holds {images}; `label` is the mask, one class id per pixel
({"8" if len(names) <= 255 else "16"}-bit PNG), {unlabelled} = unlabelled. `class_stats` lists the classes present
with their pixel counts and mean probability; `mean_confidence`, `low_confidence_fraction` and `mean_margin` say
how sure the labels are (review the smallest `mean_margin` first). `id2label.json` maps ids to names.

```python
from datasets import load_dataset
dataset = load_dataset("parquet", data_files="data/train-*.parquet")  # or load_dataset(<this folder>)
```

| id | class |
|---|---|
{classes}
"""


def export_hf(
    output: LabelOutput,
    destination: str,
    *,
    where: str | None = None,
    review: int | None = None,
    embed_images: bool = False,
) -> ExportResult:
    """A Hugging Face dataset folder: ``data/train-NNNNN.parquet`` shards (at most 1,000 rows or 256 MB of image
    data each), ``id2label.json`` and a dataset card; ``load_dataset(<destination>)`` opens it."""
    datasets = _require("datasets", "hf")
    manifest, names = output.read_vocabulary()
    schema = hf_features(datasets).arrow_schema  # carries the features as Parquet metadata ("huggingface")
    columns = ["image_id", "source_uri", "width", "height", "mask_png", "class_stats", *REVIEW_COLUMNS]
    files: list[str] = []
    records: list[dict[str, Any]] = []
    count = unembedded = size = 0

    def write_shard() -> None:
        nonlocal records, size
        if records:
            files.append(f"data/train-{len(files):05d}.parquet")
            with storage.open_for_writing(storage.join(destination, files[-1])) as f:
                pq.write_table(pa.Table.from_pylist(records, schema=schema), f)
        records, size = [], 0

    rows = labelled_rows(output, columns, where=where, review=review)
    with ThreadPoolExecutor(EMBED_READ_THREADS) as pool:
        for group in _groups(rows, 2 * EMBED_READ_THREADS):
            sources = [row["source_uri"] for row in group]
            images = list(pool.map(_read_or_none, sources)) if embed_images else [None] * len(group)
            for row, data in zip(group, images, strict=True):
                unembedded += embed_images and data is None
                records.append(
                    {
                        "image": {"bytes": data, "path": None if data is not None else row["source_uri"]},
                        "label": {"bytes": row["mask_png"], "path": None},
                        **{k: row[k] for k in columns if k != "mask_png"},
                    }
                )
                count += 1
                size += len(row["mask_png"]) + len(data or b"")
                if len(records) >= HF_ROWS_PER_SHARD or size >= HF_BYTES_PER_SHARD:
                    write_shard()
    write_shard()
    storage.write_text(
        storage.join(destination, "id2label.json"), json.dumps({str(i): n for i, n in enumerate(names)}, indent=1)
    )
    storage.write_text(storage.join(destination, "README.md"), _dataset_card(manifest, names, count, embed_images))
    notes = [f"{unembedded} images could not be read and are kept as their URI"] if unembedded else []
    return ExportResult(count, [*files, "id2label.json", "README.md"], notes)


def _groups(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    group: list[dict[str, Any]] = []
    for row in rows:
        group.append(row)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


EXPORTS = {"png": export_png, "coco": export_coco, "label-studio": export_label_studio, "hf": export_hf}


def export(kind: str, output: Output, destination: str, **options: Any) -> ExportResult:
    """Run the export ``kind`` (a key of :data:`EXPORTS`; ``coco-rle`` is ``coco``)."""
    kind = "coco" if kind == "coco-rle" else kind
    if kind not in EXPORTS:
        raise ValueError(f"unknown export {kind!r}; choose one of {', '.join(EXPORTS)}")
    return EXPORTS[kind](opened(output), destination, **options)
