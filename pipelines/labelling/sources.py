"""Where a labelling run's images come from, listed on the cluster into the plan's ``sources/`` buckets: a prefix
(a task for its top level, then tasks over groups of its sub-folders), a glob, or a manifest (a task per manifest
file, streamed in batches). Every source yields rows the same way (:class:`_SourceRows`): the URI, its image_id
(a hash of the URI), an error known before reading (a name that is not UTF-8) and its order (for ``--limit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.labelling.buckets import (
    ORDER_SHIFT,
    PLAN_CPUS,
    PLAN_SCHEMA,
    BucketWriter,
    chunked,
    failure,
    raise_failures,
)
from pipelines.rows import PERMANENT

LISTING_TASKS = 32  # at most this many tasks list the sub-folders of a prefix


BAD_NAME_ERROR = "input: the file name is not valid UTF-8 (shown escaped); rename the file to read it"


MANIFEST_SUFFIXES = (".parquet", ".csv", ".tsv", ".csv.gz", ".jsonl", ".json", ".ndjson")


def image_id_for(uri: str) -> str:
    """Stable id of an input image: a hash of its source URI (the key for resume and dedup)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]


class NoInputsError(FileNotFoundError):
    """The input names no image: refused before anything is labelled."""


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


class _SourceRows:
    """Turns listed or manifest URIs into plan rows (id, URI, known error, order) for one chunk."""

    def __init__(self, plan_root: str, chunk: int) -> None:
        self.writer = BucketWriter(plan_root, "sources", f"chunk{chunk:06d}", PLAN_SCHEMA)
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
        return failure(err)


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
        return failure(err)


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
        return failure(err)


def list_sources(plan_root: str, input_uri: str | None, manifest_uri: str | None, uri_column: str) -> list[dict]:
    """List the prefix or read the manifest on the cluster into ``<plan_root>/sources/``: one result per chunk
    (its rows, blank rows and skipped extensions), in order."""
    if manifest_uri is not None:
        sources = ray.get([
            _read_manifest.remote(uri, uri_column, plan_root, chunk)
            for chunk, uri in enumerate(manifest_files(manifest_uri))
        ])  # fmt: skip
        raise_failures(sources)
        return sources
    top = ray.get(_list_top.remote(input_uri, plan_root))
    raise_failures([top])
    folder_groups = chunked(top["folders"], LISTING_TASKS)
    sources = [top, *ray.get([_list_folders.remote(g, plan_root, i + 1) for i, g in enumerate(folder_groups)])]
    raise_failures(sources)
    return sources
