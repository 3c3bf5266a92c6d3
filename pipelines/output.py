"""The labelling output on storage: layout, schema, run manifest, resume scan, SQL queries, the rows exports read.

Layout under an output URI (a local directory or any fsspec URI such as s3://bucket/labels)::

    <output>/manifest.json        run manifest: vocabulary, model, config, counts, attempts
    <output>/data/*.parquet       one row per input image (schema: OUTPUT_SCHEMA)
    <output>/_inputs/             the last attempt's input plan (see pipelines.inputs); not labels

A Parquet file is committed once its footer is readable: object stores publish an object only when its upload
completes, and a local file killed mid-write has no valid footer. The input plan deletes such half-written files
and skips the images already labelled; a file is only ever replaced in one step (:func:`replace_file`).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from . import storage

MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
FOOTER_THREADS = 16  # concurrent footer reads when listing committed files (a GET each on object stores)
SCHEMA_VERSION = 3  # 2: error_kind; 3: the review signals (mean_confidence, low_confidence_fraction, mean_margin)

CLASS_STAT_TYPE = pa.struct(
    [
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("pixel_count", pa.int64()),
        ("fraction", pa.float64()),
        ("mean_score", pa.float64()),
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_png", pa.binary()),
        ("confidence_png", pa.binary()),
        ("class_stats", pa.list_(CLASS_STAT_TYPE)),
        ("mean_confidence", pa.float64()),  # review signals (masks.review_signals); null on error rows
        ("low_confidence_fraction", pa.float64()),
        ("mean_margin", pa.float64()),
        ("error", pa.string()),
        ("error_kind", pa.string()),  # "transient" (a re-run retries it) or "permanent"; null when error is null
        ("run_id", pa.string()),
        ("model_id", pa.string()),
        ("vocab_id", pa.string()),
    ]
)


class OutputConflictError(ValueError):
    """The output already holds labels from another run (or an incompatible configuration)."""


def manifest_uri(output_uri: str) -> str:
    return storage.join(output_uri, MANIFEST_FILE)


def data_uri(output_uri: str) -> str:
    return storage.join(output_uri, DATA_DIR)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for any fsspec URI.

    Remote stores go through fsspec (wrapped for pyarrow) so endpoints and credentials resolve exactly as for
    every other read here (pyarrow's own S3 client ignores AWS_ENDPOINT_URL).
    """
    fs, path = storage.filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# -- run manifest ---------------------------------------------------------------------------------------------
def read_manifest(output_uri: str) -> dict[str, Any] | None:
    uri = manifest_uri(output_uri)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


def write_manifest(output_uri: str, manifest: dict[str, Any]) -> None:
    """Replace the manifest in one step: a single PUT on object stores, write-then-rename on local disks."""
    uri = manifest_uri(output_uri)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    fs, path = storage.filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    else:
        storage.write_text(uri, text)


def start_run_manifest(
    existing: dict[str, Any] | None, run_id: str, fingerprint: dict[str, Any], description: dict[str, Any]
) -> dict[str, Any]:
    """The manifest a run writes before its first row: ``description`` holds its ``input``, ``vocabulary``,
    ``model`` and ``config`` sections; counts and attempts of an earlier attempt of the run carry over."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "status": "running",
        "created_at": (existing or {}).get("created_at", _now()),
        "updated_at": _now(),
        "layout": {"data": "data/*.parquet", "table": "one row per input image"},
        "fingerprint": fingerprint,
        **description,
        "counts": (existing or {}).get("counts", {}),
        "attempts": (existing or {}).get("attempts", []),
    }


def finish_run_manifest(manifest: dict[str, Any], counts: dict[str, int], attempt: dict[str, Any]) -> None:
    """Record an attempt's end in ``manifest``: complete when no input lacks a row."""
    manifest["status"] = "complete" if counts["missing"] == 0 else "incomplete"
    manifest["updated_at"] = _now()
    manifest["counts"] = counts
    manifest["attempts"].append({"finished_at": _now(), **attempt})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- committed data -------------------------------------------------------------------------------------------
def is_data_file(path: str) -> bool:
    """Names Ray Data writes; hidden and underscore names are temporary files (and Spark's convention)."""
    return path.endswith(".parquet") and not storage.is_hidden(path)


def data_files(output_uri: str) -> tuple[Any, list[str]]:
    """(filesystem, sorted paths of the data files under ``<output>/data``), committed or not, freshly listed:
    one path per output file (hundreds of rows), not per image."""
    fs, root = storage.filesystem(data_uri(output_uri))
    fs.invalidate_cache(root)  # listings are cached per filesystem instance; another process may have written
    if not fs.isdir(root):
        return fs, []
    return fs, [path for path in sorted(fs.find(root)) if is_data_file(path)]


def is_committed(fs: Any, path: str) -> bool:
    """A complete Parquet file: its footer reads (a killed writer leaves a file without one)."""
    try:
        with fs.open(path, "rb") as f:
            pq.read_metadata(f)
    except Exception:  # any reader error means "not a complete Parquet file"
        return False
    return True


def committed_rows_named(output_uri: str, name_prefix: str) -> int:
    """Rows in the committed data files whose names start with ``name_prefix`` (one attempt's files), counted
    on the calling process from their footers: it needs no free CPU on the cluster."""
    fs, paths = data_files(output_uri)
    rows = 0
    for path in paths:
        if posixpath.basename(path).startswith(name_prefix):
            try:
                with fs.open(path, "rb") as f:
                    rows += pq.read_metadata(f).num_rows
            except Exception:  # still being written
                continue
    return rows


def parquet_files(output_uri: str) -> list[str]:
    """Paths (inside their filesystem) of the committed Parquet files under ``<output>/data``.

    Files whose footer cannot be read were cut off by a killed writer and are skipped (the next labelling
    attempt deletes them and labels their rows again). Footers are read concurrently.
    """
    fs, candidates = data_files(output_uri)
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        complete = list(pool.map(lambda path: is_committed(fs, path), candidates))
    return [path for path, ok in zip(candidates, complete, strict=True) if ok]


def replace_file(fs: Any, path: str, table: pa.Table) -> None:
    """Write ``table`` over the Parquet file at ``path`` in one step: readers see the old file or the new one.

    Object stores publish an upload only when it completes; a local file is written beside and renamed."""
    if isinstance(fs, LocalFileSystem):
        temporary = posixpath.join(posixpath.dirname(path), f".{uuid.uuid4().hex}.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    else:
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)


def open_labels(output_uri: str, *, files: list[str] | None = None) -> pads.Dataset:
    """The labelling output as a pyarrow dataset (works for local paths and s3:// alike)."""
    files = parquet_files(output_uri) if files is None else files
    fs, _ = arrow_filesystem(data_uri(output_uri))
    if isinstance(fs, pafs.LocalFileSystem):
        files = [os.path.abspath(f) for f in files]
    return pads.dataset(files, schema=OUTPUT_SCHEMA, format="parquet", filesystem=fs)


def require_output(output_uri: str) -> None:
    """Readers refuse a URI that holds no labelling output (a typo would otherwise read as zero rows)."""
    if read_manifest(output_uri) is None and not parquet_files(output_uri):
        raise FileNotFoundError(
            f"no labelling output at {output_uri}: it has no {MANIFEST_FILE} and no data/*.parquet; "
            "check the --output URI (the one given to jobs.label)"
        )


# -- queries --------------------------------------------------------------------------------------------------
@contextmanager
def labels_connection(output_uri: str) -> Iterator[Any]:
    """One DuckDB connection with the output registered as the table ``labels`` (s3:// is listed once).

    Data is scanned through a pyarrow dataset, so s3:// works without DuckDB's httpfs extension."""
    import duckdb  # only the query side needs it

    connection = duckdb.connect()
    try:
        connection.register("labels", open_labels(output_uri))
        yield connection
    finally:
        connection.close()


def query_labels(output_uri: str, sql: str) -> pa.Table:
    """Run DuckDB SQL over the output, exposed as the table ``labels`` (:func:`labels_connection`). Per-class
    rows: ``SELECT s.class_name, count(*) FROM labels, unnest(class_stats) AS t(s) GROUP BY 1``.
    """
    require_output(output_uri)
    with labels_connection(output_uri) as connection:
        return connection.sql(sql).to_arrow_table()


# -- rows for exports and review ------------------------------------------------------------------------------
# The review queue: the least certain labels first (two classes competing: a small top-1 minus top-2 margin).
REVIEW_ORDER = "mean_margin ASC NULLS LAST, mean_confidence ASC NULLS LAST, image_id"


def review_queue(output_uri: str, n: int, *, where: str | None = None) -> pa.Table:
    """The ``n`` least certain labelled images (:data:`REVIEW_ORDER`) with their review signals."""
    selection = f" AND ({where})" if where else ""
    return query_labels(
        output_uri,
        "SELECT image_id, source_uri, mean_margin, mean_confidence, low_confidence_fraction FROM labels "
        f"WHERE error IS NULL{selection} ORDER BY {REVIEW_ORDER} LIMIT {int(n)}",
    )


def labelled_rows(
    output_uri: str, columns: list[str], *, where: str | None = None, review: int | None = None
) -> Iterator[dict[str, Any]]:
    """Rows with a mask, streamed 64 at a time: in storage order (no sort: a sort would hold every row's mask), or
    the ``review`` least certain ones in review order (:data:`REVIEW_ORDER`, a top-N that holds N rows);
    ``where`` is a SQL condition on ``labels``."""
    condition = "error IS NULL" + (f" AND ({where})" if where else "")
    order = "" if review is None else f" ORDER BY {REVIEW_ORDER} LIMIT {int(review)}"
    require_output(output_uri)
    with labels_connection(output_uri) as connection:
        reader = connection.sql(f"SELECT {', '.join(columns)} FROM labels WHERE {condition}{order}").to_arrow_reader(
            batch_size=64
        )
        for batch in reader:
            yield from batch.to_pylist()
