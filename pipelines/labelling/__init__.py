"""Labelling: images in object storage -> one Parquet row per image (mask, class statistics, review signals),
and the readers of a run's output (SQL queries, the review queue, exports, the preview page).

    config.py   LabelConfig: what a run reads and how it labels
    run.py      run_labelling and the Ray Data chain (label_images)
    sources.py  where images come from (listings, manifests)
    plan.py     the input plan on the cluster (committed scan, anti-join, supersede, the to-do source)
    stages.py   the CPU stages (read, decode, encode) and their Arrow schemas
    lease.py    one attempt at a time per output
    exports.py, preview.py: reading an output for other tools and for people

A run's output itself (LabelOutput, its row schema and manifest; SQL over it) is read by other workflows too
(fine-tuning on a run's labels, scoring them), so it lives in the shared modules pipelines.label_output and
pipelines.label_queries; its names are public here as well.

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
    "LabelOutput": "pipelines.label_output",
    "OUTPUT_SCHEMA": "pipelines.label_output",
    "OutputConflictError": "pipelines.label_output",
    "labelled_rows": "pipelines.label_queries",
    "labels_connection": "pipelines.label_queries",
    "open_labels": "pipelines.label_queries",
    "query_labels": "pipelines.label_queries",
    "review_queue": "pipelines.label_queries",
    "write_result": "pipelines.label_queries",
    "EXPORTS": "exports",
    "export": "exports",
    "render_preview": "preview",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
