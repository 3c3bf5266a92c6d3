"""An evaluation's result and how it is reported: the JSON report (plus the summed confusion matrix beside it),
the per-class table and the one-line headline that ``jobs.evaluate`` prints."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.metrics import SegmentationMetrics


@dataclass
class EvaluationResult:
    benchmark: str
    model: str
    data: str
    class_names: list[str]
    confusion: np.ndarray
    metrics: SegmentationMetrics
    images_total: int
    images_evaluated: int
    labelled_pixels: int
    errors: list[dict[str, str]] = field(default_factory=list)  # the first max_listed_errors
    images_failed: int = 0
    seconds: float = 0.0
    predictor: dict[str, Any] = field(default_factory=dict)  # the factory's settings(), e.g. the precision

    def to_report(self) -> dict[str, Any]:
        """The JSON report: headline numbers as fractions (0..1), per-class rows, image accounting."""
        m = self.metrics
        return {
            "benchmark": self.benchmark,
            "model": self.model,
            "predictor": self.predictor,
            "data": self.data,
            "miou": _number(m.miou),
            "pixel_accuracy": _number(m.pixel_accuracy),
            "mean_accuracy": _number(m.mean_accuracy),
            "fw_iou": _number(m.fw_iou),
            "num_classes": len(self.class_names),
            "classes_in_mean": m.classes_in_mean,
            "image_count": self.images_evaluated,
            "images": {"total": self.images_total, "evaluated": self.images_evaluated, "failed": self.images_failed},
            "labelled_pixels": self.labelled_pixels,
            "per_class": [
                {
                    "id": k,
                    "name": name,
                    "iou": _number(m.iou[k]),
                    "accuracy": _number(m.accuracy[k]),
                    "gt_pixels": int(m.gt_pixels[k]),
                    "predicted_pixels": int(m.predicted_pixels[k]),
                }
                for k, name in enumerate(self.class_names)
            ],
            "errors": self.errors,
            "metric": "detectron2 SemSegEvaluator (main): IoU_k = TP/(TP+FP+FN) over the summed confusion matrix, "
            "ignored pixels excluded; mIoU averages the classes with ground-truth pixels",
            "seconds": round(self.seconds, 3),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def report_uri(output: str, benchmark: str) -> str:
    """``output`` itself if it names a .json file, else ``output/evaluation_<benchmark>.json``."""
    return output if output.endswith(".json") else storage.join(output, f"evaluation_{benchmark}.json")


def write_report(result: EvaluationResult, output: str) -> str:
    """Write the JSON report (and the summed confusion matrix as .npy beside it); return the report's URI."""
    uri = report_uri(output, result.benchmark)
    storage.write_text(uri, json.dumps(result.to_report(), indent=2) + "\n")
    buffer = io.BytesIO()
    np.save(buffer, result.confusion)
    storage.write_bytes(uri.removesuffix(".json") + "_confusion.npy", buffer.getvalue())
    return uri


def format_table(result: EvaluationResult) -> str:
    """Per-class IoU / accuracy in percent and pixel counts; '-' marks classes without ground truth."""
    m = result.metrics
    width = min(40, max(len(name) for name in result.class_names))

    def percent(value: float) -> str:
        return "     -" if math.isnan(value) else f"{100 * value:6.2f}"

    lines = [f"{'id':>4}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'GT px':>12}  {'pred px':>12}"]
    for k, name in enumerate(result.class_names):
        lines.append(
            f"{k:>4}  {name[:width]:<{width}}  {percent(m.iou[k])}  {percent(m.accuracy[k])}  "
            f"{int(m.gt_pixels[k]):>12}  {int(m.predicted_pixels[k]):>12}"
        )
    return "\n".join(lines)


def headline(result: EvaluationResult) -> str:
    """One line: benchmark, mIoU and pixel accuracy in percent, image accounting, model."""
    m = result.metrics
    miou = "n/a" if math.isnan(m.miou) else f"{100 * m.miou:.2f}"
    pacc = "n/a" if math.isnan(m.pixel_accuracy) else f"{100 * m.pixel_accuracy:.2f}"
    return (
        f"{result.benchmark}: mIoU {miou} (over {m.classes_in_mean}/{len(result.class_names)} classes), "
        f"pixel accuracy {pacc}, {result.images_evaluated}/{result.images_total} images "
        f"({result.images_failed} failed), model {result.model}"
    )
