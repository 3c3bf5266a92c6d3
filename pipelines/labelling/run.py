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

Inputs are planned on the cluster (:mod:`pipelines.labelling.plan`): the listing or manifest, minus the images
this run has already committed, becomes ``<output>/_inputs/todo/*.parquet``, the chain's streaming source; the
driver only holds counts. Blocks of ``rows_per_file`` rows flow from read to write (each read call fetches
:data:`IO_ROWS` objects concurrently); the decode and model stages work ``batch_size`` rows at a time.

Resume and healing: each run has a ``run_id`` (by default a hash of input, vocabulary, model and result-affecting
options). Re-running the same command labels what is missing, and again the error rows worth retrying
(``retry_errors``: ``transient`` by default, e.g. a read that failed); a retried image's old row is removed from
its file before it is labelled again, so the output never holds two rows for one image.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.data.datasource import FilenameProvider

from pipelines import cluster, storage
from pipelines.label_output import (
    OUTPUT_SCHEMA,
    LabelOutput,
    OutputConflictError,
    finish_run_manifest,
    start_run_manifest,
)
from pipelines.labelling.config import LabelConfig
from pipelines.labelling.lease import OutputLease
from pipelines.labelling.plan import InputPlan, TodoDatasource, count_attempt_rows, new_attempt_id, plan_inputs
from pipelines.labelling.sources import NoInputsError, check_source
from pipelines.labelling.stages import (
    PERMANENT,
    SOURCE_SCHEMA,
    TRANSIENT,
    decode_images,
    encode_predictions,
    read_image_bytes,
)
from pipelines.model_stage import InFlightImages, SegmentationModel
from pipelines.workers import ModelActors

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

# Fractional CPUs so read, decode, model, encode and write operators all fit on a small machine at once.
READ_CPUS, DECODE_CPUS, ENCODE_CPUS, WRITE_CPUS = 0.25, 0.25, 0.25, 0.25
IO_ROWS = 32  # rows per read call (its objects fetched concurrently): per-call overhead is small against them
# s3fs / botocore / aiohttp spellings of errors a retried write can cure (Ray Data's defaults are pyarrow's)
RETRIED_WRITE_ERRORS = (
    "Service Unavailable", "SlowDown", "reduce your request rate", "Connection reset", "ConnectionClosedError",
    "EndpointConnectionError", "ReadTimeoutError", "Server disconnected", "InternalError",
)  # fmt: skip


# -- the pipeline ---------------------------------------------------------------------------------------------
class _AttemptFiles(FilenameProvider):
    """Output files named by the attempt that wrote them, so its rows can be counted after the write."""

    def __init__(self, attempt_id: str) -> None:
        super().__init__(file_format="parquet")
        self.attempt_id = attempt_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.attempt_id}-{write_uuid}-{task_index:06d}.parquet"


def label_images(
    todo_files: list[tuple[str, int]],
    config: LabelConfig,
    run_id: str,
    actors: ModelActors,
    attempt_id: str,
    output: LabelOutput,
) -> None:
    """The labelling chain: to-do rows (image_id, source_uri, known error) -> read -> decode -> model -> encode
    -> Parquet files under ``<output>/data/`` (each file commits its rows; see :mod:`pipelines.label_output`)."""
    names = list(config.vocabulary.names)
    # Blocks of rows_per_file rows (the to-do files' row groups) from read to write: a file commits per block, and
    # per-block overhead (tens of ms over the stages) stays small against the rows even when every row is an
    # error. Ray splits blocks that outgrow its block size (read bytes, decoded pixels) inside their task.
    block_rows = config.block_rows
    blocks = sum(groups for _, groups in todo_files)
    fs, path = output.arrow_data_filesystem()
    context = ray.data.DataContext.get_current()
    with warnings.catch_warnings():
        # Ray 2.60 warns on any custom value that its matching will go from substrings to regexes; ours are plain
        # words, the same pattern either way (tests/test_ray_api_usage.py checks), so that notice is not ours.
        warnings.filterwarnings("ignore", "`retried_io_errors` using substring matching", DeprecationWarning)
        context.retried_io_errors = list(dict.fromkeys([*context.retried_io_errors, *RETRIED_WRITE_ERRORS]))
    in_flight = InFlightImages.remote()  # counts model worker deaths per image (Ray Data retries them forever)
    (
        ray.data.read_datasource(
            TodoDatasource(output.inputs_uri, todo_files, block_rows, SOURCE_SCHEMA),
            override_num_blocks=blocks,
            num_cpus=READ_CPUS,  # a fraction of a CPU, like the other CPU stages
        )
        .map_batches(read_image_bytes, batch_format="pyarrow", batch_size=min(IO_ROWS, block_rows), num_cpus=READ_CPUS)
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
                "in_flight": in_flight,
                "low_confidence_below": config.review_threshold,
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
            ray_remote_args={"num_cpus": WRITE_CPUS},  # write_parquet's only way in Ray 2.60 (not deprecated there)
            schema=OUTPUT_SCHEMA,
            filename_provider=_AttemptFiles(attempt_id),
        )
    )


@dataclass
class RunSummary:
    run_id: str
    output_uri: str
    inputs: int  # unique input images of this run
    skipped: int  # already labelled by an earlier attempt (and not retried)
    processed: int  # labelled (or failed) by this attempt, retried error rows included
    retried: int  # error rows of earlier attempts labelled again by this one
    ok: int  # rows with a mask in the whole output
    transient_errors: int  # error rows a re-run retries (read failures, out of memory)
    permanent_errors: int  # error rows a re-run keeps (bad bytes, oversize images), unless --retry-errors all
    missing: int  # inputs without a row (0 after a successful run)
    seconds: float  # labelling, after planning
    planning_seconds: float = 0.0
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.transient_errors + self.permanent_errors

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def healed(self) -> bool:
        """Nothing left that re-running the same command could still improve."""
        return self.missing == 0 and self.transient_errors == 0


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


def _no_inputs_error(config: LabelConfig, plan: InputPlan) -> NoInputsError:
    where = config.input_uri or f"the {config.uri_column!r} column of {config.manifest_uri}"
    others = ", ".join(f"{ext} ({n})" for ext, n in list(plan.skipped_extensions.items())[:8])
    detail = f"; skipped files with other extensions: {others}" if others else ""
    if not others and config.manifest_uri is not None:
        detail = f" (it has {plan.blank} blank rows)" if plan.blank else " (it has no rows)"
    elif not others:
        detail = " (it holds no files)"
    return NoInputsError(
        f"no images found in {where}{detail}. Images are files ending in {', '.join(storage.IMAGE_SUFFIXES)}"
    )


def _remove_empty_output(output: LabelOutput) -> None:
    """The output folder this run created, if the run left nothing in it (a refusal), lease released."""
    if output.fs.isdir(output.root) and not output.fs.ls(output.root):
        output.fs.rmdir(output.root)


def run_labelling(config: LabelConfig) -> RunSummary:
    """Label every input image not yet in the output (and the error rows to retry); write the rows and the run
    manifest; return a summary. One attempt at a time per output (:class:`~pipelines.labelling.lease.OutputLease`):
    a second one is refused before it plans or writes anything."""
    # every check that needs no cluster first: a mistake costs seconds and writes nothing
    check_source(config.input_uri, config.manifest_uri, config.uri_column)
    output = LabelOutput(config.output_uri)
    created = not output.fs.exists(output.root)
    storage.check_writable(output.uri)
    try:
        with OutputLease(output.uri) as lease:  # a lost lease ends the block in LeaseLostError
            return _run_holding_lease(config, output, lease)
    finally:  # after the release: the lease file is gone, so a refused run's folder is empty
        if created:
            _remove_empty_output(output)


def _run_holding_lease(config: LabelConfig, output: LabelOutput, lease: OutputLease) -> RunSummary:
    run_id = config.resolved_run_id()
    existing = output.read_manifest()
    _check_resumable(existing, config, run_id, output.uri)
    cluster.connect()
    resources = ModelActors.plan(
        config.num_gpus_per_actor,
        config.max_actors,
        config.cpus_per_actor,
        reserve_cpus=READ_CPUS + DECODE_CPUS + ENCODE_CPUS + WRITE_CPUS,
    )
    planning_started = time.perf_counter()
    plan = plan_inputs(
        output=output,
        run_id=run_id,
        input_uri=config.input_uri,
        manifest_uri=config.manifest_uri,
        uri_column=config.uri_column,
        limit=config.limit,
        retry_errors=config.retry_errors,
        conflict=OutputConflictError,
        block_rows=config.block_rows,  # label_images reads one row group per block
    )
    planning_seconds = time.perf_counter() - planning_started
    if plan.inputs == 0 and config.limit != 0:
        output.remove_inputs_plan()
        raise _no_inputs_error(config, plan)
    manifest = start_run_manifest(existing, run_id, config.fingerprint(), config.describe(asdict(resources)))
    output.write_manifest(manifest)  # written first: a crashed run is identifiable and resumable

    attempt_id = new_attempt_id()
    started = time.perf_counter()
    if plan.todo:
        with cluster.CapacityWatch(  # lost capacity ends the block in CapacityLostError
            "a model actor",
            resources.cpus_per_actor,
            resources.num_gpus_per_actor,
            progress=lambda: f"{output.committed_rows_named(attempt_id)} rows committed by this attempt",
        ):
            label_images(plan.todo_files, config, run_id, resources, attempt_id, output)
    seconds = time.perf_counter() - started

    lease.check()  # an attempt that lost its lease leaves the manifest to the one that holds it
    written = count_attempt_rows(output, attempt_id) if plan.todo else {}
    before = plan.committed
    ok = before.get("ok", 0) + written.get("ok", 0)
    transient, permanent = (
        before.get(kind, 0) - plan.retry.get(kind, 0) + written.get(kind, 0) for kind in (TRANSIENT, PERMANENT)
    )
    missing = max(0, plan.todo - sum(written.values()))
    counts = {"inputs": plan.inputs, "ok": ok, "error": transient + permanent, "error_transient": transient,
              "error_permanent": permanent, "missing": missing, "duplicate_inputs": plan.duplicates,
              "blank_manifest_rows": plan.blank}  # fmt: skip
    attempt = {"attempt_id": attempt_id, "processed": plan.todo, "skipped": plan.skipped,
               "retried": sum(plan.retry.values()), "retried_by_kind": plan.retry, "seconds": round(seconds, 3),
               "planning_seconds": round(planning_seconds, 3)}  # fmt: skip
    finish_run_manifest(manifest, counts, attempt)
    output.write_manifest(manifest)
    return RunSummary(
        run_id=run_id,
        output_uri=output.uri,
        inputs=plan.inputs,
        skipped=plan.skipped,
        processed=plan.todo,
        retried=sum(plan.retry.values()),
        ok=ok,
        transient_errors=transient,
        permanent_errors=permanent,
        missing=missing,
        seconds=seconds,
        planning_seconds=planning_seconds,
        resources=asdict(resources),
    )
