"""The labelling pipeline's CPU stages and the Arrow schemas they exchange (the model stage is in
:mod:`pipelines.model_stage`; the chain itself in :func:`pipelines.labelling.label_images`).

Every stage passes rows through: a row that failed upstream carries its ``error`` to the output, so rows with a
mask plus rows with an error always equal the inputs. Explicit schemas keep column types when a whole batch fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from . import storage
from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from .masks import class_statistics, encode_confidence_png, encode_mask_png, labels_to_mask, mask_dtype
from .masks import unlabelled_value as unlabelled_value_for
from .output import OUTPUT_SCHEMA

READ_THREADS = 16  # concurrent object-store GETs per read task

# error: set for inputs known bad before reading (a file name that is not UTF-8); they pass through as rows
SOURCE_SCHEMA = pa.schema([("image_id", pa.string()), ("source_uri", pa.string()), ("error", pa.string())])
READ_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source_uri", pa.string()), ("data", pa.large_binary()), ("error", pa.string())]
)
DECODED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.large_binary()),  # H x W x 3 uint8, C order
        ("error", pa.string()),
    ]
)
PREDICTED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("labels", pa.large_binary()),  # H x W class ids, uint8 or uint16 (see masks.mask_dtype)
        ("confidence", pa.large_binary()),  # H x W float32 max probability
        ("error", pa.string()),
    ]
)


def describe_error(stage: str, err: BaseException) -> str:
    """One line: the stage, the exception type (unless it is our own readable decode error) and its message."""
    message = str(err) or type(err).__name__
    text = f"{stage}: {message}" if isinstance(err, ImageDecodeError) else f"{stage}: {type(err).__name__}: {message}"
    return text.replace("\n", " ")[:1000]


def _read_one(uri: str) -> tuple[bytes | None, str | None]:
    if uri is None:
        return None, None
    try:
        return storage.read_bytes(uri), None
    except Exception as err:  # each backend raises its own types; the row records why
        return None, describe_error("read", err)


def read_image_bytes(batch: pa.Table) -> pa.Table:
    """source_uri -> encoded bytes (``data``), reading a batch's objects concurrently."""
    uris = batch["source_uri"].to_pylist()
    known = batch["error"].to_pylist() if "error" in batch.column_names else [None] * len(uris)
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(uris)))) as pool:
        results = list(pool.map(_read_one, uris))
    results = [(None, error) if error is not None else result for result, error in zip(results, known, strict=True)]
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source_uri": batch["source_uri"],
            "data": pa.array([r[0] for r in results], pa.large_binary()),
            "error": pa.array([r[1] for r in results], pa.string()),
        },
        schema=READ_SCHEMA,
    )


def decode_images(batch: pa.Table, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Encoded bytes -> RGB pixels (EXIF-oriented) and original size; undecodable rows get an error, and so do
    images over ``max_pixels`` (refused from their header)."""
    widths, heights, pixels, errors = [], [], [], []
    for data, error in zip(batch["data"].to_pylist(), batch["error"].to_pylist(), strict=True):
        rgb = None
        if error is None:
            try:
                rgb = decode_image(data, max_pixels)
            except Exception as err:  # a bad file becomes its own error row, never a failed batch
                error = describe_error("decode", err)
        widths.append(None if rgb is None else rgb.shape[1])
        heights.append(None if rgb is None else rgb.shape[0])
        pixels.append(None if rgb is None else rgb.tobytes())
        errors.append(error)
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source_uri": batch["source_uri"],
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "pixels": pa.array(pixels, pa.large_binary()),
            "error": pa.array(errors, pa.string()),
        },
        schema=DECODED_SCHEMA,
    )


def encode_predictions(
    batch: pa.Table,
    *,
    class_names: Sequence[str],
    run_id: str,
    model_id: str,
    vocab_id: str,
    with_confidence: bool = False,
    confidence_threshold: float | None = None,
) -> pa.Table:
    """Label maps -> the output rows: PNG mask, optional confidence PNG, per-class statistics, provenance."""
    names = list(class_names)
    dtype, unlabelled = mask_dtype(len(names)), unlabelled_value_for(len(names))
    widths, heights = batch["width"].to_pylist(), batch["height"].to_pylist()
    errors = batch["error"].to_pylist()
    masks, confidences, stats = [], [], []
    for i, (raw_labels, raw_confidence) in enumerate(
        zip(batch["labels"].to_pylist(), batch["confidence"].to_pylist(), strict=True)
    ):
        mask_png = confidence_png = class_stats = None
        if errors[i] is None:
            try:
                shape = (heights[i], widths[i])
                probability = np.frombuffer(raw_confidence, dtype=np.float32).reshape(shape)
                label_map = np.frombuffer(raw_labels, dtype=dtype).reshape(shape)
                mask = labels_to_mask(label_map, len(names), probability, confidence_threshold)
                mask_png = encode_mask_png(mask)
                confidence_png = encode_confidence_png(probability) if with_confidence else None
                class_stats = class_statistics(mask, probability, names, unlabelled)
            except Exception as err:
                mask_png = confidence_png = class_stats = None
                errors[i] = describe_error("encode", err)
        masks.append(mask_png)
        confidences.append(confidence_png)
        stats.append(class_stats)
    rows = len(errors)
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source_uri": batch["source_uri"],
            "width": batch["width"],
            "height": batch["height"],
            "mask_png": pa.array(masks, pa.binary()),
            "confidence_png": pa.array(confidences, pa.binary()),
            "class_stats": pa.array(stats, OUTPUT_SCHEMA.field("class_stats").type),
            "error": pa.array(errors, pa.string()),
            "run_id": pa.array([run_id] * rows, pa.string()),
            "model_id": pa.array([model_id] * rows, pa.string()),
            "vocab_id": pa.array([vocab_id] * rows, pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )
