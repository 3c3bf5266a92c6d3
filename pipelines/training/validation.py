"""Validation during fine-tuning: the mIoU of the current weights on held-out pairs, as jobs.evaluate defines it
(:func:`pipelines.metrics.compute_metrics`), summed over every rank's share."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import catseg
from catseg import IGNORE_INDEX
from pipelines.metrics import compute_metrics
from pipelines.training.augment import resize_for_eval
from pipelines.training.datasets import read_example


def load_eval_examples(
    pairs: list[tuple[str, str]], label_encoding: str, class_names: list[str], size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validation pairs decoded and squashed to size x size."""
    examples = [read_example(image, label, label_encoding, len(class_names)) for image, label in pairs]
    return [resize_for_eval(image, label, size) for image, label in examples]


@torch.no_grad()
def evaluate_miou(
    model: catseg.CATSeg,
    examples: list[tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    device: torch.device,
    autocast: torch.autocast,
    batch_size: int = 4,
) -> float:
    """Mean IoU (detectron2's definition, as jobs.evaluate) of the confusion summed over every rank's examples.

    Eval mode (class-attention pooling 1, as at inference); whole image at the crop size. Every rank must call it.
    """
    num_classes = len(class_names)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    model.eval()
    text = model.embed_classes(class_names)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        images = torch.from_numpy(np.stack([image for image, _ in chunk])).to(device).permute(0, 3, 1, 2).float()
        labels = torch.from_numpy(np.stack([label for _, label in chunk])).to(device).long()
        with autocast:
            logits = model(images, text)
        predictions = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear").argmax(1)
        valid = labels != IGNORE_INDEX
        confusion += torch.bincount(labels[valid] * num_classes + predictions[valid], minlength=num_classes**2)
    model.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    return miou_from_confusion(confusion.view(num_classes, num_classes).cpu())


def miou_from_confusion(confusion: torch.Tensor) -> float:
    """confusion[true, predicted] -> mIoU as jobs.evaluate reports it (:func:`pipelines.metrics.compute_metrics`)."""
    return compute_metrics(confusion.numpy()).miou
