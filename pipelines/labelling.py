"""Bulk labelling on Ray Data: image URIs in, one Parquet row per image out (see :func:`build_labelling_dataset`).

    sources (a listing or a manifest, minus images this run already labelled)
      -> read_image_bytes     CPU tasks: bytes from any fsspec URI, per-row errors
      -> decode_images        CPU tasks: EXIF orientation, RGB uint8, per-row errors
      -> SegmentationModel    actor pool, num_gpus per actor: checkpoint and vocabulary loaded once per actor
      -> encode_predictions   CPU tasks: PNG masks, optional confidence PNGs, per-class statistics
      -> write_parquet        <output>/data/*.parquet

Every stage passes rows through: a row that failed upstream carries its ``error`` to the output, so rows with a
mask plus rows with an error always equal the inputs. Stages exchange Arrow tables with explicit schemas (images as
raw bytes), so a batch of only failures still has the right column types.

Resume: each run has a ``run_id`` (by default a hash of input, vocabulary, model and result-affecting options);
before reading, the committed Parquet files of that run are listed and their ``image_id`` values skipped (see
:mod:`pipelines.output`). Re-running the same command after a crash labels only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray

import catseg

from . import cluster, storage
from .cpu_workers import cpu_worker_remote_args
from .images import ImageDecodeError, decode_image
from .masks import class_statistics, encode_confidence_png, encode_mask_png, labels_to_mask, mask_dtype
from .masks import unlabelled_value as unlabelled_value_for
from .models import ModelSource
from .output import (
    OUTPUT_SCHEMA,
    SCHEMA_VERSION,
    OutputConflictError,
    arrow_filesystem,
    committed_image_ids,
    count_rows,
    data_uri,
    read_manifest,
    write_manifest,
)

if TYPE_CHECKING:
    from .vocabulary import Vocabulary

logger = logging.getLogger(__name__)

# Fractional CPUs so read, decode, model, encode and write operators all fit on a small machine at once.
READ_CPUS, DECODE_CPUS, ENCODE_CPUS, WRITE_CPUS = 0.25, 0.25, 0.25, 0.25
BAD_NAME_ERROR = "input: the file name is not valid UTF-8 (shown escaped); rename the file to read it"
READ_THREADS = 16  # concurrent object-store GETs per read task

# error: set for inputs known bad before reading (a file name that is not UTF-8); they pass through as rows
SOURCE_SCHEMA = pa.schema([("image_id", pa.string()), ("source_uri", pa.string()), ("error", pa.string())])
READ_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source_uri", pa.string()), ("data", pa.large_binary()), ("error", pa.string())]
)
DECODED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.large_binary()),  # H x W x 3 uint8, C order
        ("error", pa.string()),
    ]
)
PREDICTED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("labels", pa.large_binary()),  # H x W class ids, uint8 or uint16 (see masks.mask_dtype)
        ("confidence", pa.large_binary()),  # H x W float32 max probability
        ("error", pa.string()),
    ]
)


def image_id_for(uri: str) -> str:
    """Stable id of an input image: a hash of its source URI (the key for resume and dedup)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]


def _describe_error(stage: str, err: BaseException) -> str:
    """One line: the stage, the exception type (unless it is our own readable decode error) and its message."""
    message = str(err) or type(err).__name__
    text = f"{stage}: {message}" if isinstance(err, ImageDecodeError) else f"{stage}: {type(err).__name__}: {message}"
    return text.replace("\n", " ")[:1000]


# -- stages ---------------------------------------------------------------------------------------------------
def _read_one(uri: str) -> tuple[bytes | None, str | None]:
    if uri is None:
        return None, None
    try:
        return storage.read_bytes(uri), None
    except Exception as err:  # each backend raises its own types; the row records why
        return None, _describe_error("read", err)


def read_image_bytes(batch: pa.Table) -> pa.Table:
    """source_uri -> encoded bytes (``data``), reading a batch's objects concurrently."""
    uris = batch["source_uri"].to_pylist()
    known = batch["error"].to_pylist() if "error" in batch.column_names else [None] * len(uris)
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(uris)))) as pool:
        results = list(pool.map(_read_one, uris))
    results = [(None, error) if error is not None else result for result, error in zip(results, known, strict=True)]
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source_uri": batch["source_uri"],
            "data": pa.array([r[0] for r in results], pa.large_binary()),
            "error": pa.array([r[1] for r in results], pa.string()),
        },
        schema=READ_SCHEMA,
    )


def decode_images(batch: pa.Table) -> pa.Table:
    """Encoded bytes -> RGB pixels (EXIF-oriented) and original size; undecodable rows get an error."""
    widths, heights, pixels, errors = [], [], [], []
    for data, error in zip(batch["data"].to_pylist(), batch["error"].to_pylist(), strict=True):
        rgb = None
        if error is None:
            try:
                rgb = decode_image(data)
            except Exception as err:  # a bad file becomes its own error row, never a failed batch
                error = _describe_error("decode", err)
        widths.append(None if rgb is None else rgb.shape[1])
        heights.append(None if rgb is None else rgb.shape[0])
        pixels.append(None if rgb is None else rgb.tobytes())
        errors.append(error)
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source_uri": batch["source_uri"],
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "pixels": pa.array(pixels, pa.large_binary()),
            "error": pa.array(errors, pa.string()),
        },
        schema=DECODED_SCHEMA,
    )


class SegmentationModel:
    """Model stage (one instance per actor): loads the checkpoint once, embeds the vocabulary once, then runs
    the sliding-window protocol (:meth:`catseg.Predictor.predict_labels_batch`) on each batch.

    The device is CUDA when the actor was given a GPU that torch can use, else CPU (e.g. a fake GPU resource).
    """

    def __init__(
        self, model_uri: str, class_names: Sequence[str], cpu_threads: int | None = None, precision: str = "float32"
    ) -> None:
        import torch

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.class_names = list(class_names)
        self.mask_dtype = mask_dtype(len(self.class_names))
        self.predictor = catseg.Predictor(catseg.load_model(model_uri), precision=precision)
        self.predictor.embed_classes(self.class_names)  # cached inside the Predictor for every batch

    def device_info(self) -> dict[str, Any]:
        import torch

        return {
            "device": str(self.predictor.device),
            "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
            "cuda_available": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
        }

    def _predict(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | BaseException]:
        if not images:
            return []
        try:
            return list(self.predictor.predict_labels_batch(images, self.class_names))
        except Exception:
            # one image broke the batch (or it ran out of memory): retry alone so only the culprit fails
            results: list[tuple[np.ndarray, np.ndarray] | BaseException] = []
            for image in images:
                try:
                    results.append(self.predictor.predict_labels(image, self.class_names))
                except Exception as err:
                    results.append(err)
            return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        widths, heights = batch["width"].to_pylist(), batch["height"].to_pylist()
        errors = batch["error"].to_pylist()
        todo = [i for i, error in enumerate(errors) if error is None]
        pixel_column = batch["pixels"]
        images = [
            np.frombuffer(pixel_column[i].as_py(), dtype=np.uint8).reshape(heights[i], widths[i], 3) for i in todo
        ]
        labels: list[bytes | None] = [None] * len(errors)
        confidence: list[bytes | None] = [None] * len(errors)
        for i, result in zip(todo, self._predict(images), strict=True):
            if isinstance(result, BaseException):
                errors[i] = _describe_error("model", result)
                continue
            label_map, probability = result
            if label_map.shape != (heights[i], widths[i]):
                errors[i] = f"model: label map {label_map.shape} does not match the image {heights[i]}x{widths[i]}"
                continue
            labels[i] = label_map.astype(self.mask_dtype).tobytes()
            confidence[i] = probability.astype(np.float32).tobytes()
        return pa.table(
            {
                "image_id": batch["image_id"],
                "source_uri": batch["source_uri"],
                "width": batch["width"],
                "height": batch["height"],
                "labels": pa.array(labels, pa.large_binary()),
                "confidence": pa.array(confidence, pa.large_binary()),
                "error": pa.array(errors, pa.string()),
            },
            schema=PREDICTED_SCHEMA,
        )


def encode_predictions(
    batch: pa.Table,
    *,
    class_names: Sequence[str],
    run_id: str,
    model_id: str,
    vocab_id: str,
    with_confidence: bool = False,
    confidence_threshold: float | None = None,
) -> pa.Table:
    """Label maps -> the output rows: PNG mask, optional confidence PNG, per-class statistics, provenance."""
    names = list(class_names)
    dtype, unlabelled = mask_dtype(len(names)), unlabelled_value_for(len(names))
    widths, heights = batch["width"].to_pylist(), batch["height"].to_pylist()
    errors = batch["error"].to_pylist()
    masks, confidences, stats = [], [], []
    for i, (raw_labels, raw_confidence) in enumerate(
        zip(batch["labels"].to_pylist(), batch["confidence"].to_pylist(), strict=True)
    ):
        mask_png = confidence_png = class_stats = None
        if errors[i] is None:
            try:
                shape = (heights[i], widths[i])
                probability = np.frombuffer(raw_confidence, dtype=np.float32).reshape(shape)
                label_map = np.frombuffer(raw_labels, dtype=dtype).reshape(shape)
                mask = labels_to_mask(label_map, len(names), probability, confidence_threshold)
                mask_png = encode_mask_png(mask)
                confidence_png = encode_confidence_png(probability) if with_confidence else None
                class_stats = class_statistics(mask, probability, names, unlabelled)
            except Exception as err:
                mask_png = confidence_png = class_stats = None
                errors[i] = _describe_error("encode", err)
        masks.append(mask_png)
        confidences.append(confidence_png)
        stats.append(class_stats)
    rows = len(errors)
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source_uri": batch["source_uri"],
            "width": batch["width"],
            "height": batch["height"],
            "mask_png": pa.array(masks, pa.binary()),
            "confidence_png": pa.array(confidences, pa.binary()),
            "class_stats": pa.array(stats, OUTPUT_SCHEMA.field("class_stats").type),
            "error": pa.array(errors, pa.string()),
            "run_id": pa.array([run_id] * rows, pa.string()),
            "model_id": pa.array([model_id] * rows, pa.string()),
            "vocab_id": pa.array([vocab_id] * rows, pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )


# -- configuration --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelConfig:
    """One labelling run. ``input_uri`` (prefix, directory or glob) or ``manifest_uri`` names the images."""

    output_uri: str
    vocabulary: Vocabulary
    model: ModelSource
    input_uri: str | None = None
    manifest_uri: str | None = None
    uri_column: str = "uri"
    run_id: str | None = None
    batch_size: int = 4
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_actors: int | None = None  # None: one per GPU, or 1 without GPUs
    cpus_per_actor: float = 1.0
    confidence: bool = False
    confidence_threshold: float | None = None
    limit: int | None = None
    rows_per_file: int = 256
    precision: str = "float32"  # "bfloat16"/"float16": autocast in the model stage (GPUs with tensor cores)

    def __post_init__(self) -> None:
        if (self.input_uri is None) == (self.manifest_uri is None):
            raise ValueError("give exactly one of an input URI or a manifest URI")
        for name in ("output_uri", "input_uri", "manifest_uri"):  # DIR and DIR/ are one run
            if getattr(self, name) is not None:
                object.__setattr__(self, name, storage.normalize_uri(getattr(self, name)))
        if self.max_actors is not None and self.max_actors < 1:
            raise ValueError(f"--max-actors must be at least 1, got {self.max_actors}")
        if self.cpus_per_actor <= 0 or (self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0):
            raise ValueError("--cpus-per-actor must be > 0 and --num-gpus-per-actor >= 0")
        if self.batch_size < 1 or self.rows_per_file < 1:
            raise ValueError("batch_size and rows_per_file must be at least 1")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must be >= 0")
        if self.precision not in catseg.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(catseg.PRECISIONS)}, got {self.precision!r}")

    def fingerprint(self) -> dict[str, Any]:
        """What decides the content of the rows: a resumed run must match it (limit and resources may change)."""
        return {
            "input_uri": self.input_uri,
            "manifest_uri": self.manifest_uri,
            "uri_column": self.uri_column if self.manifest_uri else None,
            "vocab_id": self.vocabulary.vocab_id,
            "model_id": self.model.model_id,
            "confidence": self.confidence,
            "confidence_threshold": self.confidence_threshold,
            # only when set, so that float32 run ids stay what they were before the option existed
            **({"precision": self.precision} if self.precision != "float32" else {}),
        }

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        digest = hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
        return f"run-{digest}"


@dataclass(frozen=True)
class Resources:
    num_gpus_per_actor: float
    max_actors: int
    cpus_per_actor: float

    @classmethod
    def for_cluster(cls, config: LabelConfig) -> Resources:
        num_gpus, max_actors = actor_resources(config.num_gpus_per_actor, config.max_actors)
        return cls(num_gpus, max_actors, config.cpus_per_actor)


def actor_resources(
    num_gpus_per_actor: float | None, max_actors: int | None, cluster_gpus: float | None = None
) -> tuple[float, int]:
    """(GPUs per model actor, max model actors) for the options left as None: 1 GPU per actor and one actor per
    GPU when the cluster has GPUs, else one CPU actor. ``cluster_gpus`` defaults to the connected cluster's."""
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if cluster_gpus else 0.0
        if not cluster_gpus and cluster.can_grow():
            # ray.cluster_resources() counts live nodes only: GPU workers scaled to zero look like no GPUs at all
            logger.warning(
                "the Ray cluster has no GPU now, so the model runs on CPU. On an autoscaling cluster whose GPU "
                "workers are at zero, pass --num-gpus-per-actor 1 and --max-actors N so that Ray starts them."
            )
    if max_actors is None:
        max_actors = max(1, int(cluster_gpus // num_gpus_per_actor)) if num_gpus_per_actor > 0 else 1
    return num_gpus_per_actor, max_actors


# -- inputs ---------------------------------------------------------------------------------------------------
def read_manifest_uris(manifest_uri: str, uri_column: str) -> list[str | None]:
    """The URI column of a Parquet / CSV / JSON-lines manifest; relative paths resolve against its folder."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(manifest_uri)
    lower = path.lower()
    with storage.access_errors("read", manifest_uri), fs.open(path, "rb") as f:
        if lower.endswith((".csv", ".tsv", ".csv.gz")):
            options = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
            table = pacsv.read_csv(f, parse_options=options)
        elif lower.endswith((".jsonl", ".json", ".ndjson")):
            table = pajson.read_json(f)
        else:
            table = pq.read_table(f)
    if uri_column not in table.column_names:
        raise ValueError(f"manifest {manifest_uri} has no column {uri_column!r}; columns: {table.column_names}")
    base = posixpath.dirname(manifest_uri.rstrip("/"))
    uris = []
    for value in table[uri_column].to_pylist():
        text = str(value).strip() if value is not None else ""
        if not text:
            uris.append(None)
        elif "://" in text or text.startswith("/"):
            uris.append(text)
        else:
            uris.append(storage.join(base, text))
    return uris


@dataclass
class InputPlan:
    uris: list[str]  # unique, in listing / manifest order, after --limit
    duplicates: int = 0
    blank: int = 0
    unreadable_names: list[str] = field(default_factory=list)  # not valid UTF-8, escaped (they get error rows)


def _is_utf8(uri: str) -> bool:
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:  # a local file name with bytes that are not UTF-8 (os gives surrogate escapes)
        return False
    return True


def plan_inputs(config: LabelConfig) -> InputPlan:
    skipped: Counter = Counter()
    if config.manifest_uri is not None:
        listed = read_manifest_uris(config.manifest_uri, config.uri_column)
    else:
        listed = storage.list_files(config.input_uri, storage.IMAGE_SUFFIXES, skipped)
    seen: set[str] = set()
    plan = InputPlan([])
    for uri in listed:
        if uri is None:
            plan.blank += 1
        elif uri in seen:
            plan.duplicates += 1
        elif not _is_utf8(uri):
            plan.unreadable_names.append(uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
        else:
            seen.add(uri)
            plan.uris.append(uri)
    if config.limit is not None:
        plan.uris = plan.uris[: config.limit]
    if not plan.uris and not plan.unreadable_names and config.limit != 0:
        where = config.input_uri or f"the {config.uri_column!r} column of {config.manifest_uri}"
        others = ", ".join(f"{ext} ({n})" for ext, n in skipped.most_common(8))
        raise NoInputsError(
            f"no images found in {where}"
            + (f"; skipped files with other extensions: {others}" if others else " (it holds no files)")
            + f". Images are files ending in {', '.join(storage.IMAGE_SUFFIXES)}"
        )
    return plan


class NoInputsError(FileNotFoundError):
    """The input names no image: refused before anything is written."""


# -- the pipeline ---------------------------------------------------------------------------------------------
def build_labelling_dataset(
    sources: list[tuple[str, str, str | None]], config: LabelConfig, run_id: str, resources: Resources
) -> ray.data.Dataset:
    """(image_id, source_uri, known error) -> the dataset of output rows (lazy; nothing runs until written)."""
    rows_per_block = config.batch_size  # small blocks keep every stage streaming
    blocks = [
        pa.table(
            {
                "image_id": [s[0] for s in sources[start : start + rows_per_block]],
                "source_uri": [s[1] for s in sources[start : start + rows_per_block]],
                "error": [s[2] for s in sources[start : start + rows_per_block]],
            },
            schema=SOURCE_SCHEMA,
        )
        for start in range(0, len(sources), rows_per_block)
    ]
    names = list(config.vocabulary.names)
    return (
        ray.data.from_arrow(blocks)
        .map_batches(read_image_bytes, batch_format="pyarrow", batch_size=config.batch_size, num_cpus=READ_CPUS)
        .map_batches(decode_images, batch_format="pyarrow", batch_size=config.batch_size, num_cpus=DECODE_CPUS)
        .map_batches(
            SegmentationModel,
            fn_constructor_kwargs={
                "model_uri": config.model.uri,
                "class_names": names,
                "cpu_threads": max(1, math.ceil(resources.cpus_per_actor)),
                "precision": config.precision,
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=resources.max_actors),
            num_gpus=resources.num_gpus_per_actor,
            num_cpus=resources.cpus_per_actor,
            batch_size=config.batch_size,
            batch_format="pyarrow",
            **cpu_worker_remote_args(resources.num_gpus_per_actor),
        )
        .map_batches(
            encode_predictions,
            fn_kwargs={
                "class_names": names,
                "run_id": run_id,
                "model_id": config.model.model_id,
                "vocab_id": config.vocabulary.vocab_id,
                "with_confidence": config.confidence,
                "confidence_threshold": config.confidence_threshold,
            },
            batch_format="pyarrow",
            batch_size=config.batch_size,
            num_cpus=ENCODE_CPUS,
        )
    )


@dataclass
class RunSummary:
    run_id: str
    output_uri: str
    inputs: int  # unique input images of this run
    skipped: int  # already labelled by an earlier attempt
    processed: int  # labelled (or failed) by this attempt
    ok: int  # rows with a mask in the whole output
    errors: int  # rows with an error in the whole output
    missing: int  # inputs without a row (0 after a successful run)
    seconds: float
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_resumable(existing: dict[str, Any] | None, config: LabelConfig, run_id: str, output_uri: str) -> None:
    if existing is None:
        return
    if existing.get("run_id") != run_id:
        vocabulary, model = existing.get("vocabulary", {}).get("source"), existing.get("model", {}).get("id")
        raise OutputConflictError(
            f"{output_uri} already holds run {existing.get('run_id')!r} (vocabulary {vocabulary}, model {model}); "
            f"pass --run-id {existing.get('run_id')} with that run's options to resume it, or choose another --output"
        )
    before, now = existing.get("fingerprint", {}), config.fingerprint()
    changed = sorted(k for k in now if before.get(k) != now[k])
    if changed:
        raise OutputConflictError(
            f"run {run_id!r} in {output_uri} was started with other settings ({', '.join(changed)} differ); "
            "resume it with the same options, or start a new run in another --output"
        )


def run_labelling(config: LabelConfig) -> RunSummary:
    """Label every input image not yet in the output; write the rows and the run manifest; return a summary."""
    # every check that needs no cluster first: a mistake costs seconds and writes nothing
    plan = plan_inputs(config)
    storage.check_writable(config.output_uri)
    run_id = config.resolved_run_id()
    existing = read_manifest(config.output_uri)
    _check_resumable(existing, config, run_id, config.output_uri)
    cluster.connect()
    resources = Resources.for_cluster(config)
    cluster.require_node(
        resources.cpus_per_actor,
        resources.num_gpus_per_actor,
        "a model actor",
        "lower --cpus-per-actor / --num-gpus-per-actor",
        reserve_cpus=READ_CPUS + DECODE_CPUS + ENCODE_CPUS + WRITE_CPUS,
    )
    done = committed_image_ids(config.output_uri, run_id)
    sources = [(image_id_for(uri), uri, None) for uri in plan.uris]
    sources += [(image_id_for(name), name, BAD_NAME_ERROR) for name in plan.unreadable_names]
    todo = [source for source in sources if source[0] not in done]
    num_classes = len(config.vocabulary)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "status": "running",
        "created_at": (existing or {}).get("created_at", _now()),
        "updated_at": _now(),
        "layout": {"data": "data/*.parquet", "table": "one row per input image"},
        "fingerprint": config.fingerprint(),
        "input": {
            "uri": config.input_uri,
            "manifest": config.manifest_uri,
            "uri_column": config.uri_column,
            "limit": config.limit,
        },
        "vocabulary": {
            "vocab_id": config.vocabulary.vocab_id,
            "source": config.vocabulary.source,
            "names": list(config.vocabulary.names),
        },
        "model": {"id": config.model.model_id, "uri": config.model.uri},
        "config": {
            "batch_size": config.batch_size,
            "confidence": config.confidence,
            "confidence_threshold": config.confidence_threshold,
            "mask_bits": 8 * mask_dtype(num_classes).itemsize,
            "unlabelled_value": unlabelled_value_for(num_classes),
            "rows_per_file": config.rows_per_file,
            **asdict(resources),
        },
        "counts": (existing or {}).get("counts", {}),
        "attempts": (existing or {}).get("attempts", []),
    }
    write_manifest(config.output_uri, manifest)  # written first: a crashed run is identifiable and resumable

    started = time.perf_counter()
    if todo:
        fs, path = arrow_filesystem(data_uri(config.output_uri))
        build_labelling_dataset(todo, config, run_id, resources).write_parquet(
            path,
            filesystem=fs,
            min_rows_per_file=config.rows_per_file,
            ray_remote_args={"num_cpus": WRITE_CPUS},
            schema=OUTPUT_SCHEMA,
        )
    seconds = time.perf_counter() - started

    present, ok, errors = count_rows(config.output_uri)
    missing = sum(1 for image_id, _, _ in sources if image_id not in present)
    manifest["status"] = "complete" if missing == 0 else "incomplete"
    manifest["updated_at"] = _now()
    manifest["counts"] = {
        "inputs": len(sources),
        "ok": ok,
        "error": errors,
        "missing": missing,
        "duplicate_inputs": plan.duplicates,
        "blank_manifest_rows": plan.blank,
    }
    manifest["attempts"].append(
        {"finished_at": _now(), "processed": len(todo), "skipped": len(sources) - len(todo), "seconds": seconds}
    )
    write_manifest(config.output_uri, manifest)
    return RunSummary(
        run_id=run_id,
        output_uri=config.output_uri,
        inputs=len(sources),
        skipped=len(sources) - len(todo),
        processed=len(todo),
        ok=ok,
        errors=errors,
        missing=missing,
        seconds=seconds,
        resources=asdict(resources),
    )
