"""The model stage of the labelling and evaluation pipelines: one way to load the model on an actor, one per-image
fallback when a batch fails, one record of the images that killed their worker (:func:`predict_counting_deaths`),
and labelling's model UDF (:class:`SegmentationModel`).

Evaluation's actors build their predictor through :class:`CatSegPredictorFactory`, which calls :func:`load_predictor`
too, so both pipelines run the same Predictor settings (the Predictor's own class chunk).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import ray

import catseg
from pipelines.masks import REVIEW_COLUMNS, REVIEW_THRESHOLD, mask_dtype, review_signals
from pipelines.rows import PERMANENT, TRANSIENT, column_or_nulls, describe_error, error_kind, stage_table

logger = logging.getLogger(__name__)

# labelling's model stage output: a label map per image, or the row's error
PREDICTED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("labels", pa.large_binary()),  # H x W class ids, uint8 or uint16 (see masks.mask_dtype)
        ("confidence", pa.large_binary()),  # H x W float32 max probability
        ("mean_confidence", pa.float64()),  # the review signals (masks.review_signals)
        ("low_confidence_fraction", pa.float64()),
        ("mean_margin", pa.float64()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)

MAX_WORKER_DEATHS = 3  # per image: once in its batch, then twice alone; then it becomes a transient error row

Result = TypeVar("Result")

LabelPredictor = Callable[[list[np.ndarray], list[str]], list[np.ndarray]]
"""(images H x W x 3 uint8, class names) -> one H x W integer label map per image (ids index the names)."""
PredictorFactory = Callable[[], LabelPredictor]
"""Called once per model actor, on the worker: loads the model and returns its :data:`LabelPredictor`."""


def load_predictor(
    model_uri: str, *, cpu_threads: int | None = None, precision: str = "float32", class_chunk: int | None = None
) -> Any:
    """A ``catseg.Predictor`` for ``model_uri`` (a released name, a checkpoint, an official .pth) on this worker.

    ``cpu_threads`` caps torch's threads at the CPUs Ray gave the actor (torch would take every core of the node).
    The device is CUDA when the actor got a GPU torch can use, otherwise the CPU (e.g. a fake GPU resource).
    """
    import torch

    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    chunk = {} if class_chunk is None else {"class_chunk": class_chunk}
    return catseg.Predictor(catseg.load_model(model_uri), precision=precision, **chunk)


def predict_each(
    predict_batch: Callable[[list[np.ndarray]], Sequence[Result]], images: list[np.ndarray]
) -> list[Result | BaseException]:
    """``predict_batch(images)``; when it fails (one bad image, memory), each image alone, so only the culprit
    fails. Returns one result or exception per image."""
    if not images:
        return []
    try:
        results = list(predict_batch(images))
        if len(results) != len(images):
            raise RuntimeError(f"the predictor returned {len(results)} results for {len(images)} images")
        return results
    except Exception:
        retried: list[Result | BaseException] = []
        for image in images:
            try:
                [result] = predict_batch([image])
                retried.append(result)
            except Exception as err:
                retried.append(err)
        return retried


@ray.remote(num_cpus=0, max_restarts=-1)
class InFlightImages:
    """Which images model workers have started and not finished: the count of a worker's deaths per image.

    Ray Data restarts a dead model actor and retries its batch without limit, so an image that kills its worker
    (out of memory, a crash) would stop the run forever. The model stage records what it starts here and clears
    what it finishes; a retried batch that finds its images here runs them one at a time, and an image whose
    worker died :data:`MAX_WORKER_DEATHS` times becomes an error row. Entries live only while an image is in
    flight, plus one per image given up on: the actor's memory does not grow with the run.
    """

    def __init__(self) -> None:
        self._starts: dict[str, int] = {}

    def begin_batch(self, image_ids: list[str]) -> list[int]:
        """Earlier unfinished starts of each image; when there are none, records this start of all of them."""
        deaths = [self._starts.get(image_id, 0) for image_id in image_ids]
        if not any(deaths):
            for image_id in image_ids:
                self._starts[image_id] = 1
        return deaths

    def begin_one(self, image_id: str) -> None:
        self._starts[image_id] = self._starts.get(image_id, 0) + 1

    def finish(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            self._starts.pop(image_id, None)


def worker_died_error(deaths: int, task: str = "label") -> str:
    """The error text of an image given up on; ``task`` is the pipeline's verb ("label", "evaluate")."""
    return (
        f"model: the model worker died {deaths} times while it had this image to {task} (killed for memory, "
        f"crashed, or its node was lost); re-run with more memory per model worker to {task} it"
    )


def predict_counting_deaths(
    in_flight: Any,
    predict: Callable[[list[np.ndarray]], Sequence[Result]],
    images: list[np.ndarray],
    ids: list[str],
    task: str = "label",
) -> list[Result | BaseException | str]:
    """:func:`predict_each`, recorded in ``in_flight`` (an :class:`InFlightImages` actor; None: no record).

    ``ids`` name the images stably across retries of their batch. A batch that a dead worker held runs one image
    at a time, and an image whose worker died :data:`MAX_WORKER_DEATHS` times comes back as its error text
    (:func:`worker_died_error`) instead of being run again: Ray Data would retry it, and die, forever.
    """
    if in_flight is None or not images:
        return predict_each(predict, images)
    try:
        deaths = ray.get(in_flight.begin_batch.remote(ids))
    except ray.exceptions.RayError as err:  # the record is lost (its node died): predict without it
        logger.warning("running the model without a record of model worker deaths: %s", err)
        return predict_each(predict, images)
    if not any(deaths):
        results = predict_each(predict, images)
        in_flight.finish.remote(ids)
        return results
    logger.warning("a model worker died while it held this batch: running its %d images one by one", len(ids))
    results: list[Result | BaseException | str] = []
    for image, image_id, died in zip(images, ids, deaths, strict=True):
        if died >= MAX_WORKER_DEATHS:
            results.append(worker_died_error(died, task))
            continue
        ray.get(in_flight.begin_one.remote(image_id))
        results.extend(predict_each(predict, [image]))
        ray.get(in_flight.finish.remote([image_id]))
    return results


class SegmentationModel:
    """Model stage (one instance per actor): loads the checkpoint once, embeds the vocabulary once, then runs
    the sliding-window protocol (:meth:`catseg.Predictor.predict_labels_batch`) on each batch.

    The device is CUDA when the actor was given a GPU that torch can use, else CPU (e.g. a fake GPU resource).
    """

    def __init__(
        self,
        model_uri: str,
        class_names: Sequence[str],
        cpu_threads: int | None = None,
        precision: str = "float32",
        in_flight: Any = None,
        low_confidence_below: float = REVIEW_THRESHOLD,
    ) -> None:
        """``in_flight``: an :class:`InFlightImages` actor shared by the stage's actors (None: no death count);
        ``low_confidence_below``: the threshold of the ``low_confidence_fraction`` review signal."""
        self.in_flight = in_flight
        self.low_confidence_below = low_confidence_below
        self.class_names = list(class_names)
        self.mask_dtype = mask_dtype(len(self.class_names))
        self.predictor = load_predictor(model_uri, cpu_threads=cpu_threads, precision=precision)
        self.predictor.embed_classes(self.class_names)  # cached inside the Predictor for every batch

    def device_info(self) -> dict[str, Any]:
        import torch

        return {
            "device": str(self.predictor.device),
            "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
            "cuda_available": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        widths, heights = batch["width"].to_pylist(), batch["height"].to_pylist()
        errors, kinds = batch["error"].to_pylist(), column_or_nulls(batch, "error_kind")
        todo = [i for i, error in enumerate(errors) if error is None]
        pixel_column = batch["pixels"]
        images = [
            np.frombuffer(pixel_column[i].as_py(), dtype=np.uint8).reshape(heights[i], widths[i], 3) for i in todo
        ]
        labels: list[bytes | None] = [None] * len(errors)
        confidence: list[bytes | None] = [None] * len(errors)
        signals: dict[str, list[float | None]] = {name: [None] * len(errors) for name in REVIEW_COLUMNS}

        def predict(batch_images: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
            return self.predictor.predict_labels_batch(batch_images, self.class_names, runner_up=True)

        ids = [batch["image_id"][i].as_py() for i in todo]
        for i, result in zip(todo, predict_counting_deaths(self.in_flight, predict, images, ids), strict=True):
            if isinstance(result, str):
                errors[i], kinds[i] = result, TRANSIENT
                continue
            if isinstance(result, BaseException):
                errors[i], kinds[i] = describe_error("model", result), error_kind("model", result)
                continue
            label_map, probability, runner_up = result
            if label_map.shape != (heights[i], widths[i]):
                errors[i] = f"model: label map {label_map.shape} does not match the image {heights[i]}x{widths[i]}"
                kinds[i] = PERMANENT
                continue
            labels[i] = label_map.astype(self.mask_dtype).tobytes()
            confidence[i] = probability.astype(np.float32).tobytes()
            for name, value in review_signals(probability, runner_up, self.low_confidence_below).items():
                signals[name][i] = value
        return stage_table(
            PREDICTED_SCHEMA, batch, labels=labels, confidence=confidence, **signals, error=errors, error_kind=kinds
        )


class CatSegPredictorFactory:
    """The real model stage: loads a CAT-Seg checkpoint on the actor and predicts with the paper's protocol
    (:meth:`catseg.Predictor.predict_labels_batch`: 640 x 640 resize, 4 crops + global view, original size).

    The device is CUDA when the actor got a GPU torch can use, otherwise the CPU (e.g. a fake GPU resource).
    """

    def __init__(
        self, model_uri: str, cpu_threads: int | None = None, class_chunk: int | None = None, precision: str = "float32"
    ) -> None:
        self.model_uri = model_uri
        self.cpu_threads = cpu_threads
        self.class_chunk = class_chunk  # None: the Predictor's default for the actor's device, as labelling runs
        self.precision = precision

    def settings(self) -> dict[str, Any]:
        """What the report records about how the model ran (results differ slightly across precisions)."""
        chunk = self.class_chunk or (
            f"{catseg.Predictor.CPU_CLASS_CHUNK} on CPU, {catseg.Predictor.DEFAULT_CLASS_CHUNK} on CUDA"
        )
        return {"precision": self.precision, "class_chunk": chunk, "cpu_threads": self.cpu_threads}

    def __call__(self) -> LabelPredictor:
        predictor = load_predictor(
            self.model_uri, cpu_threads=self.cpu_threads, precision=self.precision, class_chunk=self.class_chunk
        )

        def predict(images: list[np.ndarray], class_names: list[str]) -> list[np.ndarray]:
            return [labels for labels, _ in predictor.predict_labels_batch(images, class_names)]

        return predict
