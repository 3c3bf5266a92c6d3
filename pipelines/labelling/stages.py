"""The labelling pipeline's CPU stages and the Arrow schemas they exchange (the model stage is in
:mod:`pipelines.model_stage`; the chain itself in :func:`pipelines.labelling.run.label_images`).

Every stage passes rows through: a row that failed upstream carries its ``error`` to the output, so rows with a
mask plus rows with an error always equal the inputs. Explicit schemas keep column types when a whole batch fails.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.images import DEFAULT_MAX_PIXELS, decode_image
from pipelines.label_output import OUTPUT_SCHEMA
from pipelines.masks import (
    REVIEW_COLUMNS,
    class_statistics,
    encode_confidence_png,
    encode_mask_png,
    labels_to_mask,
    mask_dtype,
)
from pipelines.masks import unlabelled_value as unlabelled_value_for
from pipelines.rows import PERMANENT, TRANSIENT, column_or_nulls, describe_error, stage_table

READ_THREADS = 16  # concurrent object-store GETs per read task
READ_ATTEMPTS = 4  # per object, for errors a retry can cure (503 SlowDown, resets, timeouts): 0.5 + 1 + 2 s waits
READ_BACKOFF_SECONDS = 0.5


# error: set for inputs known bad before reading (a file name that is not UTF-8); they pass through as rows
SOURCE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source_uri", pa.string()), ("error", pa.string()), ("error_kind", pa.string())]
)
READ_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("data", pa.large_binary()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)
DECODED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.large_binary()),  # H x W x 3 uint8, C order
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)


def _worth_retrying_now(err: BaseException) -> bool:
    """Errors that a retry seconds later can cure; a missing object or a refused credential will not be."""
    no_cure = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, ImportError)
    return not isinstance(err, no_cure)


def _read_one(uri: str | None) -> tuple[bytes | None, str | None]:
    if uri is None:
        return None, None
    for attempt in range(READ_ATTEMPTS):
        try:
            return storage.read_bytes(uri), None
        except Exception as err:  # each backend raises its own types; the row records why
            if attempt + 1 == READ_ATTEMPTS or not _worth_retrying_now(err):
                message = describe_error("read", err)
                return None, message if attempt == 0 else f"{message} (after {attempt + 1} attempts)"
            time.sleep(READ_BACKOFF_SECONDS * 2**attempt * random.uniform(0.8, 1.2))  # jitter: no retry storms
    raise AssertionError("unreachable")


@functools.cache
def _read_pool() -> ThreadPoolExecutor:
    """One pool per worker process: starting 16 threads per batch cost more than reading a missing object."""
    return ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="catseg-read")


def read_image_bytes(batch: pa.Table) -> pa.Table:
    """source_uri -> encoded bytes (``data``), reading a batch's objects concurrently; reads that fail with an
    error a retry can cure are retried with backoff (:data:`READ_ATTEMPTS`). Every read error is transient."""
    uris = batch["source_uri"].to_pylist()
    known, known_kinds = column_or_nulls(batch, "error"), column_or_nulls(batch, "error_kind")
    todo = [i for i, error in enumerate(known) if error is None]
    data: list[bytes | None] = [None] * len(uris)
    errors = list(known)
    kinds = [kind or (PERMANENT if error else None) for kind, error in zip(known_kinds, known, strict=True)]
    for i, (content, error) in zip(todo, _read_pool().map(_read_one, [uris[i] for i in todo]), strict=True):
        data[i], errors[i] = content, error
        kinds[i] = TRANSIENT if error is not None else None
    return stage_table(READ_SCHEMA, batch, data=data, error=errors, error_kind=kinds)


def decode_images(batch: pa.Table, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Encoded bytes -> RGB pixels (EXIF-oriented) and original size; undecodable rows get an error, and so do
    images over ``max_pixels`` (refused from their header)."""
    widths, heights, pixels, errors, kinds = [], [], [], [], column_or_nulls(batch, "error_kind")
    for i, (data, error) in enumerate(zip(batch["data"].to_pylist(), batch["error"].to_pylist(), strict=True)):
        rgb = None
        if error is None:
            try:
                rgb = decode_image(data, max_pixels)
            except Exception as err:  # a bad file becomes its own error row, never a failed batch
                error, kinds[i] = describe_error("decode", err), PERMANENT
        widths.append(None if rgb is None else rgb.shape[1])
        heights.append(None if rgb is None else rgb.shape[0])
        pixels.append(None if rgb is None else rgb.tobytes())
        errors.append(error)
    return stage_table(
        DECODED_SCHEMA, batch, width=widths, height=heights, pixels=pixels, error=errors, error_kind=kinds
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
    errors, kinds = batch["error"].to_pylist(), column_or_nulls(batch, "error_kind")
    masks, confidences, stats = [], [], []
    signals = {name: column_or_nulls(batch, name) for name in REVIEW_COLUMNS}
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
                errors[i], kinds[i] = describe_error("encode", err), PERMANENT
        if mask_png is None:
            for values in signals.values():
                values[i] = None
        masks.append(mask_png)
        confidences.append(confidence_png)
        stats.append(class_stats)
    rows = len(errors)
    return stage_table(
        OUTPUT_SCHEMA,
        batch,
        mask_png=masks,
        confidence_png=confidences,
        class_stats=stats,
        **signals,
        error=errors,
        error_kind=kinds,
        run_id=[run_id] * rows,
        model_id=[model_id] * rows,
        vocab_id=[vocab_id] * rows,
    )
