"""The mIoU metric against hand-computed confusion matrices (no Ray, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.evaluation.sets import map_background
from pipelines.images import IGNORE_ID
from pipelines.metrics import (
    add_sparse_confusion,
    compute_metrics,
    confusion_matrix,
    encode_sparse_confusion,
)

X = IGNORE_ID


def test_confusion_matrix_counts_ground_truth_rows_and_skips_ignored_pixels():
    label = np.array([[0, 0, 1], [1, 2, X]], dtype=np.uint16)
    prediction = np.array([[0, 1, 1], [1, 0, 2]])
    expected = np.array(
        [
            [1, 1, 0],  # class 0: one right, one predicted as 1
            [0, 2, 0],
            [1, 0, 0],  # class 2 predicted as 0; the ignored pixel predicted as 2 counts nowhere
        ]
    )
    np.testing.assert_array_equal(confusion_matrix(label, prediction, 3), expected)


def test_perfect_prediction_gives_miou_one():
    label = np.array([[0, 1], [2, X]], dtype=np.uint16)
    metrics = compute_metrics(confusion_matrix(label, np.array([[0, 1], [2, 0]]), 3))
    assert metrics.miou == 1.0 and metrics.pixel_accuracy == 1.0 and metrics.mean_accuracy == 1.0


def test_hand_computed_matrix():
    # rows = ground truth, columns = prediction
    confusion = np.array([[8, 2, 0], [1, 5, 4], [0, 0, 10]])
    metrics = compute_metrics(confusion)
    # IoU = TP / (GT + PRED - TP): class 0: 8 / (10 + 9 - 8); class 1: 5 / (10 + 7 - 5); class 2: 10 / (10 + 14 - 10)
    expected_iou = [8 / 11, 5 / 12, 10 / 14]
    np.testing.assert_allclose(metrics.iou, expected_iou)
    assert metrics.miou == pytest.approx(sum(expected_iou) / 3)
    assert metrics.pixel_accuracy == pytest.approx(23 / 30)
    assert metrics.mean_accuracy == pytest.approx((8 / 10 + 5 / 10 + 10 / 10) / 3)
    assert metrics.fw_iou == pytest.approx(sum(iou * 10 / 30 for iou in expected_iou))
    np.testing.assert_array_equal(metrics.gt_pixels, [10, 10, 10])
    np.testing.assert_array_equal(metrics.predicted_pixels, [9, 7, 14])


def test_class_absent_from_ground_truth_is_left_out_even_when_predicted():
    # class 2 never occurs in the labels but takes 4 pixels of class 1 (detectron2 main: iou_valid needs GT > 0)
    confusion = np.array([[6, 0, 0], [0, 6, 4], [0, 0, 0]])
    metrics = compute_metrics(confusion)
    assert metrics.iou[0] == 1.0 and metrics.iou[1] == pytest.approx(0.6)
    assert math.isnan(metrics.iou[2]) and math.isnan(metrics.accuracy[2])
    assert metrics.miou == pytest.approx((1.0 + 0.6) / 2)
    assert metrics.classes_in_mean == 2
    assert metrics.predicted_pixels[2] == 4


def test_class_absent_everywhere_is_left_out():
    confusion = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    metrics = compute_metrics(confusion)
    assert metrics.miou == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert metrics.classes_in_mean == 2


def test_ignored_pixels_change_nothing():
    label = np.array([[0, 1, X, X]], dtype=np.uint16)
    with_ignored = confusion_matrix(label, np.array([[0, 1, 1, 0]]), 2)
    without = confusion_matrix(label[:, :2], np.array([[0, 1]]), 2)
    np.testing.assert_array_equal(with_ignored, without)
    assert compute_metrics(with_ignored).miou == 1.0


def test_no_labelled_pixel_gives_nan_not_an_error():
    metrics = compute_metrics(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(metrics.miou) and math.isnan(metrics.pixel_accuracy)


def test_ids_outside_the_class_range_are_refused():
    with pytest.raises(ValueError, match="prediction holds ids outside"):
        confusion_matrix(np.zeros((2, 2), np.uint16), np.full((2, 2), 3), 3)
    with pytest.raises(ValueError, match="label holds ids outside"):
        confusion_matrix(np.full((2, 2), 7, np.uint16), np.zeros((2, 2), int), 3)
    with pytest.raises(ValueError, match="prediction is"):
        confusion_matrix(np.zeros((2, 2), np.uint16), np.zeros((2, 3), int), 3)


def test_sparse_confusion_sums_to_the_dense_total():
    rng = np.random.default_rng(0)
    total = np.zeros((5, 5), np.int64)
    expected = np.zeros((5, 5), np.int64)
    for _ in range(4):
        label = rng.integers(0, 5, (6, 7)).astype(np.uint16)
        matrix = confusion_matrix(label, rng.integers(0, 5, (6, 7)), 5)
        expected += matrix
        add_sparse_confusion(total, encode_sparse_confusion(matrix))
    np.testing.assert_array_equal(total, expected)


def test_voc20b_background_prompts_become_the_background_class():
    predictions = np.array([0, 19, 20, 21, 58])
    np.testing.assert_array_equal(map_background(predictions, 20), [0, 19, 20, 20, 20])
    np.testing.assert_array_equal(map_background(predictions, None), predictions)
