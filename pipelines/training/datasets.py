"""The fine-tuning data pipeline on Ray Data: pairs (:class:`pipelines.pairs.SegmentationDataset`) -> shuffle ->
read, decode, augment in CPU tasks -> batches of ``image`` and ``label`` for the training workers.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines import storage
from pipelines.images import IGNORE_ID, ImageDecodeError, check_label_ids, decode_image, decode_label
from pipelines.pairs import IGNORE_INDEX, LabelEncodingName, SegmentationDataset
from pipelines.training.augment import augment
from pipelines.workers import LOAD_TASK_CPUS

logger = logging.getLogger(__name__)


def check_training_ids(label: np.ndarray, num_classes: int, uri: str) -> None:
    check_label_ids(label, num_classes, uri, fix="the class-names file does not match the labels")


def training_label(label: np.ndarray) -> np.ndarray:
    """A decoded label (uint16, IGNORE_ID) as training batches carry it: uint8 class ids, 255 = ignore (the
    loss's ignore index). Class lists for training have at most 255 names (:func:`pipelines.pairs.read_class_names`)."""
    return np.where(label == IGNORE_ID, IGNORE_INDEX, label).astype(np.uint8)


def decode_training_label(data: bytes, encoding: LabelEncodingName = "class_ids") -> np.ndarray:
    """Label file bytes -> H x W uint8 class ids, 255 = ignore (:func:`pipelines.images.decode_label`, then
    :func:`training_label`)."""
    return training_label(decode_label(data, encoding))


class MismatchedPairError(ValueError):
    """An image and its label differ in size, so no pixel of one can be trusted to describe the other."""


def read_example(
    image_uri: str, label_uri: str, encoding: LabelEncodingName, num_classes: int
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
    check_training_ids(label, num_classes, label_uri)
    return image, training_label(label)


def load_training_batch(
    batch: dict[str, np.ndarray],
    crop_size: int,
    label_encoding: LabelEncodingName,
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
