"""Labelling: images in object storage -> one Parquet row per image (mask, class statistics, review signals),
and the readers of a run's output (SQL queries, the review queue, exports, the preview page).

    config.py   LabelConfig: what a run reads and how it labels
    run.py      run_labelling and the Ray Data chain (label_images)
    sources.py  where images come from (listings, manifests)
    plan.py     the input plan on the cluster (committed scan, anti-join, supersede, the to-do source)
    stages.py   the CPU stages (read, decode, encode) and their Arrow schemas
    output.py   LabelOutput: a run's output resolved once; the row schema and the run manifest
    lease.py    one attempt at a time per output
    queries.py, exports.py, preview.py: reading an output

Names load on first use (:mod:`pipelines.lazy`), so a reader (``jobs.query``) does not import Ray.
"""

from __future__ import annotations

from pipelines.lazy import lazy_exports

# public name -> the module that defines it
_HOMES = {
    "LabelConfig": "config",
    "RunSummary": "run",
    "run_labelling": "run",
    "NoInputsError": "sources",
    "image_id_for": "sources",
    "LabelOutput": "output",
    "OUTPUT_SCHEMA": "output",
    "OutputConflictError": "output",
    "labelled_rows": "queries",
    "labels_connection": "queries",
    "open_labels": "queries",
    "query_labels": "queries",
    "review_queue": "queries",
    "write_result": "queries",
    "EXPORTS": "exports",
    "export": "exports",
    "render_preview": "preview",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
