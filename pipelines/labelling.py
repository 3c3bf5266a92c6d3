"""Bulk labelling on Ray Data: image URIs in, one Parquet row per image out (see :func:`label_images`).

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
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

import catseg

from . import cluster, storage
from .images import DEFAULT_MAX_PIXELS
from .masks import mask_dtype
from .masks import unlabelled_value as unlabelled_value_for
from .model_stage import SegmentationModel
from .models import ModelSource
from .output import (
    OUTPUT_SCHEMA,
    OutputConflictError,
    arrow_filesystem,
    committed_image_ids,
    count_rows,
    data_uri,
    finish_run_manifest,
    read_manifest,
    start_run_manifest,
    write_manifest,
)
from .stages import SOURCE_SCHEMA, decode_images, encode_predictions, read_image_bytes
from .workers import ModelActors

if TYPE_CHECKING:
    from .vocabulary import Vocabulary

logger = logging.getLogger(__name__)

# Fractional CPUs so read, decode, model, encode and write operators all fit on a small machine at once.
READ_CPUS, DECODE_CPUS, ENCODE_CPUS, WRITE_CPUS = 0.25, 0.25, 0.25, 0.25
BAD_NAME_ERROR = "input: the file name is not valid UTF-8 (shown escaped); rename the file to read it"


def image_id_for(uri: str) -> str:
    """Stable id of an input image: a hash of its source URI (the key for resume and dedup)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images become error rows; None: Pillow's bomb limit only

    def __post_init__(self) -> None:
        if (self.input_uri is None) == (self.manifest_uri is None):
            raise ValueError("give exactly one of an input URI or a manifest URI")
        for name in ("output_uri", "input_uri", "manifest_uri"):  # DIR and DIR/ are one run
            if getattr(self, name) is not None:
                object.__setattr__(self, name, storage.normalize_uri(getattr(self, name)))
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be at least 1, got {self.max_pixels}")
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
            **({"max_pixels": self.max_pixels} if self.max_pixels != DEFAULT_MAX_PIXELS else {}),
        }

    def describe(self, resources: dict[str, Any]) -> dict[str, Any]:
        """The run manifest's input, vocabulary, model and config sections (``resources``: the actor pool)."""
        num_classes = len(self.vocabulary)
        return {
            "input": {"uri": self.input_uri, "manifest": self.manifest_uri, "uri_column": self.uri_column,
                      "limit": self.limit},
            "vocabulary": {"vocab_id": self.vocabulary.vocab_id, "source": self.vocabulary.source,
                           "names": list(self.vocabulary.names)},
            "model": {"id": self.model.model_id, "uri": self.model.uri},
            "config": {"batch_size": self.batch_size, "confidence": self.confidence,
                       "confidence_threshold": self.confidence_threshold,
                       "mask_bits": 8 * mask_dtype(num_classes).itemsize,
                       "unlabelled_value": unlabelled_value_for(num_classes), "rows_per_file": self.rows_per_file,
                       **resources},
        }  # fmt: skip

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        digest = hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
        return f"run-{digest}"


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
def label_images(
    sources: list[tuple[str, str, str | None]], config: LabelConfig, run_id: str, actors: ModelActors
) -> None:
    """The labelling chain: (image_id, source_uri, known error) rows -> read -> decode -> model -> encode ->
    Parquet files under ``<output>/data/`` (each file commits its rows; see :mod:`pipelines.output`)."""
    rows_per_block = config.batch_size  # small blocks keep every stage streaming
    blocks = []
    for start in range(0, len(sources), rows_per_block):
        chunk = sources[start : start + rows_per_block]
        columns = {name: [row[i] for row in chunk] for i, name in enumerate(SOURCE_SCHEMA.names)}
        blocks.append(pa.table(columns, schema=SOURCE_SCHEMA))
    names = list(config.vocabulary.names)
    fs, path = arrow_filesystem(data_uri(config.output_uri))
    (
        ray.data.from_arrow(blocks)
        .map_batches(read_image_bytes, batch_format="pyarrow", batch_size=config.batch_size, num_cpus=READ_CPUS)
        .map_batches(
            decode_images,
            fn_kwargs={"max_pixels": config.max_pixels},
            batch_format="pyarrow",
            batch_size=config.batch_size,
            num_cpus=DECODE_CPUS,
        )
        .map_batches(
            SegmentationModel,
            fn_constructor_kwargs={
                "model_uri": config.model.uri,
                "class_names": names,
                "cpu_threads": actors.torch_threads,
                "precision": config.precision,
            },
            batch_size=config.batch_size,
            batch_format="pyarrow",
            **actors.map_batches_args(),
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
        .write_parquet(
            path,
            filesystem=fs,
            min_rows_per_file=config.rows_per_file,
            ray_remote_args={"num_cpus": WRITE_CPUS},
            schema=OUTPUT_SCHEMA,
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
    resources = ModelActors.plan(
        config.num_gpus_per_actor,
        config.max_actors,
        config.cpus_per_actor,
        reserve_cpus=READ_CPUS + DECODE_CPUS + ENCODE_CPUS + WRITE_CPUS,
    )
    done = committed_image_ids(config.output_uri, run_id)
    sources = [(image_id_for(uri), uri, None) for uri in plan.uris]
    sources += [(image_id_for(name), name, BAD_NAME_ERROR) for name in plan.unreadable_names]
    todo = [source for source in sources if source[0] not in done]
    manifest = start_run_manifest(existing, run_id, config.fingerprint(), config.describe(asdict(resources)))
    write_manifest(config.output_uri, manifest)  # written first: a crashed run is identifiable and resumable

    started = time.perf_counter()
    if todo:
        label_images(todo, config, run_id, resources)
    seconds = time.perf_counter() - started

    present, ok, errors = count_rows(config.output_uri)
    missing = sum(1 for image_id, _, _ in sources if image_id not in present)
    counts = {"inputs": len(sources), "ok": ok, "error": errors, "missing": missing,
              "duplicate_inputs": plan.duplicates, "blank_manifest_rows": plan.blank}  # fmt: skip
    attempt = {"processed": len(todo), "skipped": len(sources) - len(todo), "seconds": seconds}
    finish_run_manifest(manifest, counts, attempt)
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
