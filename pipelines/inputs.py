"""A labelling run's input plan, computed on the cluster: the driver holds counts, never a row per image.

    sources    list the prefix (a task for its top level, then tasks over groups of its sub-folders) or read
               the manifest (a task per manifest file, streamed in batches); each URI is hashed to its image_id
               and the rows go to <output>/_inputs/sources/b=NN/ by the id's bucket (the id's first hex digits)
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

import contextlib
import functools
import hashlib
import logging
import posixpath
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
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

from . import storage
from .output import data_files, data_uri, is_committed, replace_file
from .stages import PERMANENT, TRANSIENT

logger = logging.getLogger(__name__)

INPUTS_DIR = "_inputs"
BUCKETS = 64  # by the first two hex digits of image_id (uniform: it is a hash)
FILE_GROUPS = 16  # output files to rewrite, grouped by a hash of their name
ROWS_PER_FLUSH = 200_000  # a source task writes its buckets every this many rows (its memory bound)
LISTING_TASKS = 32  # at most this many tasks list the sub-folders of a prefix
FILES_PER_SCAN_TASK = 256  # committed output files per scan task
TODO_ROWS_PER_FILE = 2048  # rows per to-do file; its row groups are the labelling's blocks
ROWS_PER_JOIN_TASK = 250_000  # inputs plus committed rows per join task (a range of buckets)
PLAN_CPUS = 0.5
ORDER_SHIFT = 40  # order = chunk << 40 | row: listing / manifest order, for --limit
RETRY_POLICIES = {"transient": (TRANSIENT,), "all": (TRANSIENT, PERMANENT), "none": ()}
BAD_NAME_ERROR = "input: the file name is not valid UTF-8 (shown escaped); rename the file to read it"
MANIFEST_SUFFIXES = (".parquet", ".csv", ".tsv", ".csv.gz", ".jsonl", ".json", ".ndjson")

PLAN_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("order", pa.int64()),
    ]
)
COMMITTED_SCHEMA = pa.schema([("image_id", pa.string()), ("state", pa.string()), ("file", pa.string())])
OK = "ok"  # the state of a committed row without an error (else its error_kind)


def image_id_for(uri: str) -> str:
    """Stable id of an input image: a hash of its source URI (the key for resume and dedup)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]


def bucket_of(image_id: str) -> int:
    return int(image_id[:2], 16) * BUCKETS // 256


class NoInputsError(FileNotFoundError):
    """The input names no image: refused before anything is labelled."""


class PlanError(RuntimeError):
    """A planning task hit an error a user can fix (a missing prefix, no credentials): re-raised on the driver."""


# -- cheap checks on the driver, before any cluster exists ----------------------------------------------------
def check_source(input_uri: str | None, manifest_uri: str | None, uri_column: str) -> None:
    """Refuse a prefix with nothing at it, or a manifest that is missing or lacks the URI column, in seconds."""
    if manifest_uri is not None:
        for uri in manifest_files(manifest_uri):
            columns = _manifest_columns(uri)
            if uri_column not in columns:
                raise ValueError(f"manifest {uri} has no column {uri_column!r}; columns: {columns}")
        return
    fs, path = storage.filesystem(input_uri)
    if not _is_glob(path):
        with storage.access_errors("list", input_uri):
            if not fs.exists(path):
                raise FileNotFoundError(f"nothing found at {input_uri}: check the bucket/prefix or path")


def manifest_files(manifest_uri: str) -> list[str]:
    """A manifest is a file, or a folder / glob of files (e.g. a Parquet dataset): one task reads each."""
    fs, path = storage.filesystem(manifest_uri)
    prefix = storage.protocol_prefix(manifest_uri)
    with storage.access_errors("read", manifest_uri):
        if _is_glob(path):
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif fs.isdir(path):
            paths = sorted(
                p for p in fs.find(path) if p.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_hidden(p)
            )
        elif fs.exists(path):
            return [manifest_uri]
        else:
            raise FileNotFoundError(f"no manifest at {manifest_uri}: check the path")
    if not paths:
        raise FileNotFoundError(f"no manifest files ({', '.join(MANIFEST_SUFFIXES)}) at {manifest_uri}")
    return [storage.with_protocol(prefix, p) for p in paths]


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _manifest_format(uri: str) -> str:
    lower = uri.lower()
    if lower.endswith((".csv", ".tsv", ".csv.gz")):
        return "tsv" if lower.endswith(".tsv") else "csv"
    return "json" if lower.endswith((".jsonl", ".json", ".ndjson")) else "parquet"


def _manifest_columns(uri: str) -> list[str]:
    with _open_manifest(uri, None) as reader:
        return list(reader.schema.names)


@contextlib.contextmanager
def _open_manifest(uri: str, column: str | None) -> Iterator[Any]:
    """A streaming reader of record batches (with ``.schema``) over one manifest file; only ``column`` when
    given."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    fs, path = storage.filesystem(uri)
    with storage.access_errors("read", uri), fs.open(path, "rb") as file:
        kind = _manifest_format(uri)
        if kind in ("csv", "tsv"):
            convert = pacsv.ConvertOptions(
                column_types={column: pa.string()} if column else None,
                include_columns=[column] if column else None,
            )
            parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            source = pa.CompressedInputStream(file, "gzip") if uri.lower().endswith(".gz") else file
            yield pacsv.open_csv(source, parse_options=parse, convert_options=convert)
        elif kind == "json":
            yield pajson.open_json(file)
        else:
            yield _ParquetBatches(pq.ParquetFile(file), column)


class _ParquetBatches:
    def __init__(self, parquet: pq.ParquetFile, column: str | None) -> None:
        self.schema, self._parquet, self._column = parquet.schema_arrow, parquet, column

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self._parquet.iter_batches(batch_size=65_536, columns=[self._column] if self._column else None)


# -- planning tasks -------------------------------------------------------------------------------------------
def _failure(err: BaseException) -> dict[str, Any]:
    return {"failed": f"{type(err).__name__}: {err}", "not_found": isinstance(err, FileNotFoundError)}


def _raise_failures(results: list[dict[str, Any]]) -> None:
    for result in results:
        if "failed" in result:
            message = result["failed"].split(": ", 1)[1] if result["not_found"] else result["failed"]
            raise (FileNotFoundError if result["not_found"] else PlanError)(message)


class _BucketWriter:
    """Collects plan rows and writes them as one Parquet file per bucket every ROWS_PER_FLUSH rows."""

    def __init__(self, root: str, stage: str, name: str, schema: pa.Schema, key: str = "image_id") -> None:
        self.root, self.stage, self.name, self.schema, self.key = root, stage, name, schema, key
        self.columns: dict[str, list] = {column: [] for column in schema.names}
        self.flushes = 0

    def add(self, **row: Any) -> None:
        for column, values in self.columns.items():
            values.append(row[column])
        if len(self.columns[self.key]) >= ROWS_PER_FLUSH:
            self.flush()

    def flush(self) -> None:
        if not self.columns[self.key]:
            return
        table = pa.table(self.columns, schema=self.schema)
        buckets = np.fromiter((bucket_of(i) for i in self.columns[self.key]), np.int16, len(table))
        order = np.argsort(buckets, kind="stable")
        table, buckets = table.take(order), buckets[order]
        bounds = np.searchsorted(buckets, np.arange(BUCKETS + 1))
        fs, root = storage.filesystem(self.root)
        for bucket in range(BUCKETS):
            if bounds[bucket] < bounds[bucket + 1]:
                part = table.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket])
                _write_table(
                    fs, posixpath.join(root, self.stage, f"b={bucket:02d}", f"{self.name}-{self.flushes}"), part
                )
        self.flushes += 1
        self.columns = {column: [] for column in self.schema.names}


def _write_table(fs: Any, path: str, table: pa.Table, row_group_rows: int | None = None) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path + ".parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_rows)


def _read_tables(uri: str, schema: pa.Schema) -> pa.Table:
    """Every Parquet file under ``uri`` as one table (empty when there is none)."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return schema.empty_table()
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    tables = []
    for file in files:
        with fs.open(file, "rb") as f:
            tables.append(pq.read_table(f).select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


class _SourceRows:
    """Turns listed or manifest URIs into plan rows (id, URI, known error, order) for one chunk."""

    def __init__(self, plan_root: str, chunk: int) -> None:
        self.writer = _BucketWriter(plan_root, "sources", f"chunk{chunk:06d}", PLAN_SCHEMA)
        self.chunk, self.rows, self.blank = chunk, 0, 0
        self.skipped: Counter = Counter()

    def add(self, uri: str | None) -> None:
        if not uri:
            self.blank += 1
            return
        error = kind = None
        try:
            uri.encode("utf-8")
        except UnicodeEncodeError:  # a local name with bytes that are not UTF-8 (os gives surrogate escapes)
            uri = uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            error, kind = BAD_NAME_ERROR, PERMANENT
        order = (self.chunk << ORDER_SHIFT) | self.rows
        self.writer.add(image_id=image_id_for(uri), source_uri=uri, error=error, error_kind=kind, order=order)
        self.rows += 1

    def finish(self, **extra: Any) -> dict[str, Any]:
        self.writer.flush()
        return {"chunk": self.chunk, "rows": self.rows, "blank": self.blank, "skipped": dict(self.skipped), **extra}


def _add_listed(rows: _SourceRows, paths: list[str], prefix: str) -> None:
    for path in sorted(paths):
        if path.lower().endswith(storage.IMAGE_SUFFIXES):
            rows.add(storage.with_protocol(prefix, path))
        else:
            rows.skipped[posixpath.splitext(path)[1].lower() or "(none)"] += 1


@ray.remote(num_cpus=PLAN_CPUS)
def _list_top(input_uri: str, plan_root: str) -> dict[str, Any]:
    """Chunk 0: a single file, a glob, or the files directly under a prefix; returns the sub-folders to list."""
    try:
        fs, path = storage.filesystem(input_uri)
        prefix, rows = storage.protocol_prefix(input_uri), _SourceRows(plan_root, 0)
        with storage.access_errors("list", input_uri):
            if _is_glob(path):
                _add_listed(rows, [p for p in fs.glob(path) if fs.isfile(p)], prefix)
                return rows.finish(folders=[])
            if fs.isfile(path):
                _add_listed(rows, [path], prefix)
                return rows.finish(folders=[])
            entries = fs.ls(path, detail=True)
        files = [e["name"] for e in entries if e["type"] != "directory"]  # a dangling link too: its read fails
        folders = sorted(
            storage.with_protocol(prefix, e["name"]) for e in entries if e["type"] == "directory" and e["name"] != path
        )
        _add_listed(rows, files, prefix)
        return rows.finish(folders=folders)
    except Exception as err:  # returned, re-raised on the driver as one line
        return _failure(err)


@ray.remote(num_cpus=PLAN_CPUS)
def _list_folders(folders: list[str], plan_root: str, chunk: int) -> dict[str, Any]:
    """Everything under a group of sub-folders (in name order), as one chunk."""
    try:
        rows = _SourceRows(plan_root, chunk)
        for folder in folders:
            fs, path = storage.filesystem(folder)
            with storage.access_errors("list", folder):
                _add_listed(rows, fs.find(path), storage.protocol_prefix(folder))
        return rows.finish()
    except Exception as err:
        return _failure(err)


@ray.remote(num_cpus=PLAN_CPUS)
def _read_manifest(manifest_uri: str, uri_column: str, plan_root: str, chunk: int) -> dict[str, Any]:
    """One manifest file, streamed; relative paths resolve against its folder."""
    try:
        base = posixpath.dirname(manifest_uri.rstrip("/"))
        rows = _SourceRows(plan_root, chunk)
        with _open_manifest(manifest_uri, uri_column) as reader:
            for batch in reader:
                for value in batch.column(batch.schema.get_field_index(uri_column)).to_pylist():
                    text = str(value).strip() if value is not None else ""
                    rows.add(text if not text or "://" in text or text.startswith("/") else storage.join(base, text))
        return rows.finish()
    except Exception as err:
        return _failure(err)


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
        writer = _BucketWriter(plan_root, "committed", f"scan{task:05d}", COMMITTED_SCHEMA) if plan_root else None

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
        return _failure(err)


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
    sources = _read_tables(storage.join(plan_root, "sources", name), PLAN_SCHEMA)
    if cutoff is not None:
        sources = sources.filter(pc.less(sources["order"], cutoff))
    sources, duplicates = _first_of_each_id(sources)
    committed = _read_tables(storage.join(plan_root, "committed", name), COMMITTED_SCHEMA)
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
                _write_table(fs, posixpath.join(root, "retry", f"f={group:02d}", f"b={bucket:02d}"), part)
                groups_seen.add(int(group))
        todo = pa.concat_tables(todo_tables).sort_by("order").drop_columns(["order"])
        todo_files, file_rows = [], max(block_rows, TODO_ROWS_PER_FILE // block_rows * block_rows)
        for start in range(0, todo.num_rows, file_rows):
            path = posixpath.join(root, "todo", f"part-{task:02d}-{start // file_rows:05d}")
            rows = todo.slice(start, file_rows)
            _write_table(fs, path, rows, row_group_rows=block_rows)  # a row group is one block of the labelling
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
        return _failure(err)


@ray.remote(num_cpus=PLAN_CPUS)
def _supersede(plan_root: str, data_root: str, group: int) -> dict[str, Any]:
    """Rewrite the output files of one group without the rows that this attempt labels again."""
    try:
        retry = _read_tables(
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
        return _failure(err)


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


def plan_root_uri(output_uri: str) -> str:
    return storage.join(output_uri, INPUTS_DIR)


def _chunked(items: list[Any], parts: int) -> list[list[Any]]:
    size = max(1, -(-len(items) // max(1, parts)))
    return [items[i : i + size] for i in range(0, len(items), size)]


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
    output_uri: str,
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
    written in row groups of ``block_rows`` rows: the labelling's blocks (:func:`read_todo_blocks`)."""
    plan_root = plan_root_uri(output_uri)
    fs, root = storage.filesystem(plan_root)
    if fs.exists(root):
        fs.rm(root, recursive=True)  # the previous attempt's plan: the inputs may have changed since
    data_root = data_uri(output_uri)

    committed_scan = _start_committed_scan(output_uri, plan_root)
    if manifest_uri is not None:
        sources = ray.get([
            _read_manifest.remote(uri, uri_column, plan_root, chunk)
            for chunk, uri in enumerate(manifest_files(manifest_uri))
        ])  # fmt: skip
        _raise_failures(sources)
    else:
        top = ray.get(_list_top.remote(input_uri, plan_root))
        _raise_failures([top])
        folder_groups = _chunked(top["folders"], LISTING_TASKS)
        sources = [top, *ray.get([_list_folders.remote(g, plan_root, i + 1) for i, g in enumerate(folder_groups)])]
        _raise_failures(sources)
    scans = ray.get(committed_scan)
    _raise_failures(scans)

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
            f"{output_uri} already holds labels of run(s) {other_runs}; "
            f"pass --run-id {other_runs[0]} to resume that run, or choose another --output"
        )

    cutoff = _cutoff([(r["chunk"], r["rows"]) for r in sources], limit)
    listed = sum(r["rows"] for r in sources) + sum(sum(scan["states"].values()) for scan in scans)
    tasks = min(BUCKETS, max(1, -(-listed // ROWS_PER_JOIN_TASK)))  # small inputs: one task, not 64
    bucket_ranges = _chunked(list(range(BUCKETS)), tasks)
    joins = ray.get([
        _join_buckets.remote(plan_root, buckets, cutoff, RETRY_POLICIES[retry_errors], block_rows, task)
        for task, buckets in enumerate(bucket_ranges)
    ])  # fmt: skip
    _raise_failures(joins)
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
        _raise_failures(superseded)
        plan.superseded_rows = sum(s["rows"] for s in superseded)
    for transient in ("committed", "retry"):
        with_path = posixpath.join(root, transient)
        if fs.exists(with_path):
            fs.rm(with_path, recursive=True)
    return plan


def _start_committed_scan(output_uri: str, plan_root: str | None, names_start: str = "") -> list[ray.ObjectRef]:
    """Scan tasks over the output's data files (all, or those whose name starts with ``names_start``)."""
    _, files = data_files(output_uri)
    files = [path for path in files if posixpath.basename(path).startswith(names_start)]
    groups = [files[i : i + FILES_PER_SCAN_TASK] for i in range(0, len(files), FILES_PER_SCAN_TASK)]
    data_root = data_uri(output_uri)
    return [_scan_committed.remote(group, data_root, plan_root, i) for i, group in enumerate(groups)]


def count_attempt_rows(output_uri: str, attempt_id: str) -> dict[str, int]:
    """Rows per state (ok / transient / permanent) in the files this attempt wrote (named by its id)."""
    scans = ray.get(_start_committed_scan(output_uri, None, names_start=attempt_id))
    _raise_failures(scans)
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
