"""Reading a labelling output: DuckDB SQL over the table ``labels``, the review queue, the rows exports stream.
Every reader opens the output the same way (:meth:`LabelOutput.existing`: refused when there is none)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from pipelines.labelling.output import LabelOutput

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
