"""Reading a labelling output: DuckDB SQL over the table ``labels``, the review queue, the rows exports stream.
Every reader opens the output the same way (:meth:`LabelOutput.existing`: refused when there is none)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from pipelines.label_output import LabelOutput

Output = LabelOutput | str  # a resolved output, or the URI of one (resolved with LabelOutput.existing)


def opened(output: Output) -> LabelOutput:
    return output if isinstance(output, LabelOutput) else LabelOutput.existing(output)


def open_labels(output: Output) -> pads.Dataset:
    """The output's committed rows as a pyarrow dataset (local paths and s3:// alike): for pyarrow, Polars
    (``pl.scan_pyarrow_dataset``) or DuckDB."""
    return opened(output).dataset()


@contextmanager
def labels_connection(output: Output) -> Iterator[Any]:
    """One DuckDB connection with the output registered as the table ``labels`` (s3:// is listed once).

    Data is scanned through a pyarrow dataset, so s3:// works without DuckDB's httpfs extension."""
    import duckdb  # only the query side needs it

    dataset = open_labels(output)
    connection = duckdb.connect()
    try:
        connection.register("labels", dataset)
        yield connection
    finally:
        connection.close()


def query_labels(output: Output, sql: str) -> pa.Table:
    """Run DuckDB SQL over the output, exposed as the table ``labels`` (:func:`labels_connection`). Per-class
    rows: ``SELECT s.class_name, count(*) FROM labels, unnest(class_stats) AS t(s) GROUP BY 1``.
    """
    with labels_connection(output) as connection:
        return connection.sql(sql).to_arrow_table()


# -- rows for exports and review ------------------------------------------------------------------------------
# The review queue: the least certain labels first (two classes competing: a small top-1 minus top-2 margin).
REVIEW_ORDER = "mean_margin ASC NULLS LAST, mean_confidence ASC NULLS LAST, image_id"


def review_queue(output: Output, n: int, *, where: str | None = None) -> pa.Table:
    """The ``n`` least certain labelled images (:data:`REVIEW_ORDER`) with their review signals."""
    selection = f" AND ({where})" if where else ""
    return query_labels(
        output,
        "SELECT image_id, source_uri, mean_margin, mean_confidence, low_confidence_fraction FROM labels "
        f"WHERE error IS NULL{selection} ORDER BY {REVIEW_ORDER} LIMIT {int(n)}",
    )


def labelled_rows(
    output: Output, columns: list[str], *, where: str | None = None, review: int | None = None
) -> Iterator[dict[str, Any]]:
    """Rows with a mask, streamed 64 at a time: in storage order (no sort: a sort would hold every row's mask), or
    the ``review`` least certain ones in review order (:data:`REVIEW_ORDER`, a top-N that holds N rows);
    ``where`` is a SQL condition on ``labels``."""
    condition = "error IS NULL" + (f" AND ({where})" if where else "")
    order = "" if review is None else f" ORDER BY {REVIEW_ORDER} LIMIT {int(review)}"
    with labels_connection(output) as connection:
        reader = connection.sql(f"SELECT {', '.join(columns)} FROM labels WHERE {condition}{order}").to_arrow_reader(
            batch_size=64
        )
        for batch in reader:
            yield from batch.to_pylist()


# -- query results for people and pipes -----------------------------------------------------------------------
RESULT_FORMATS = ("table", "csv", "jsonl", "parquet")


def write_result(table: pa.Table, fmt: str, destination: str | None = None, *, max_rows: int = 100) -> None:
    """A query's rows as ``fmt`` to ``destination`` (any URI) or standard output. ``table``: aligned columns with
    every value whole on one line (ids and URIs are never wrapped or cut), at most ``max_rows`` rows; ``csv`` and
    ``jsonl``: every row, nested values as JSON and binary as base64; ``parquet``: the rows as they are."""
    import sys

    from pipelines import storage

    if fmt not in RESULT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(RESULT_FORMATS)}")
    if fmt == "parquet":
        if destination is None:
            raise ValueError("--format parquet writes a file: give --to FILE")
        import pyarrow.parquet as pq

        with storage.open_for_writing(destination) as f:
            pq.write_table(table, f)
        return
    if fmt == "table":
        data = _aligned(table, max_rows).encode("utf-8")
    elif fmt == "jsonl":
        data = "".join(json.dumps(row, default=_plain) + "\n" for row in table.to_pylist()).encode("utf-8")
    else:
        import pyarrow.csv as pacsv

        buffer = pa.BufferOutputStream()
        pacsv.write_csv(_flat(table), buffer)
        data = buffer.getvalue().to_pybytes()
    if destination is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        storage.write_bytes(destination, data)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _flat(table: pa.Table) -> pa.Table:
    """Nested columns as JSON text and binary ones as base64, which CSV can hold."""
    columns = []
    for column in table.columns:
        kind = column.type
        if pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            column = pa.array([None if v is None else _cell(v) for v in column.to_pylist()], pa.string())
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def _cell(value: Any) -> str:
    return _plain(value) if isinstance(value, bytes) else json.dumps(value, default=_plain)


def _aligned(table: pa.Table, max_rows: int) -> str:
    shown = table.slice(0, max_rows)
    rows = [[_text(v) for v in row.values()] for row in shown.to_pylist()]
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, name in enumerate(table.column_names)]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in table.schema.types]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric, strict=True)]
        return "  ".join(padded).rstrip()

    lines = [line(list(table.column_names)), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in rows]
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more rows (--max-rows, or --format csv|jsonl for all)")
    lines.append(f"({table.num_rows} rows)")
    return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=_plain)
    return str(value).replace("\n", "\\n")
