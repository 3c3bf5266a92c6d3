"""What the planning tasks of a labelling run share (:mod:`pipelines.labelling.sources` writes rows this way,
:mod:`pipelines.labelling.plan` joins them): rows spread over hash buckets of their image id, written as Parquet
files under the plan's folder, read back one bucket at a time; a task's failure returned, re-raised on the driver.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

BUCKETS = 64  # by the first two hex digits of image_id (uniform: it is a hash)


ROWS_PER_FLUSH = 200_000  # a source task writes its buckets every this many rows (its memory bound)


PLAN_CPUS = 0.5


ORDER_SHIFT = 40  # order = chunk << 40 | row: listing / manifest order, for --limit


PLAN_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("order", pa.int64()),
    ]
)


def bucket_of(image_id: str) -> int:
    return int(image_id[:2], 16) * BUCKETS // 256


class PlanError(RuntimeError):
    """A planning task hit an error a user can fix (a missing prefix, no credentials): re-raised on the driver."""


def failure(err: BaseException) -> dict[str, Any]:
    return {"failed": f"{type(err).__name__}: {err}", "not_found": isinstance(err, FileNotFoundError)}


def raise_failures(results: list[dict[str, Any]]) -> None:
    for result in results:
        if "failed" in result:
            message = result["failed"].split(": ", 1)[1] if result["not_found"] else result["failed"]
            raise (FileNotFoundError if result["not_found"] else PlanError)(message)


class BucketWriter:
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
                write_table(
                    fs, posixpath.join(root, self.stage, f"b={bucket:02d}", f"{self.name}-{self.flushes}"), part
                )
        self.flushes += 1
        self.columns = {column: [] for column in self.schema.names}


def write_table(fs: Any, path: str, table: pa.Table, row_group_rows: int | None = None) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path + ".parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_rows)


def read_tables(uri: str, schema: pa.Schema) -> pa.Table:
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


def chunked(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` in at most ``parts`` runs of consecutive items (the work of one task each)."""
    size = max(1, -(-len(items) // max(1, parts)))
    return [items[i : i + size] for i in range(0, len(items), size)]
