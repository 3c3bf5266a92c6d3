"""Reviewed annotations from other tools (Label Studio JSON exports, COCO JSON), read the same way for fine-tuning
and for evaluation: one :class:`ReviewedImage` per image, its label a class-id map on one vocabulary with the
pixels nobody labelled, and those two classes claim, ignored.

Rules shared by every format (:func:`label_from_layers`):

- a pixel no region covers is ignored: a reviewer who leaves a region unpainted has not said what it is;
- a pixel covered by regions of two different classes is ignored: the annotation contradicts itself there;
- a region whose class is not in the vocabulary is ignored (and counted, so the caller can say so).

Labels are encoded as 8-bit PNGs (class ids, 255 = ignore: the ``class_ids`` label encoding of
:mod:`pipelines.images`) and carried as ``data:`` URIs: reviewed sets are bounded by human effort (thousands of
images, a few KB each), and a ``data:`` URI is read by every worker like any other URI, with no scratch storage.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipelines import storage
from pipelines.masks import decode_mask_png, encode_mask_png
from pipelines.pairs import IGNORE_INDEX

logger = logging.getLogger(__name__)

PNG_DATA_PREFIX = "data:image/png;base64,"
CHECK_THREADS = 16  # concurrent existence checks (a HEAD each on object stores)


@dataclass(frozen=True)
class ReviewedImage:
    """One reviewed image: ``key`` names it in warnings (a Label Studio task id, a COCO image id)."""

    key: str
    image_uri: str
    label: np.ndarray  # H x W uint8 class ids, IGNORE_INDEX = ignored


@dataclass
class ReviewedSet:
    """What an export holds on one vocabulary, and what it left out (each entry: ``"key: why"``)."""

    source: str
    class_names: list[str]
    images: list[ReviewedImage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unknown_classes: Counter = field(default_factory=Counter)  # region class names outside the vocabulary

    def skip(self, key: str, why: str) -> None:
        self.skipped.append(f"{key}: {why}")
        logger.warning("%s: skipping %s: %s", self.source, key, why)

    def pairs(self) -> list[tuple[str, str]]:
        """(image URI, label as a PNG ``data:`` URI) per image: what training and evaluation read."""
        return [(image.image_uri, label_data_uri(image.label)) for image in self.images]


def must_exist(uri: str) -> str:
    if not storage.exists(uri):
        raise FileNotFoundError(f"its image {uri} does not exist")
    return uri


def add_readable(
    reviewed: ReviewedSet,
    candidates: list[tuple[str, str, np.ndarray]],
    locate: Callable[[str], str] = must_exist,
) -> None:
    """Add each (key, image reference, label) whose image ``locate`` finds (it returns the URI workers read, or
    raises saying why not); the others are skipped with a warning. Checked concurrently, in order."""

    def check(candidate: tuple[str, str, np.ndarray]) -> tuple[str, str | None, str | None]:
        key, reference, _ = candidate
        try:
            return key, locate(reference), None
        except FileNotFoundError as err:
            return key, None, str(err)
        except Exception as err:  # each store and server fails its own way; the skip says how
            return key, None, f"its image {reference} cannot be read ({type(err).__name__}: {err})"

    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        for (key, uri, problem), (_, _, label) in zip(pool.map(check, candidates), candidates, strict=True):
            if uri is None:
                reviewed.skip(key, problem or "unreadable")
            else:
                reviewed.images.append(ReviewedImage(key, uri, label))


def label_from_layers(shape: tuple[int, int], layers: Iterable[tuple[int | None, np.ndarray]]) -> np.ndarray:
    """One label from (class id, boolean mask) regions: uncovered pixels and pixels two classes claim are ignored;
    a region of a class outside the vocabulary (id None) is ignored, and still contradicts the regions it overlaps."""
    unclaimed, conflict, outside = -1, -2, -3
    owner = np.full(shape, unclaimed, dtype=np.int32)
    for class_id, mask in layers:
        if mask.shape != shape:
            raise ValueError(f"a region of {mask.shape[1]}x{mask.shape[0]} on an image of {shape[1]}x{shape[0]}")
        claim = outside if class_id is None else class_id
        owner[mask & (owner == unclaimed)] = claim
        owner[mask & (owner != claim)] = conflict
    return np.where(owner >= 0, owner, IGNORE_INDEX).astype(np.uint8)


def label_data_uri(label: np.ndarray) -> str:
    """A label as an 8-bit PNG of class ids, 255 = ignored (the ``class_ids`` label encoding), in a ``data:`` URI."""
    return PNG_DATA_PREFIX + base64.b64encode(encode_mask_png(label.astype(np.uint8))).decode("ascii")


def decode_label_data_uri(uri: str) -> np.ndarray:
    """The label of :func:`label_data_uri` (tests read it back)."""
    if not uri.startswith(PNG_DATA_PREFIX):
        raise ValueError("not a label PNG data URI")
    return decode_mask_png(base64.b64decode(uri[len(PNG_DATA_PREFIX) :]))
