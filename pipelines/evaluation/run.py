"""Paper-protocol evaluation (mIoU) as a Ray Data pipeline.

    (image_uri, label_uri) rows
      -> read_pairs          CPU tasks: fetch both files, decode the image (RGB) and the label (class ids)
      -> ConfusionStage      actor pool, num_gpus per actor: the model predicts a label map per image with the
                             sliding-window protocol; the worker turns (label, prediction) into a confusion matrix
      -> driver              sums the per-image matrices while they stream in (memory independent of the
                             dataset size: no prediction ever reaches the driver), then computes the metrics

The model stage is injectable: :func:`evaluate` takes a ``predictor_factory``, called once per actor, that
returns a :data:`LabelPredictor` (images, class names -> label maps). :class:`CatSegPredictorFactory` is the real
one; tests pass an oracle. A corrupt image or label becomes a counted error row, and so does an image whose model
worker died 3 times while it had it (as in labelling: Ray Data would retry it forever); a label id outside the
class list stops the run with :class:`pipelines.images.LabelIdError` (the benchmark or class file is wrong).
The metric is :mod:`pipelines.metrics` (detectron2's SemSegEvaluator, as CAT-Seg runs it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipelines import cluster, storage
from pipelines.evaluation.report import EvaluationResult
from pipelines.evaluation.sets import (
    BENCHMARK_FIX,
    BENCHMARK_LIMIT,
    PAIR_SCHEMA,
    READ_THREADS,
    EvaluationSet,
    map_background,
    read_pairs,
)
from pipelines.images import LabelIdError, check_label_ids, decode_label
from pipelines.metrics import (
    add_sparse_confusion,
    compute_metrics,
    confusion_matrix,
    encode_sparse_confusion,
)
from pipelines.model_stage import InFlightImages, PredictorFactory, predict_counting_deaths
from pipelines.rows import describe_error, stage_table
from pipelines.workers import ModelActors

logger = logging.getLogger(__name__)

READ_CPUS = 0.25  # fetching and decoding is mostly waiting on storage: several read tasks share a core

RESULT_SCHEMA = pa.schema(
    [
        *PAIR_SCHEMA,
        pa.field("labelled_pixels", pa.int64()),  # pixels that count (not ignored)
        pa.field("confusion", pa.large_binary()),  # sparse per-image confusion, see encode_sparse_confusion
        pa.field("error", pa.string()),
        pa.field("fatal", pa.bool_()),
    ]
)


# ---------------------------------------------------------------------------------------------------------------
# Model stage


class ConfusionStage:
    """Actor: predicts each decoded image once and returns its confusion matrix against the label.

    An image that kills its worker :data:`~pipelines.model_stage.MAX_WORKER_DEATHS` times (the record is the
    ``in_flight`` :class:`~pipelines.model_stage.InFlightImages` actor; None: no record) becomes an error row,
    counted as failed in the report like an image whose prediction raised.
    """

    def __init__(
        self,
        predictor_factory: PredictorFactory,
        vocabulary: Sequence[str],
        num_classes: int,
        background_from: int | None = None,
        in_flight: Any = None,
    ) -> None:
        self.in_flight = in_flight
        self.predict = predictor_factory()
        self.vocabulary = list(vocabulary)
        self.num_classes = num_classes
        self.background_from = background_from

    def __call__(self, batch: pa.Table) -> pa.Table:
        widths, heights = batch["width"].to_pylist(), batch["height"].to_pylist()
        errors, fatal = batch["error"].to_pylist(), batch["fatal"].to_pylist()
        todo = [i for i, error in enumerate(errors) if error is None]
        pixels, labels = batch["pixels"], batch["label"]
        images = [np.frombuffer(pixels[i].as_py(), np.uint8).reshape(heights[i], widths[i], 3) for i in todo]
        counted: list[int | None] = [None] * len(errors)
        confusion: list[bytes | None] = [None] * len(errors)

        def predict(batch_images: list[np.ndarray]) -> list[np.ndarray]:
            return self.predict(batch_images, self.vocabulary)

        # The (image, label) pair names an image across retries of its batch; the report lists its image_uri.
        image_uris, label_uris = batch["image_uri"].to_pylist(), batch["label_uri"].to_pylist()
        ids = [f"{image_uris[i]}\n{label_uris[i]}" for i in todo]
        predictions = predict_counting_deaths(self.in_flight, predict, images, ids, task="evaluate")
        for i, prediction in zip(todo, predictions, strict=True):
            if isinstance(prediction, str):  # given up on after its worker died: the error says so
                errors[i] = prediction
                continue
            if isinstance(prediction, BaseException):
                errors[i] = describe_error("model", prediction)
                continue
            label = np.frombuffer(labels[i].as_py(), np.uint16).reshape(heights[i], widths[i])
            try:
                prediction = np.asarray(prediction)
                if prediction.size and (prediction.min() < 0 or prediction.max() >= len(self.vocabulary)):
                    raise ValueError(f"prediction ids outside the {len(self.vocabulary)}-name vocabulary")
                matrix = confusion_matrix(label, map_background(prediction, self.background_from), self.num_classes)
            except ValueError as err:
                errors[i] = describe_error("metric", err)
                continue
            counted[i] = int(matrix.sum())
            confusion[i] = encode_sparse_confusion(matrix)
        return stage_table(
            RESULT_SCHEMA, batch, labelled_pixels=counted, confusion=confusion, error=errors, fatal=fatal
        )


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int = 2  # images per model call (and per block: small blocks keep every stage streaming)
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_actors: int | None = None  # None: one per GPU share, or 1 without GPUs
    cpus_per_actor: float = 1.0
    read_threads: int = READ_THREADS
    max_listed_errors: int = 100  # errors listed in the report (all are counted)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ValueError(f"GPUs per actor must be >= 0, got {self.num_gpus_per_actor}")
        if self.max_actors is not None and self.max_actors < 1:
            raise ValueError(f"max actors must be at least 1, got {self.max_actors}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"CPUs per actor must be > 0, got {self.cpus_per_actor}")


def plan_actors(config: EvaluationConfig) -> ModelActors:
    return ModelActors.plan(config.num_gpus_per_actor, config.max_actors, config.cpus_per_actor, reserve_cpus=READ_CPUS)


def build_evaluation_dataset(
    evaluation_set: EvaluationSet,
    predictor_factory: PredictorFactory,
    config: EvaluationConfig,
    actors: ModelActors | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of per-image result rows (RESULT_SCHEMA); ``actors`` from :func:`plan_actors`."""
    actors = actors or plan_actors(config)
    pairs = evaluation_set.pairs
    step = config.batch_size
    blocks = [
        pa.table({"image_uri": [p[0] for p in pairs[i : i + step]], "label_uri": [p[1] for p in pairs[i : i + step]]})
        for i in range(0, len(pairs), step)
    ]
    # Counts model worker deaths per image: Ray Data restarts a dead actor and retries its batch forever. The
    # dataset holds the handle (in the actors' constructor arguments), which keeps the actor alive while it runs.
    in_flight = InFlightImages.remote()
    return (
        ray.data.from_arrow(blocks)
        .map_batches(
            read_pairs,
            fn_kwargs={
                "encoding": evaluation_set.label_encoding,
                "num_classes": evaluation_set.num_classes,
                "read_threads": config.read_threads,
            },
            batch_format="pyarrow",
            batch_size=step,
            num_cpus=READ_CPUS,
        )
        .map_batches(
            ConfusionStage,
            fn_constructor_kwargs={
                "predictor_factory": predictor_factory,
                "vocabulary": evaluation_set.vocabulary,
                "num_classes": evaluation_set.num_classes,
                "background_from": evaluation_set.background_from,
                "in_flight": in_flight,
            },
            batch_size=step,
            batch_format="pyarrow",
            **actors.map_batches_args(),
        )
    )


def accumulate(
    rows: Iterable[pa.Table], num_classes: int, max_listed_errors: int = 100
) -> tuple[np.ndarray, int, int, int, list[dict[str, str]]]:
    """Sum streamed result batches: (confusion, images evaluated, images failed, labelled pixels, listed errors).

    Raises LabelIdError on the first row whose label ids do not fit the class list."""
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    evaluated = failed = pixels = 0
    errors: list[dict[str, str]] = []
    for batch in rows:
        columns = batch.select(["image_uri", "labelled_pixels", "confusion", "error", "fatal"]).to_pydict()
        for uri, counted, encoded, error, fatal in zip(*columns.values(), strict=True):
            if fatal:
                raise LabelIdError(error)
            if error is not None:
                failed += 1
                if len(errors) < max_listed_errors:
                    errors.append({"image_uri": uri, "error": error})
                continue
            add_sparse_confusion(total, encoded)
            evaluated += 1
            pixels += counted
    return total, evaluated, failed, pixels, errors


def evaluate(
    evaluation_set: EvaluationSet,
    predictor_factory: PredictorFactory,
    config: EvaluationConfig | None = None,
    model_id: str = "custom",
) -> EvaluationResult:
    """Run the evaluation on the connected Ray cluster (a local one is started if none is) and return the result.

    ``predictor_factory`` builds the model stage on each actor: :class:`CatSegPredictorFactory` for a checkpoint,
    or any picklable callable returning a :data:`LabelPredictor`.
    """
    config = config or EvaluationConfig()
    if not evaluation_set.pairs:
        raise ValueError(f"{evaluation_set.benchmark}: no images to evaluate")
    _check_first_label(evaluation_set)
    cluster.connect()
    started = time.perf_counter()
    actors = plan_actors(config)
    dataset = build_evaluation_dataset(evaluation_set, predictor_factory, config, actors)
    seen = 0

    def counted(batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
        nonlocal seen
        for batch in batches:
            seen += batch.num_rows
            yield batch

    total = len(evaluation_set.pairs)
    with cluster.CapacityWatch(  # lost capacity ends the block in CapacityLostError
        "a model actor",
        actors.cpus_per_actor,
        actors.num_gpus_per_actor,
        progress=lambda: f"{seen} of {total} images done",
    ):
        confusion, evaluated, failed, pixels, errors = accumulate(
            counted(dataset.iter_batches(batch_format="pyarrow", batch_size=None)),
            evaluation_set.num_classes,
            config.max_listed_errors,
        )
    return EvaluationResult(
        benchmark=evaluation_set.benchmark,
        model=model_id,
        data=evaluation_set.root,
        class_names=list(evaluation_set.class_names),
        confusion=confusion,
        metrics=compute_metrics(confusion),
        images_total=len(evaluation_set.pairs),
        images_evaluated=evaluated,
        labelled_pixels=pixels,
        errors=errors,
        images_failed=failed,
        seconds=time.perf_counter() - started,
        predictor=predictor_factory.settings() if hasattr(predictor_factory, "settings") else {},
    )


def _check_first_label(evaluation_set: EvaluationSet) -> None:
    """Fail in a second, not after the model loaded, when the labels do not match the class list."""
    uri = evaluation_set.pairs[0][1]
    try:
        label = decode_label(storage.read_bytes(uri), evaluation_set.label_encoding)
    except Exception as err:  # an unreadable first file is counted later like any other
        logger.warning("cannot pre-check %s: %s", uri, err)
        return
    check_label_ids(label, evaluation_set.num_classes, uri, limit=BENCHMARK_LIMIT, fix=BENCHMARK_FIX)
