"""A Ray worker setup hook for the worker-death test: the model stage's process exits hard (no exception, no
cleanup, as when the kernel's OOM killer or a segfault ends it) when it is given the marked image."""

from __future__ import annotations

import os

import numpy as np

CRASH_COLOUR = (13, 37, 113)  # an image of only this colour kills the worker that predicts it


def is_marked(image: np.ndarray) -> bool:
    return bool(np.all(image[::7, ::7] == np.array(CRASH_COLOUR, dtype=image.dtype)))


def install() -> None:
    import catseg

    original = catseg.Predictor.predict_labels_batch

    def predict_labels_batch(self, images, classes, **options):
        if any(is_marked(np.asarray(image)) for image in images):
            os._exit(17)
        return original(self, images, classes, **options)

    catseg.Predictor.predict_labels_batch = predict_labels_batch
