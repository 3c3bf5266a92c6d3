"""A labelling run's input plan, computed on the cluster: the driver holds counts, never a row per image.

    sources    (pipelines.labelling.sources) list the prefix (a task for its top level, then tasks over groups
               of its sub-folders) or read the manifest (a task per manifest file, streamed in batches); each URI
               is hashed to its image_id and the rows go to <output>/_inputs/sources/b=NN/ by the id's bucket
               (the id's first hex digits)
    committed  tasks over groups of the committed output files read their image_id and error columns (footers
               checked concurrently; half-written files deleted), bucketed the same way into committed/b=NN/
    join       tasks over ranges of buckets: duplicate inputs dropped, images already committed kept out
               unless their row is an error to retry (--retry-errors); the rest go to todo/*.parquet, the rows
               to retry to retry/f=MM/ (grouped by the output file that holds them)
    supersede  a task per group of output files: each file holding a row to retry is replaced in one step by
               the same file without it, before the image is labelled again: never two rows for one image

Each task holds a few buckets (at most ROWS_PER_JOIN_TASK rows) or one chunk of a listing or manifest, so its
memory is bounded, and the driver's does not grow with the lake. The labelling reads ``todo/`` as a streaming
source. Every attempt plans afresh (the listing may have changed); the last plan stays under ``_inputs/``.
Ray Data's own ``join`` would do the anti-join through hash-shuffle aggregator actors (and polars); plain tasks
over hash buckets need only CPUs and pyarrow, and show their memory bound in the code.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines import storage
from pipelines.label_output import LabelOutput, is_committed, replace_file
from pipelines.labelling.buckets import (
    BUCKETS,
    ORDER_SHIFT,
    PLAN_CPUS,
    PLAN_SCHEMA,
    BucketWriter,
    chunked,
    raise_failures,
    read_tables,
    write_table,
)
from pipelines.labelling.buckets import failure as task_failure
from pipelines.labelling.sources import list_sources
from pipelines.rows import PERMANENT, TRANSIENT

logger = logging.getLogger(__name__)

FILE_GROUPS = 16  # output files to rewrite, grouped by a hash of their name
FILES_PER_SCAN_TASK = 256  # committed output files per scan task
TODO_ROWS_PER_FILE = 2048  # rows per to-do file; its row groups are the labelling's blocks
ROWS_PER_JOIN_TASK = 250_000  # inputs plus committed rows per join task (a range of buckets)
RETRY_POLICIES = {"transient": (TRANSIENT,), "all": (TRANSIENT, PERMANENT), "none": ()}

COMMITTED_SCHEMA = pa.schema([("image_id", pa.string()), ("state", pa.string()), ("file", pa.string())])
OK = "ok"  # the state of a committed row without an error (else its error_kind)


# -- planning tasks -------------------------------------------------------------------------------------------


def _state_of(error: str | None, kind: str | None) -> str:
    if error is None:
        return OK
    if kind in (TRANSIENT, PERMANENT):
        return kind
    return TRANSIENT if error.startswith("read:") else PERMANENT  # rows written before error_kind existed


@ray.remote(num_cpus=PLAN_CPUS)
def _scan_committed(files: list[str], data_root: str, plan_root: str | None, task: int) -> dict[str, Any]:
    """Read the id and error columns of committed output files; bucket them under ``committed/`` (when
    ``plan_root`` is given) and count rows per state and the run ids seen. Half-written files are deleted."""
    try:
        fs, _ = storage.filesystem(data_root)
        writer = BucketWriter(plan_root, "committed", f"scan{task:05d}", COMMITTED_SCHEMA) if plan_root else None

        def read(path: str) -> pa.Table | None:
            if not is_committed(fs, path):
                logger.warning("removing incomplete output file %s", path)
                fs.rm(path)
                return None
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                names = [n for n in ("image_id", "run_id", "error", "error_kind") if n in parquet.schema_arrow.names]
                return parquet.read(columns=names)

        states: Counter = Counter()
        run_ids: set[str] = set()
        removed = 0
        with ThreadPoolExecutor(max_workers=8) as pool:
            for path, table in zip(files, pool.map(read, files), strict=True):
                if table is None:
                    removed += 1
                    continue
                run_ids.update(pc.unique(table["run_id"]).to_pylist())
                kinds = table["error_kind"].to_pylist() if "error_kind" in table.column_names else None
                name = posixpath.basename(path)
                for i, (image_id, error) in enumerate(
                    zip(table["image_id"].to_pylist(), table["error"].to_pylist(), strict=True)
                ):
                    state = _state_of(error, kinds[i] if kinds else None)
                    states[state] += 1
                    if writer is not None:
                        writer.add(image_id=image_id, state=state, file=name)
        if writer is not None:
            writer.flush()
        return {"states": dict(states), "run_ids": sorted(run_ids), "removed_incomplete": removed}
    except Exception as err:
        return task_failure(err)


def _first_of_each_id(table: pa.Table) -> tuple[pa.Table, int]:
    """The rows with the smallest order of each image_id, and how many duplicates were dropped."""
    if table.num_rows < 2:
        return table, 0
    table = table.sort_by([("image_id", "ascending"), ("order", "ascending")])
    ids = table["image_id"]
    first = np.ones(table.num_rows, dtype=bool)
    first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    kept = table.filter(pa.array(first))
    return kept, table.num_rows - kept.num_rows


def _join_bucket(
    plan_root: str, bucket: int, cutoff: int | None, retry_states: tuple[str, ...]
) -> tuple[pa.Table, int, int, pa.Table]:
    """Inputs of one bucket minus what is committed (unless it is an error to retry): (to-do rows, inputs,
    duplicates, the committed rows to supersede)."""
    name = f"b={bucket:02d}"
    sources = read_tables(storage.join(plan_root, "sources", name), PLAN_SCHEMA)
    if cutoff is not None:
        sources = sources.filter(pc.less(sources["order"], cutoff))
    sources, duplicates = _first_of_each_id(sources)
    committed = read_tables(storage.join(plan_root, "committed", name), COMMITTED_SCHEMA)
    to_retry = pc.is_in(committed["state"], pa.array(list(retry_states), pa.string()))
    kept = committed.filter(pc.invert(to_retry)).select(["image_id"])
    todo = sources.join(kept, "image_id", join_type="left anti")
    retry = committed.filter(to_retry).join(sources.select(["image_id"]), "image_id", join_type="left semi")
    return todo, sources.num_rows, duplicates, retry


@ray.remote(num_cpus=PLAN_CPUS)
def _join_buckets(
    plan_root: str,
    buckets: list[int],
    cutoff: int | None,
    retry_states: tuple[str, ...],
    block_rows: int,
    task: int,
) -> dict[str, Any]:
    """A range of buckets: their to-do files, and the rows to supersede grouped by the file that holds them."""
    try:
        fs, root = storage.filesystem(plan_root)
        todo_tables, inputs, duplicates, retried = [], 0, 0, Counter()
        groups_seen: set[int] = set()
        for bucket in buckets:
            todo, bucket_inputs, bucket_duplicates, retry = _join_bucket(plan_root, bucket, cutoff, retry_states)
            todo_tables.append(todo)
            inputs, duplicates = inputs + bucket_inputs, duplicates + bucket_duplicates
            retried.update(retry["state"].to_pylist())
            groups = np.array([zlib.crc32(f.encode()) % FILE_GROUPS for f in retry["file"].to_pylist()], np.int16)
            for group in np.unique(groups):
                part = retry.filter(pa.array(groups == group)).select(["file", "image_id"])
                write_table(fs, posixpath.join(root, "retry", f"f={group:02d}", f"b={bucket:02d}"), part)
                groups_seen.add(int(group))
        todo = pa.concat_tables(todo_tables).sort_by("order").drop_columns(["order"])
        todo_files, file_rows = [], max(block_rows, TODO_ROWS_PER_FILE // block_rows * block_rows)
        for start in range(0, todo.num_rows, file_rows):
            path = posixpath.join(root, "todo", f"part-{task:02d}-{start // file_rows:05d}")
            rows = todo.slice(start, file_rows)
            write_table(fs, path, rows, row_group_rows=block_rows)  # a row group is one block of the labelling
            todo_files.append((path + ".parquet", -(-rows.num_rows // block_rows)))
        return {
            "inputs": inputs,
            "duplicates": duplicates,
            "todo": todo.num_rows,
            "retry": dict(retried),
            "todo_files": todo_files,
            "retry_groups": sorted(groups_seen),
        }
    except Exception as err:
        return task_failure(err)


@ray.remote(num_cpus=PLAN_CPUS)
def _supersede(plan_root: str, data_root: str, group: int) -> dict[str, Any]:
    """Rewrite the output files of one group without the rows that this attempt labels again."""
    try:
        retry = read_tables(
            storage.join(plan_root, "retry", f"f={group:02d}"),
            pa.schema([("file", pa.string()), ("image_id", pa.string())]),
        )
        fs, root = storage.filesystem(data_root)
        rewritten = deleted = rows = 0
        for name in pc.unique(retry["file"]).to_pylist():
            ids = retry.filter(pc.equal(retry["file"], name))["image_id"]
            path = posixpath.join(root, name)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            keep = pc.invert(pc.is_in(table["image_id"], ids))
            remaining = table.filter(keep)
            rows += table.num_rows - remaining.num_rows
            if remaining.num_rows == 0:
                fs.rm(path)
                deleted += 1
            elif remaining.num_rows < table.num_rows:
                replace_file(fs, path, remaining)
                rewritten += 1
        return {"rewritten": rewritten, "deleted": deleted, "rows": rows}
    except Exception as err:
        return task_failure(err)


# -- the driver's side ----------------------------------------------------------------------------------------
@dataclass
class InputPlan:
    """What an attempt will do, as counts; the rows themselves are in ``todo_files`` (Parquet: image_id,
    source_uri, error, error_kind), one path per few thousand images."""

    inputs: int = 0  # unique input images (after --limit)
    duplicates: int = 0
    blank: int = 0  # blank manifest rows
    skipped_extensions: dict[str, int] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)  # rows of the output before the attempt, per state
    retry: dict[str, int] = field(default_factory=dict)  # committed error rows labelled again, per kind
    todo: int = 0
    todo_files: list[tuple[str, int]] = field(default_factory=list)  # (path in the output's filesystem, row groups)
    superseded_rows: int = 0
    removed_incomplete: int = 0

    @property
    def skipped(self) -> int:
        """Inputs already labelled and kept as they are."""
        return self.inputs - self.todo


def _cutoff(chunk_rows: list[tuple[int, int]], limit: int | None) -> int | None:
    """The order below which the first ``limit`` source rows lie (chunks in order), or None for all."""
    if limit is None:
        return None
    remaining = limit
    for chunk, rows in sorted(chunk_rows):
        if rows >= remaining:
            return (chunk << ORDER_SHIFT) | remaining
        remaining -= rows
    return None


def plan_inputs(
    *,
    output: LabelOutput,
    run_id: str,
    input_uri: str | None,
    manifest_uri: str | None,
    uri_column: str,
    limit: int | None,
    retry_errors: str,
    conflict: type[Exception],
    block_rows: int = 256,
) -> InputPlan:
    """Plan an attempt on the connected cluster: list or read the inputs, subtract what is committed, supersede
    the rows to retry. ``conflict`` is raised when the output holds rows of another run. The to-do files are
    written in row groups of ``block_rows`` rows: the labelling's blocks (:class:`TodoDatasource`)."""
    output.remove_inputs_plan()  # the previous attempt's plan: the inputs may have changed since
    plan_root, data_root = output.inputs_uri, output.data_uri
    fs, root = output.fs, output.inputs_root

    committed_scan = _start_committed_scan(output, plan_root)
    sources = list_sources(plan_root, input_uri, manifest_uri, uri_column)
    scans = ray.get(committed_scan)
    raise_failures(scans)

    plan = InputPlan()
    skipped: Counter = Counter()
    for result in sources:
        plan.blank += result["blank"]
        skipped.update(result["skipped"])
    plan.skipped_extensions = dict(skipped.most_common())
    committed: Counter = Counter()
    run_ids: set[str] = set()
    for scan in scans:
        committed.update(scan["states"])
        run_ids.update(scan["run_ids"])
        plan.removed_incomplete += scan["removed_incomplete"]
    plan.committed = dict(committed)
    other_runs = sorted(run_ids - {run_id})
    if other_runs:
        raise conflict(
            f"{output.uri} already holds labels of run(s) {other_runs}; "
            f"pass --run-id {other_runs[0]} to resume that run, or choose another --output"
        )

    cutoff = _cutoff([(r["chunk"], r["rows"]) for r in sources], limit)
    listed = sum(r["rows"] for r in sources) + sum(sum(scan["states"].values()) for scan in scans)
    tasks = min(BUCKETS, max(1, -(-listed // ROWS_PER_JOIN_TASK)))  # small inputs: one task, not 64
    bucket_ranges = chunked(list(range(BUCKETS)), tasks)
    joins = ray.get([
        _join_buckets.remote(plan_root, buckets, cutoff, RETRY_POLICIES[retry_errors], block_rows, task)
        for task, buckets in enumerate(bucket_ranges)
    ])  # fmt: skip
    raise_failures(joins)
    retry: Counter = Counter()
    groups: set[int] = set()
    for result in joins:
        plan.inputs += result["inputs"]
        plan.duplicates += result["duplicates"]
        plan.todo += result["todo"]
        retry.update(result["retry"])
        groups.update(result["retry_groups"])
        plan.todo_files += result["todo_files"]
    plan.retry = dict(retry)
    if groups:
        superseded = ray.get([_supersede.remote(plan_root, data_root, group) for group in sorted(groups)])
        raise_failures(superseded)
        plan.superseded_rows = sum(s["rows"] for s in superseded)
    for transient in ("committed", "retry"):
        with_path = posixpath.join(root, transient)
        if fs.exists(with_path):
            fs.rm(with_path, recursive=True)
    return plan


def _start_committed_scan(output: LabelOutput, plan_root: str | None, names_start: str = "") -> list[ray.ObjectRef]:
    """Scan tasks over the output's data files (all, or those whose name starts with ``names_start``)."""
    files = [path for path in output.data_files() if posixpath.basename(path).startswith(names_start)]
    groups = [files[i : i + FILES_PER_SCAN_TASK] for i in range(0, len(files), FILES_PER_SCAN_TASK)]
    return [_scan_committed.remote(group, output.data_uri, plan_root, i) for i, group in enumerate(groups)]


def count_attempt_rows(output: LabelOutput, attempt_id: str) -> dict[str, int]:
    """Rows per state (ok / transient / permanent) in the files this attempt wrote (named by its id)."""
    scans = ray.get(_start_committed_scan(output, None, names_start=attempt_id))
    raise_failures(scans)
    states: Counter = Counter()
    for scan in scans:
        states.update(scan["states"])
    return dict(states)


def _read_row_group(plan_uri: str, path: str, group: int) -> list[pa.Table]:
    filesystem = storage.filesystem(plan_uri)[0]
    with filesystem.open(path, "rb") as f:
        return [pq.ParquetFile(f).read_row_group(group)]


class TodoDatasource(Datasource):
    """The plan's to-do rows as a Ray Data source: one block (one read task) per row group of the to-do files.

    The driver holds one small read task per block (``block_rows`` images), and none of the rows."""

    def __init__(self, plan_uri: str, todo_files: list[tuple[str, int]], block_rows: int, schema: pa.Schema) -> None:
        super().__init__()
        self.plan_uri, self.todo_files, self.block_rows, self.schema = plan_uri, todo_files, block_rows, schema

    def estimate_inmemory_data_size(self) -> int:
        return sum(groups for _, groups in self.todo_files) * self.block_rows * 200

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_: Any) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=self.block_rows * 200, input_files=None, exec_stats=None)
        return [
            ReadTask(functools.partial(_read_row_group, self.plan_uri, path, group), metadata, schema=self.schema)
            for path, groups in self.todo_files
            for group in range(groups)
        ]


def new_attempt_id() -> str:
    """Prefix of the output files one attempt writes: how its rows are counted after the write."""
    return f"a{uuid.uuid4().hex[:10]}"
