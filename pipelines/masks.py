"""Label maps as bytes and back: PNG masks, quantized confidence maps, COCO RLE, per-class statistics.

A mask stores, per pixel, the index of the winning class in the vocabulary. Vocabularies of up to 255 classes
use 8-bit PNGs, larger ones 16-bit; the largest value of the type (255 / 65535) means "unlabelled" (pixels under
the confidence threshold), so an 8-bit mask holds class ids 0..254 at most.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

UNLABELLED_8BIT = 255
UNLABELLED_16BIT = 65535


def mask_dtype(num_classes: int) -> np.dtype:
    """uint8 when every class id and the unlabelled value fit in a byte, else uint16."""
    if num_classes < 1:
        raise ValueError(f"a mask needs at least one class, got {num_classes}")
    if num_classes <= UNLABELLED_8BIT:
        return np.dtype(np.uint8)
    if num_classes <= UNLABELLED_16BIT:
        return np.dtype(np.uint16)
    raise ValueError(f"{num_classes} classes do not fit a 16-bit mask (at most {UNLABELLED_16BIT})")


def unlabelled_value(num_classes: int) -> int:
    """The pixel value meaning "no class" for a vocabulary of this size."""
    return UNLABELLED_8BIT if mask_dtype(num_classes) == np.uint8 else UNLABELLED_16BIT


def class_id_lookup(from_names: Sequence[str], to_names: Sequence[str], missing: int, dtype: Any) -> np.ndarray:
    """A table from every mask value of the vocabulary ``from_names`` to the id of the same name in ``to_names``;
    values with no such name (the unlabelled value, classes ``to_names`` lacks) map to ``missing``."""
    ids = {name: i for i, name in enumerate(to_names)}
    lookup = np.full(UNLABELLED_16BIT + 1, missing, dtype=dtype)
    for value, name in enumerate(from_names):
        lookup[value] = ids.get(name, missing)
    return lookup


def labels_to_mask(
    labels: np.ndarray, num_classes: int, confidence: np.ndarray | None = None, threshold: float | None = None
) -> np.ndarray:
    """Class-index map H x W -> uint8/uint16 mask; pixels with confidence below ``threshold`` become unlabelled."""
    mask = labels.astype(mask_dtype(num_classes), copy=True)
    if threshold is not None:
        if confidence is None:
            raise ValueError("a confidence threshold needs the confidence map")
        mask[confidence < threshold] = unlabelled_value(num_classes)
    return mask


def encode_mask_png(mask: np.ndarray) -> bytes:
    """uint8 mask -> 8-bit grayscale PNG, uint16 mask -> 16-bit grayscale PNG (lossless)."""
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D (H x W), got shape {mask.shape}")
    if mask.dtype == np.uint8:
        image = Image.fromarray(mask, mode="L")
    elif mask.dtype == np.uint16:
        image = Image.fromarray(mask)  # mode I;16: written as a 16-bit PNG
    else:
        raise TypeError(f"mask must be uint8 or uint16, got {mask.dtype}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes from :func:`encode_mask_png` -> the uint8 / uint16 mask H x W."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode == "L":
            return np.asarray(image, dtype=np.uint8).copy()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # Pillow opens 16-bit grayscale PNGs as I;16 or I
            return np.asarray(image).astype(np.uint16)
        raise ValueError(f"not a label mask: PNG mode {image.mode!r}, expected 8- or 16-bit grayscale")


def encode_confidence_png(confidence: np.ndarray) -> bytes:
    """Per-pixel max probability in [0, 1] -> 8-bit PNG (value = round(p * 255))."""
    quantized = np.clip(np.rint(confidence.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return encode_mask_png(quantized)


def decode_confidence_png(data: bytes) -> np.ndarray:
    """8-bit confidence PNG -> float32 probabilities in [0, 1] (quantized to steps of 1/255)."""
    return decode_mask_png(data).astype(np.float32) / 255.0


def class_statistics(
    mask: np.ndarray, confidence: np.ndarray, class_names: list[str], unlabelled: int | None = None
) -> list[dict[str, Any]]:
    """One entry per class present in ``mask``: id, name, pixel count, fraction of all pixels, mean confidence.

    ``unlabelled`` pixels (if given) count in the image area but belong to no class.
    """
    flat = mask.reshape(-1).astype(np.int64)
    scores = confidence.reshape(-1).astype(np.float64)
    size = max(len(class_names), int(flat.max(initial=0)) + 1)
    counts = np.bincount(flat, minlength=size)
    score_sums = np.bincount(flat, weights=scores, minlength=size)
    stats = []
    for class_id in np.flatnonzero(counts[: len(class_names)]):
        if unlabelled is not None and class_id == unlabelled:
            continue
        count = int(counts[class_id])
        stats.append(
            {
                "class_id": int(class_id),
                "class_name": class_names[class_id],
                "pixel_count": count,
                "fraction": count / flat.size,
                "mean_score": float(score_sums[class_id] / count),
            }
        )
    return stats


REVIEW_THRESHOLD = 0.5  # low_confidence_fraction counts pixels below this (the run's --confidence-threshold if set)


def review_signals(confidence: np.ndarray, runner_up: np.ndarray, threshold: float) -> dict[str, float]:
    """How sure an image's labels are, from its per-pixel top-1 (``confidence``) and top-2 probabilities:
    ``mean_confidence``, ``low_confidence_fraction`` (share of pixels below ``threshold``) and ``mean_margin``
    (mean of top-1 minus top-2; small when two classes compete). Lowest margin first is the review order."""
    if confidence.size == 0:
        return {"mean_confidence": 0.0, "low_confidence_fraction": 0.0, "mean_margin": 0.0}
    return {
        "mean_confidence": float(confidence.mean(dtype=np.float64)),
        "low_confidence_fraction": float(np.count_nonzero(confidence < threshold) / confidence.size),
        "mean_margin": float(confidence.mean(dtype=np.float64) - runner_up.mean(dtype=np.float64)),
    }


REVIEW_COLUMNS = ("mean_confidence", "low_confidence_fraction", "mean_margin")
