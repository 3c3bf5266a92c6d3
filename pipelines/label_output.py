"""The labelling output on storage: its layout (:class:`LabelOutput`), row schema, run manifest and committed files.

Layout under an output URI (a local directory or any fsspec URI such as s3://bucket/labels)::

    <output>/manifest.json        run manifest: vocabulary, model, config, counts, attempts
    <output>/data/*.parquet       one row per input image (schema: OUTPUT_SCHEMA)
    <output>/_inputs/             the last attempt's input plan (see pipelines.labelling.plan); not labels

A Parquet file is committed once its footer is readable: object stores publish an object only when its upload
completes, and a local file killed mid-write has no valid footer. The input plan deletes such half-written files
and skips the images already labelled; a file is only ever replaced in one step (:func:`replace_file`).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipelines import storage

MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
INPUTS_DIR = "_inputs"  # the last attempt's input plan (pipelines.labelling.plan)
LEASE_FILE = "_lease.json"  # the attempt that holds the output (pipelines.labelling.lease)
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


class LabelOutput:
    """A labelling run's output, resolved once: its filesystem and root, and where each part of its layout lives
    (``manifest.json``, ``data/``, ``_inputs/``, ``_lease.json``). The pipeline, the planning, the lease and every
    reader (queries, exports, preview) are handed this object, not the URI string."""

    def __init__(self, uri: str) -> None:
        self.uri = storage.normalize_uri(uri)
        self.fs, self.root = storage.filesystem(self.uri)
        self.manifest_uri = storage.join(self.uri, MANIFEST_FILE)
        self.data_uri = storage.join(self.uri, DATA_DIR)
        self.inputs_uri = storage.join(self.uri, INPUTS_DIR)
        self.lease_uri = storage.join(self.uri, LEASE_FILE)
        self.data_root = posixpath.join(self.root, DATA_DIR)  # data/ and _inputs/ as paths inside ``fs``
        self.inputs_root = posixpath.join(self.root, INPUTS_DIR)

    def __repr__(self) -> str:
        return f"LabelOutput({self.uri!r})"

    @classmethod
    def existing(cls, uri: str) -> LabelOutput:
        """The output at ``uri`` for reading; refused when it holds no labelling output (a typo would otherwise
        read as zero rows)."""
        output = cls(uri)
        if output.read_manifest() is None and not output.committed_files():
            raise FileNotFoundError(
                f"no labelling output at {uri}: it has no {MANIFEST_FILE} and no {DATA_DIR}/*.parquet; "
                "check the --output URI (the one given to jobs.label)"
            )
        return output

    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def arrow_data_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the path of ``data/`` in it. Remote stores go through fsspec (wrapped for
        pyarrow) so endpoints and credentials resolve as for every other read here (pyarrow's own S3 client
        ignores AWS_ENDPOINT_URL)."""
        if self.is_local():
            return pafs.LocalFileSystem(), os.path.abspath(self.data_root)
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.data_root

    # -- run manifest -----------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        path = posixpath.join(self.root, MANIFEST_FILE)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))

    def read_vocabulary(self) -> tuple[dict[str, Any], list[str]]:
        """The run manifest and its class names (mask value i = names[i]); refused when it lists none."""
        manifest = self.read_manifest() or {}
        names = list((manifest.get("vocabulary") or {}).get("names") or [])
        if not names:
            raise ValueError(
                f"{self.uri} has no manifest.json with its vocabulary (the class names): is it a jobs.label output?"
            )
        return manifest, names

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest in one step: a single PUT on object stores, write-then-rename on local disks."""
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        path = posixpath.join(self.root, MANIFEST_FILE)
        if self.is_local():
            os.makedirs(self.root, exist_ok=True)
            temporary = path + ".tmp"
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(temporary, path)
        else:
            storage.write_text(self.manifest_uri, text)

    # -- committed data ---------------------------------------------------------------------------------------
    def data_files(self) -> list[str]:
        """Sorted paths (in :attr:`fs`) of the data files under ``data/``, committed or not, freshly listed: one
        path per output file (hundreds of rows), not per image."""
        self.fs.invalidate_cache(self.data_root)  # listings are cached per filesystem; another process may write
        if not self.fs.isdir(self.data_root):
            return []
        return [path for path in sorted(self.fs.find(self.data_root)) if is_data_file(path)]

    def committed_files(self) -> list[str]:
        """The data files whose footer reads, read concurrently. A file without one was cut off by a killed
        writer: skipped here; the next labelling attempt deletes it and labels its rows again."""
        candidates = self.data_files()
        with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
            complete = list(pool.map(lambda path: is_committed(self.fs, path), candidates))
        return [path for path, ok in zip(candidates, complete, strict=True) if ok]

    def committed_rows_named(self, name_prefix: str) -> int:
        """Rows in the committed data files whose names start with ``name_prefix`` (one attempt's files), counted
        on the calling process from their footers: it needs no free CPU on the cluster."""
        rows = 0
        for path in self.data_files():
            if posixpath.basename(path).startswith(name_prefix):
                try:
                    with self.fs.open(path, "rb") as f:
                        rows += pq.read_metadata(f).num_rows
                except Exception:  # still being written
                    continue
        return rows

    def dataset(self, files: list[str] | None = None) -> pads.Dataset:
        """The committed rows (or those of ``files``) as a pyarrow dataset, for local paths and s3:// alike."""
        files = self.committed_files() if files is None else files
        fs, _ = self.arrow_data_filesystem()
        if isinstance(fs, pafs.LocalFileSystem):
            files = [os.path.abspath(f) for f in files]
        return pads.dataset(files, schema=OUTPUT_SCHEMA, format="parquet", filesystem=fs)

    def remove_inputs_plan(self) -> None:
        """The last attempt's input plan (``_inputs/``): not labels; a refused run leaves nothing behind."""
        if self.fs.exists(self.inputs_root):
            self.fs.rm(self.inputs_root, recursive=True)


# -- run manifest contents ------------------------------------------------------------------------------------
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


# -- one data file (also used by planning tasks on the cluster) -----------------------------------------------
def is_data_file(path: str) -> bool:
    """Names Ray Data writes; hidden and underscore names are temporary files (and Spark's convention)."""
    return path.endswith(".parquet") and not storage.is_hidden(path)


def is_committed(fs: Any, path: str) -> bool:
    """A complete Parquet file: its footer reads (a killed writer leaves a file without one)."""
    try:
        with fs.open(path, "rb") as f:
            pq.read_metadata(f)
    except Exception:  # any reader error means "not a complete Parquet file"
        return False
    return True


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
