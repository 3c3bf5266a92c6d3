"""Segmentation metrics: one confusion matrix and one set of metrics, used by evaluation and by training validation.

The definitions are detectron2's current ``SemSegEvaluator`` (as CAT-Seg reports them): IoU per class over the
confusion matrix summed across images, ignored pixels left out, and classes without ground-truth pixels left out of
every mean (a class only predicted does not count). Fine-tuning's ``val_miou`` and ``jobs.evaluate`` therefore agree
on the same predictions.

Metric (detectron2 ``SemSegEvaluator`` as CAT-Seg runs it: detectron2 main since commit f3c1bc19, 2022-07-06),
over the confusion matrix C summed over all images, C[g, p] = pixels of ground-truth class g predicted as p,
ignored pixels left out:
    TP_k = C[k, k]; GT_k = sum_p C[k, p]; PRED_k = sum_g C[g, k]; IoU_k = TP_k / (GT_k + PRED_k - TP_k)
    mIoU = mean of IoU_k over the classes with GT_k > 0 (``iou_valid = acc_valid & (union > 0)``): a class that
           never occurs in the ground truth is left out of the mean and reported as null, even when it was
           predicted (its false positives still lower the IoU of the classes whose pixels it took).
    pixel accuracy = sum_k TP_k / sum_k GT_k; mean accuracy = mean of TP_k / GT_k over GT_k > 0;
    fwIoU = sum_k IoU_k * GT_k / sum GT over GT_k > 0.
detectron2 v0.6 (and the unused copy in CAT-Seg's plain_train_net.py) divided by the number of classes with
GT_k + PRED_k > 0 instead, i.e. counted a predicted-but-absent class as IoU 0; the numbers differ only when such
classes exist. :func:`compute_metrics` implements the main-branch definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.images import IGNORE_ID


def confusion_matrix(label: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K int64 counts, rows = ground truth, columns = prediction; pixels labelled IGNORE_ID are left out.

    Raises ValueError when the shapes differ or the label/prediction holds ids outside 0..K-1.
    """
    if label.shape != prediction.shape:
        raise ValueError(f"prediction is {prediction.shape} but the label is {label.shape}")
    counted = label != IGNORE_ID
    truth = label[counted].astype(np.int64)
    predicted = prediction[counted].astype(np.int64)
    for name, ids in (("label", truth), ("prediction", predicted)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{name} holds ids outside 0..{num_classes - 1}: {np.unique(ids).tolist()[:8]}")
    counts = np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def encode_sparse_confusion(confusion: np.ndarray) -> bytes:
    """The non-zero cells of a confusion matrix as int64 (flat indices, then counts): a few hundred bytes per
    image instead of K x K x 8 (5.7 MB for ADE-847)."""
    flat = confusion.reshape(-1)
    index = np.flatnonzero(flat)
    return np.concatenate([index, flat[index]]).astype(np.int64).tobytes()


def add_sparse_confusion(total: np.ndarray, encoded: bytes) -> None:
    """Add an :func:`encode_sparse_confusion` payload into ``total`` (K x K int64) in place."""
    values = np.frombuffer(encoded, dtype=np.int64)
    index, counts = np.split(values, 2)
    np.add.at(total.reshape(-1), index, counts)


@dataclass(frozen=True)
class SegmentationMetrics:
    """Metrics of a summed confusion matrix (see the module docstring); per-class arrays hold NaN where a class
    has no ground-truth pixels."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    fw_iou: float
    iou: np.ndarray  # K
    accuracy: np.ndarray  # K
    gt_pixels: np.ndarray  # K, int64
    predicted_pixels: np.ndarray  # K, int64

    @property
    def classes_in_mean(self) -> int:
        return int(np.count_nonzero(self.gt_pixels > 0))


def compute_metrics(confusion: np.ndarray) -> SegmentationMetrics:
    """mIoU, pixel accuracy, mean accuracy and fwIoU as detectron2's SemSegEvaluator (main) computes them.

    With no labelled pixel at all every mean is NaN.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"a confusion matrix is K x K, got shape {confusion.shape}")
    true_positive = np.diag(confusion).astype(np.float64)
    gt_pixels = confusion.sum(axis=1)
    predicted_pixels = confusion.sum(axis=0)
    union = gt_pixels + predicted_pixels - true_positive
    valid = gt_pixels > 0  # detectron2: acc_valid; iou_valid = acc_valid & (union > 0) is the same set
    iou = np.full(len(confusion), np.nan)
    accuracy = np.full(len(confusion), np.nan)
    iou[valid] = true_positive[valid] / union[valid]
    accuracy[valid] = true_positive[valid] / gt_pixels[valid]
    total = gt_pixels.sum()
    if not valid.any():
        return SegmentationMetrics(math.nan, math.nan, math.nan, math.nan, iou, accuracy, gt_pixels, predicted_pixels)
    return SegmentationMetrics(
        miou=float(iou[valid].mean()),
        pixel_accuracy=float(true_positive.sum() / total),
        mean_accuracy=float(accuracy[valid].mean()),
        fw_iou=float((iou[valid] * gt_pixels[valid]).sum() / total),
        iou=iou,
        accuracy=accuracy,
        gt_pixels=gt_pixels,
        predicted_pixels=predicted_pixels,
    )
