"""The rows every Ray Data chain here (labelling, evaluation) passes from stage to stage. A row that fails keeps
its place and says why in one line (``error``) and whether a re-run may cure it (``error_kind``), so one bad image
never fails its batch or silently drops its neighbours; each stage returns a table of an explicit schema
(:func:`stage_table`), so a batch of only failures still has the right column types.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines.images import ImageDecodeError

# error_kind of an error row: whether re-running the job may cure it (jobs.label's --retry-errors)
TRANSIENT, PERMANENT = "transient", "permanent"
ERROR_KINDS = (TRANSIENT, PERMANENT)


def describe_error(stage: str, err: BaseException) -> str:
    """One line: the stage, the exception type (unless it is our own readable decode error) and its message."""
    message = str(err) or type(err).__name__
    text = f"{stage}: {message}" if isinstance(err, ImageDecodeError) else f"{stage}: {type(err).__name__}: {message}"
    return text.replace("\n", " ")[:1000]


def error_kind(stage: str, err: BaseException) -> str:
    """``transient`` when running again may succeed (any read failure: a missing object may appear, a store may
    recover, credentials may be fixed; the model running out of memory), else ``permanent`` (the bytes are bad)."""
    if stage == "read":
        return TRANSIENT
    if stage == "model" and (isinstance(err, MemoryError) or "out of memory" in str(err).lower()):
        return TRANSIENT  # torch.OutOfMemoryError, or the allocator's own message
    return PERMANENT


def column_or_nulls(batch: pa.Table, name: str) -> list:
    """A column as a list, or nulls when the batch lacks it (e.g. ``error_kind`` from a caller's own table)."""
    return batch[name].to_pylist() if name in batch.column_names else [None] * batch.num_rows


def stage_table(schema: pa.Schema, batch: pa.Table, **columns: Any) -> pa.Table:
    """A stage's output rows in ``schema``: a field given in ``columns`` (a list, typed as the field, or an array),
    any other passed through from ``batch`` (the row's identity, sizes, and what earlier stages wrote)."""
    return pa.table(
        {
            field.name: _typed(columns[field.name], field.type) if field.name in columns else batch[field.name]
            for field in schema
        },
        schema=schema,
    )


def _typed(values: Any, type_: pa.DataType) -> Any:
    return pa.array(values, type_) if isinstance(values, list) else values
